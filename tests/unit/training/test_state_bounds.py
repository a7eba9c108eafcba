"""The encoder's output bound recorded at export (training/state_bounds.py): above every value the
encoder produced on the probes, by the margin, and reproducible."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from training.state_bounds import MARGIN, encoder_state_bounds


class Scaled(nn.Module):
    """A toy encoder ``(history[B,T], mask[B,T]) -> (memory[B,T,D], query[B,Dr])`` of known range."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        with torch.no_grad():
            self.emb.weight.copy_(torch.linspace(-scale, scale, 44).reshape(11, 4))

    def forward(self, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        memory = self.emb(history) * mask.unsqueeze(-1)  # [B, T, D]
        return memory, memory.sum(dim=1)  # [B, Dr]


def test_the_bound_covers_what_the_encoder_produces_with_the_margin() -> None:
    enc = Scaled(3.0)
    got = encoder_state_bounds(enc, num_items=10, max_history=6)
    assert got["observed_max_abs"] >= 3.0 * 40 / 43  # the largest embedding row the probes reach
    assert got["max_abs"] == pytest.approx(MARGIN * got["observed_max_abs"])
    assert got == encoder_state_bounds(enc, num_items=10, max_history=6)  # seeded: reproducible


def test_an_encoder_with_non_finite_outputs_is_refused() -> None:
    enc = Scaled(3.0)
    with torch.no_grad():
        enc.emb.weight[5] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        encoder_state_bounds(enc, num_items=10, max_history=6)
