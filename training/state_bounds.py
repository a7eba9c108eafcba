"""The range of the encoder's outputs, recorded in a bundle's manifest at export (``state_bounds``).

The service caches encoder states (``memory [T, D]``, ``query [Dr]``) in Redis and refuses a cached
value whose magnitude lies outside what this encoder can produce (service/cache/codec.py): a
well-formed entry of finite 3e38 values would otherwise overflow the scores and answer with no
items. The bound is the largest absolute value of either output over probe histories, times
``MARGIN``. The probes are histories of random items of every length up to ``max_history`` (seeded,
so an export is reproducible): they reach every item embedding the encoder reads, which is what sets
its output range, without the trainer having to hand its data to the exporter. A real history that
exceeds the bound costs only a cache write (the row is computed, not cached), never a wrong answer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

MARGIN = 4.0
PROBES = 512


@torch.no_grad()
def encoder_state_bounds(
    encoder: nn.Module, num_items: int, max_history: int, *, probes: int = PROBES, seed: int = 0
) -> dict[str, Any]:
    """``{"max_abs": margin * observed, "observed_max_abs", "margin", "probes"}`` of ``encoder``
    (``(history[B,T], mask[B,T]) -> (memory[B,T,D], query[B,Dr])``) on seeded random histories."""
    enc = copy.deepcopy(encoder).cpu().eval()
    g = torch.Generator().manual_seed(seed)
    T = max(1, max_history)
    history = torch.randint(1, num_items + 1, (probes, T), generator=g)  # [P, T]
    lengths = torch.arange(probes) % T + 1  # [P] every length 1..T
    mask = torch.arange(T).unsqueeze(0) >= (T - lengths).unsqueeze(1)  # [P, T] left-padded
    history = history.masked_fill(~mask, 0)
    observed = 0.0
    for start in range(0, probes, 128):
        memory, query = enc(history[start : start + 128], mask[start : start + 128])  # [b, T, D], [b, Dr]
        real = memory[mask[start : start + 128]]  # [n, D] the positions a cached row keeps
        if not (torch.isfinite(real).all() and torch.isfinite(query).all()):
            raise ValueError("the encoder's outputs are not finite on probe histories")
        observed = max(observed, float(real.abs().max()), float(query.abs().max()))
    return {
        "max_abs": MARGIN * max(observed, 1e-6),
        "observed_max_abs": observed,
        "margin": MARGIN,
        "probes": probes,
    }
