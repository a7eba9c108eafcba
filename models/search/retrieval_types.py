"""The types a retrieval passes around: encoder states, the result, the device item table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class EncoderStates:
    """The encoder's output for a batch of histories (what the service caches per row)."""

    memory: Tensor  # [B, T, D] float32
    memory_mask: Tensor  # [B, T] bool, True = a real history item
    query: Tensor  # [B, Dr] float32

    @property
    def batch_size(self) -> int:
        return int(self.query.shape[0])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ``i`` without its left padding: ``(memory [t,D], mask [t], query [Dr])`` as numpy."""
        mask = self.memory_mask[i]
        start = int(mask.long().argmax()) if bool(mask.any()) else mask.shape[0] - 1
        return (
            self.memory[i, start:].float().cpu().numpy(),
            mask[start:].cpu().numpy(),
            self.query[i].float().cpu().numpy(),
        )

    @classmethod
    def stack(
        cls, rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], device: str | torch.device = "cpu"
    ) -> EncoderStates:
        """Inverse of :meth:`row` for a batch: left-pads every row to the longest one."""
        if not rows:
            raise ValueError("EncoderStates.stack needs at least one row")
        T = max(m.shape[0] for m, _, _ in rows)
        D = rows[0][0].shape[1]
        memory = np.zeros((len(rows), T, D), np.float32)
        mask = np.zeros((len(rows), T), np.bool_)
        for i, (m, k, _) in enumerate(rows):
            memory[i, T - m.shape[0] :] = m
            mask[i, T - k.shape[0] :] = k
        query = np.stack([q for _, _, q in rows]).astype(np.float32)
        dev = torch.device(device)
        return cls(
            torch.from_numpy(memory).to(dev), torch.from_numpy(mask).to(dev), torch.from_numpy(query).to(dev)
        )


@dataclass(frozen=True)
class RetrievalResult:
    items: np.ndarray  # [B, k] dense ids, 0 where fewer exist
    scores: np.ndarray  # [B, k] float32 rerank scores (models.search.rerank), -inf where padded
    num_candidates: np.ndarray  # [B] items in the beam's leaves after exclusion
    leaves: np.ndarray  # [B, b] global leaf node ids from the beam, -1 where fewer exist
    num_scored: np.ndarray  # [B] items scored: all items of the beam's leaves, before exclusion
    dense_filled: np.ndarray | None = None  # [B] items added by exact search when the beam had too few


class DeviceRows:
    """The device item table of consecutive catalogue versions: one buffer with spare rows, each
    version a prefix view of it; rows past every view handed out are written in place."""

    SPARE = 0.25  # spare share allocated when the buffer grows

    def __init__(self, rows: Tensor) -> None:
        self.buf, self.used = rows, rows.shape[0]

    def view(self, rows: int) -> Tensor:
        return self.buf[:rows]

    def with_rows(self, table: np.ndarray, have: int) -> DeviceRows:
        """The buffer holding ``table [R, Dr]`` whose first ``have`` rows it already holds."""
        R = table.shape[0]
        if have == self.used and self.buf.shape[0] >= R and have <= R:
            self.buf[have:R] = torch.from_numpy(np.ascontiguousarray(table[have:R])).to(self.buf.device)
            self.used = R
            return self
        grown = torch.zeros(
            R + int(self.SPARE * R) + 1, table.shape[1], dtype=self.buf.dtype, device=self.buf.device
        )
        grown[:R] = torch.from_numpy(np.ascontiguousarray(table)).to(self.buf.device)
        out = DeviceRows(grown)
        out.used = R
        return out


def check_search_args(k: int, beam_size: int) -> None:
    if k < 1 or beam_size < 1:
        raise ValueError(f"k and beam_size must be >= 1, got k={k}, beam_size={beam_size}")
