"""SEATER losses against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from training.methods.seater.losses import (
    alignment_loss,
    generation_loss,
    ranking_loss,
    sample_ranking_negatives,
)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_generation_loss_is_path_cross_entropy_over_children_only() -> None:
    # level 1: children scores (0, ln 3), truth = child 1 -> p = 3/4
    # level 2: one real child and one padded (-inf) slot -> p = 1
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, float("-inf")]]])  # [B=1, L=2, C=2]
    target = torch.tensor([[1, 0]])
    assert generation_loss(logits, target).item() == pytest.approx(-math.log(0.75))


def test_generation_loss_averages_over_batch_and_sums_over_levels() -> None:
    logits = torch.zeros(2, 3, 4)  # uniform over 4 children at each of 3 levels
    target = torch.zeros(2, 3, dtype=torch.int64)
    assert generation_loss(logits, target).item() == pytest.approx(3 * math.log(4.0))


def test_alignment_loss_two_orthogonal_pairs() -> None:
    # cos(child_i, parent_j) = identity; tau = 1: each row = log(e + 1) - 1
    e = torch.eye(2)
    loss = alignment_loss(e, e, torch.tensor([5, 6]), tau=1.0)
    assert loss.item() == pytest.approx(math.log(math.e + 1.0) - 1.0)


def test_alignment_loss_counts_a_shared_parent_once() -> None:
    # rows 0 and 1 are siblings under token 5; row 2 is under token 6. tau = 0.5.
    child = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # norms differ: cosine ignores them
    parent = torch.tensor([[1.0, 0.0], [4.0, 0.0], [0.0, 1.0]])
    loss = alignment_loss(child, parent, torch.tensor([5, 5, 6]), tau=0.5)
    # columns: token 5 = (1, 0), token 6 = (0, 1)
    row0 = math.log(math.exp(2.0) + math.exp(0.0)) - 2.0  # cos 1 with its parent, 0 with token 6
    row1 = math.log(math.exp(0.0) + math.exp(2.0)) - 0.0  # cos 0 with its parent, 1 with token 6
    row2 = math.log(math.exp(-2.0) + math.exp(0.0)) - 0.0  # cos 0 with its parent, -1 with token 5
    assert loss.item() == pytest.approx((row0 + row1 + row2) / 3.0, rel=1e-6)


def test_alignment_loss_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="tau"):
        alignment_loss(torch.eye(2), torch.eye(2), torch.tensor([1, 2]), tau=0.0)


def test_ranking_loss_hand_computed_pairs() -> None:
    # D = 1, W = 1, z_x = 1: s(y) = sigmoid(z_y). shared = (2, 1, 0), beta = 0.1
    z_x = torch.tensor([[1.0]])
    z_y = torch.tensor([[[0.0], [0.5], [-0.2]]])
    shared = torch.tensor([[2, 1, 0]])
    s0, s1, s2 = sig(0.0), sig(0.5), sig(-0.2)
    expected = (
        max(0.0, s1 - s0 + 0.1 * 1)  # positive above the 1-shared negative
        + max(0.0, s2 - s0 + 0.1 * 2)  # positive above the 0-shared negative
        + max(0.0, s2 - s1 + 0.1 * 1)  # 1-shared above 0-shared (this hinge is inactive)
    )
    loss = ranking_loss(z_x, z_y, shared, torch.eye(1), beta=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected > 0.3  # two of the three hinges are active, so the test can fail


def test_ranking_loss_uses_bilinear_weights_and_skips_ties() -> None:
    z_x = torch.tensor([[1.0, 2.0]])
    z_y = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    w = torch.tensor([[0.5, 0.0], [0.0, -1.0]])
    # p^T W q: (0.5, -2, -1.5); shared (3, 1, 1): the two negatives tie and are not compared
    shared = torch.tensor([[3, 1, 1]])
    s = [sig(0.5), sig(-2.0), sig(-1.5)]
    beta = 0.4
    expected = max(0.0, s[1] - s[0] + beta * 2) + max(0.0, s[2] - s[0] + beta * 2)
    assert ranking_loss(z_x, z_y, shared, w, beta).item() == pytest.approx(expected, rel=1e-6)


def test_ranking_loss_is_zero_when_order_and_margins_hold() -> None:
    z_x = torch.tensor([[1.0]])
    z_y = torch.tensor([[[10.0], [0.0], [-10.0]]])  # s ~ (1, 0.5, 0)
    loss = ranking_loss(z_x, z_y, torch.tensor([[2, 1, 0]]), torch.eye(1), beta=0.01)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def _binary_tree_paths() -> torch.Tensor:
    # 8 items, binary tree of depth 3: nodes 1-2 (level 1), 3-6 (level 2), 7-14 (leaves)
    rows = [[-1, -1, -1]]
    for item in range(8):
        rows.append([1 + item // 4, 3 + item // 2, 7 + item])
    return torch.tensor(rows)


def test_sample_ranking_negatives_share_exactly_the_asked_prefix() -> None:
    paths = _binary_tree_paths()
    positives = torch.tensor([1, 4, 8, 6] * 8)
    gen = torch.Generator().manual_seed(0)
    neg, shared = sample_ranking_negatives(paths, positives, [2, 1, 0], generator=gen)
    assert neg.shape == shared.shape == (32, 3)
    assert torch.equal(shared, torch.tensor([[2, 1, 0]]).expand(32, 3))
    assert bool((neg >= 1).all()) and bool((neg <= 8).all())
    assert not bool((neg == positives.unsqueeze(1)).any())


def test_sample_ranking_negatives_rejects_full_length_prefix() -> None:
    with pytest.raises(ValueError, match="prefix lengths"):
        sample_ranking_negatives(_binary_tree_paths(), torch.tensor([1]), [3])
