"""Per-row encoder states on their way between the encoder, the search and the cache.

A batch's rows come from two places: the cache (:class:`service.cache.codec.StateRow`, numpy on the
host) or this batch's encode (:class:`DeviceRow`, slices of the encoder's output, still on the
serving device). Fresh states stay on the device all the way to the search; they are copied to the
host only when a cache will store them (:func:`host_rows`), so with the cache off a miss never
leaves the device. :func:`stack_states` left-pads any mix of both into one batch (the encoder
counts positions from the most recent item, so a left-padded row gives the same states at any
padded length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.search.retriever import EncoderStates
from service.cache.codec import StateRow


@dataclass(frozen=True)
class DeviceRow:
    """One row of a fresh encode, without its left padding, on the serving device."""

    memory: Tensor  # [t, D] float32
    memory_mask: Tensor  # [t] bool
    query: Tensor  # [Dr] float32


Row = StateRow | DeviceRow


def _lengths(states: EncoderStates) -> list[int]:
    """Real items per row (one device sync for the batch); at least 1, as the encoder pads to T >= 1."""
    return [max(int(n), 1) for n in states.memory_mask.sum(dim=1).tolist()]


def device_rows(states: EncoderStates) -> list[DeviceRow]:
    """``states`` ([B, T, ...], left-padded) -> B rows without their padding; views, no copy."""
    T = int(states.memory_mask.shape[1])
    memory = states.memory.float()  # [B, T, D]
    query = states.query.float()  # [B, Dr]
    return [
        DeviceRow(memory=memory[i, T - t :], memory_mask=states.memory_mask[i, T - t :], query=query[i])
        for i, t in enumerate(_lengths(states))
    ]


def host_rows(states: EncoderStates) -> list[StateRow]:
    """``states`` -> B rows as numpy without their padding (what the cache stores): one host copy
    per tensor for the whole batch."""
    T = int(states.memory_mask.shape[1])
    memory = states.memory.float().cpu().numpy()  # [B, T, D]
    mask = states.memory_mask.cpu().numpy().astype(bool)  # [B, T]
    query = states.query.float().cpu().numpy()  # [B, Dr]
    return [
        StateRow(memory=memory[i, T - t :], memory_mask=mask[i, T - t :], query=query[i])
        for i, t in enumerate(_lengths(states))
    ]


def stack_states(rows: Sequence[Row], device: str) -> EncoderStates:
    """Rows -> one left-padded batch on ``device``. Rows that are all from the cache take the
    numpy path (one transfer per tensor); fresh rows are padded on the device."""
    if not rows:
        raise ValueError("stack_states needs at least one row")
    cached = [r for r in rows if isinstance(r, StateRow)]
    if len(cached) == len(rows):
        return EncoderStates.stack([(r.memory, r.memory_mask, r.query) for r in cached], device)
    dev = torch.device(device)
    parts = [_on_device(r, dev) for r in rows]
    T = max(int(p.memory.shape[0]) for p in parts)
    D = int(parts[0].memory.shape[1])
    memory = torch.zeros((len(parts), T, D), dtype=torch.float32, device=dev)  # [B, T, D]
    mask = torch.zeros((len(parts), T), dtype=torch.bool, device=dev)  # [B, T]
    for i, p in enumerate(parts):
        t = int(p.memory.shape[0])
        memory[i, T - t :] = p.memory
        mask[i, T - t :] = p.memory_mask
    query = torch.stack([p.query for p in parts])  # [B, Dr]
    return EncoderStates(memory=memory, memory_mask=mask, query=query)


def _on_device(row: Row, dev: torch.device) -> DeviceRow:
    if isinstance(row, DeviceRow):
        return DeviceRow(row.memory.to(dev), row.memory_mask.to(dev), row.query.to(dev))
    return DeviceRow(
        memory=torch.tensor(
            row.memory, dtype=torch.float32, device=dev
        ),  # a copy: cache rows may be read-only
        memory_mask=torch.tensor(row.memory_mask, dtype=torch.bool, device=dev),
        query=torch.tensor(row.query, dtype=torch.float32, device=dev),
    )
