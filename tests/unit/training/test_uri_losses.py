"""URI losses against values computed by hand on tiny tensors.

Logits are written as ``log(p)`` so that the softmax gives back the probabilities used in the
hand computation exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from training.methods.uri.losses import (
    balance_loss,
    balance_weights,
    commitment_loss,
    e_step_loss,
    m_step_loss,
    memory_loss,
    sampled_softmax_loss,
)


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_e_step_is_cross_entropy_of_query_against_item() -> None:
    q = logits([0.25, 0.75])
    i = logits([0.5, 0.5])
    # H(P_I, P_Q) = -(0.5 log 0.25 + 0.5 log 0.75)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert e_step_loss(q, i).item() == pytest.approx(expected, abs=1e-12)
    # the roles swap in the M-step: H(P_Q, P_I) = -(0.25 log 0.5 + 0.75 log 0.5) = log 2
    assert m_step_loss(q, i).item() == pytest.approx(math.log(2), abs=1e-12)


def test_cross_entropies_average_over_pairs() -> None:
    q = logits([0.25, 0.75], [0.5, 0.5])
    i = logits([0.5, 0.5], [0.9, 0.1])
    row0 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    row1 = -(0.9 * math.log(0.5) + 0.1 * math.log(0.5))
    assert e_step_loss(q, i).item() == pytest.approx((row0 + row1) / 2, abs=1e-12)


def test_e_step_stops_gradient_through_item_target() -> None:
    q = logits([0.25, 0.75]).requires_grad_()
    i = logits([0.5, 0.5]).requires_grad_()
    e_step_loss(q, i).backward()
    assert i.grad is None or torch.all(i.grad == 0)
    # d/dz_q of H(p, softmax(z_q)) = softmax(z_q) - p
    torch.testing.assert_close(q.grad, torch.tensor([[0.25 - 0.5, 0.75 - 0.5]], dtype=torch.float64))
    i2 = logits([0.5, 0.5]).requires_grad_()
    e_step_loss(q.detach(), i2, detach_target=False).backward()
    assert i2.grad is not None and torch.any(i2.grad != 0)


def test_commitment_is_mean_entropy() -> None:
    i = logits([0.5, 0.5], [0.5, 0.5])
    assert commitment_loss(i).item() == pytest.approx(math.log(2), abs=1e-12)
    i = logits([0.25, 0.25, 0.25, 0.25], [1.0 - 3e-12, 1e-12, 1e-12, 1e-12])
    assert commitment_loss(i).item() == pytest.approx(math.log(4) / 2, abs=1e-9)


def test_balance_weights_and_loss_match_eq_10() -> None:
    items = logits([0.8, 0.2], [0.4, 0.6])  # E[P_I] = [0.6, 0.4], k = 2
    w1 = abs(0.5 - math.log(0.6)) + 1
    w2 = abs(0.5 - math.log(0.4)) + 1
    torch.testing.assert_close(
        balance_weights(torch.tensor([0.6, 0.4], dtype=torch.float64)),
        torch.tensor([w1, w2], dtype=torch.float64),
    )
    expected = -(w1 * math.log(0.6) + w2 * math.log(0.4)) / 2
    assert balance_loss(items).item() == pytest.approx(expected, abs=1e-12)
    # eq. 7 without the weights: H(U, E[P_I])
    assert balance_loss(items, adaptive=False).item() == pytest.approx(
        -(math.log(0.6) + math.log(0.4)) / 2, abs=1e-12
    )


def test_balance_weight_gets_no_gradient() -> None:
    z = logits([0.8, 0.2], [0.4, 0.6]).requires_grad_()
    balance_loss(z).backward()
    assert z.grad is not None
    z_const = z.detach().clone().requires_grad_()
    mean = torch.softmax(z_const, -1).mean(0)
    w = balance_weights(mean.detach())  # constants
    (-(w * torch.log(mean)).sum() / 2).backward()
    torch.testing.assert_close(z.grad, z_const.grad)


def test_balance_is_lowest_for_a_uniform_mean() -> None:
    balanced = logits([0.99, 0.01], [0.01, 0.99])
    collapsed = logits([0.99, 0.01], [0.99, 0.01])
    assert balance_loss(balanced) < balance_loss(collapsed)


def test_memory_loss_sums_both_sides_over_levels() -> None:
    q1, i1 = logits([0.25, 0.75]), logits([0.5, 0.5])
    q2, i2 = logits([0.1, 0.9]), logits([0.2, 0.8])
    codes = torch.tensor([[0, 1]])
    one_level = -math.log(0.25) - math.log(0.5)
    assert memory_loss([q1], [i1], codes).item() == pytest.approx(one_level, abs=1e-12)
    two = one_level - math.log(0.9) - math.log(0.8)
    assert memory_loss([q1, q2], [i1, i2], codes).item() == pytest.approx(two, abs=1e-12)
    assert memory_loss([], [], codes).item() == 0.0


def test_sampled_softmax_puts_positive_first() -> None:
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    positive = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    negatives = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)  # scores 2 | 0, 1
    expected = -2.0 + math.log(math.exp(2) + math.exp(0) + math.exp(1))
    assert sampled_softmax_loss(query, positive, negatives).item() == pytest.approx(expected, abs=1e-12)


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"\[B, k\]"):
        e_step_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="negatives"):
        sampled_softmax_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))


def test_balance_per_group_averages_the_groups() -> None:
    # group 0: E[P] = [0.6, 0.4]; group 1: E[P] = [0.5, 0.5]
    items = logits([0.8, 0.2], [0.4, 0.6], [0.5, 0.5])
    groups = torch.tensor([7, 7, 3])

    def one(p1: float, p2: float) -> float:
        w1, w2 = abs(0.5 - math.log(p1)) + 1, abs(0.5 - math.log(p2)) + 1
        return -(w1 * math.log(p1) + w2 * math.log(p2)) / 2

    expected = (one(0.6, 0.4) + one(0.5, 0.5)) / 2
    assert balance_loss(items, groups=groups).item() == pytest.approx(expected, abs=1e-12)
    # each parent collapsed onto its own token: balanced level-wide, unbalanced per parent
    collapsed = logits([0.99, 0.01], [0.99, 0.01], [0.01, 0.99], [0.01, 0.99])
    parents = torch.tensor([0, 0, 1, 1])
    assert balance_loss(collapsed, groups=parents) > balance_loss(collapsed) + 1.0
