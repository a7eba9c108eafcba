"""TDR's sampled softmax, samplers and rectified labels (training/tdr_sampling.py) on tiny trees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.methods.tdr.sampling import (
    children_table,
    level_sizes,
    rectified_weights,
    sampled_softmax_loss,
    topdown_negatives,
    uniform_negatives,
)


def binary_tree(levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete binary tree, nodes numbered level by level (root 0) -> (children [n, 2], item_path [N+1, L])."""
    num_nodes = 2 ** (levels + 1) - 1
    children = torch.full((num_nodes, 2), -1, dtype=torch.int64)
    internal = torch.arange(2**levels - 1)
    children[internal, 0] = 2 * internal + 1
    children[internal, 1] = 2 * internal + 2
    num_items = 2**levels
    item_path = torch.full((num_items + 1, levels), -1, dtype=torch.int64)
    for item in range(1, num_items + 1):
        node = 2**levels - 1 + (item - 1)  # leaf of the item
        for level in range(levels, 0, -1):
            item_path[item, level - 1] = node
            node = (node - 1) // 2
    return children, item_path


def full_softmax_grad(logits: torch.Tensor, pos: int) -> torch.Tensor:
    """Eq. 21: d(-log softmax(o)[pos]) / do = p - y."""
    grad = torch.softmax(logits, 0).clone()
    grad[pos] -= 1.0
    return grad


def sampled_grad(logits: torch.Tensor, pos: int, neg: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    o = logits.clone().requires_grad_(True)
    loss = sampled_softmax_loss(o[pos].reshape(1), o[neg][None, :], log_q[None, :])
    loss.backward()
    assert o.grad is not None
    return o.grad


LOGITS = torch.tensor([0.3, -1.2, 2.0, 0.5, -0.4, 1.1, 0.0, -2.0], dtype=torch.float64)
POS = 2


def test_sampled_softmax_with_uniform_q_tends_to_full_softmax_gradient() -> None:
    """Uniform q is not proportional to exp(o): the estimate is only consistent. With m = 20000 draws
    the relative error of the partition estimate is about sqrt(c/m) ~ 2%, i.e. < 0.01 on every
    gradient entry (all |grad| <= 1); tolerance 0.02 with a fixed seed. Without the ``- ln(m q)``
    correction the positive's gradient would be ~ -1 instead of p_pos - 1 ~ -0.5: the test fails."""
    gen = torch.Generator().manual_seed(0)
    m, c = 20000, LOGITS.numel()
    others = torch.tensor([i for i in range(c) if i != POS])
    neg = others[torch.randint(0, c - 1, (m,), generator=gen)]
    log_q = torch.full((m,), -math.log(c - 1), dtype=torch.float64)
    got = sampled_grad(LOGITS, POS, neg, log_q)
    torch.testing.assert_close(got, full_softmax_grad(LOGITS, POS), atol=0.02, rtol=0.0)


def test_sampled_softmax_is_unbiased_for_small_m_when_q_is_the_softmax_of_negatives() -> None:
    """Theorem 2: with q proportional to exp(o) over the negatives the gradient is unbiased for any m.
    m = 4, mean over R = 4000 draws: the std of a negative entry is <= (1 - p_pos) * sqrt(0.25 / (m R))
    ~ 0.002, tolerance 0.01 (5 std)."""
    gen = torch.Generator().manual_seed(1)
    m, reps = 4, 4000
    neg_mask = torch.ones_like(LOGITS, dtype=torch.bool)
    neg_mask[POS] = False
    q = torch.softmax(LOGITS.masked_fill(~neg_mask, float("-inf")), 0)
    total = torch.zeros_like(LOGITS)
    for _ in range(reps):
        neg = torch.multinomial(q, m, replacement=True, generator=gen)
        total += sampled_grad(LOGITS, POS, neg, q[neg].log())
    torch.testing.assert_close(total / reps, full_softmax_grad(LOGITS, POS), atol=0.01, rtol=0.0)


def test_sampled_softmax_masks_invalid_draws_and_applies_weights() -> None:
    pos = torch.tensor([1.0, 2.0])
    neg = torch.tensor([[0.0, 5.0], [1.0, 1.0]])
    log_q = torch.log(torch.full((2, 2), 0.5))  # ln(m q) = 0: no correction
    valid = torch.tensor([[True, False], [True, True]])
    weights = torch.tensor([1.0, 0.5])
    got = sampled_softmax_loss(pos, neg, log_q, neg_valid=valid, weights=weights)
    row0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))
    row1 = -math.log(math.exp(2) / (math.exp(2) + 2 * math.exp(1)))
    assert got.item() == pytest.approx((row0 + 0.5 * row1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="neg_log_q"):
        sampled_softmax_loss(pos, neg, log_q[:, :1])


def test_children_table_from_csr() -> None:
    child_offsets = np.array([0, 2, 3, 3, 3])  # root -> 1, 2; node 1 -> 3
    child_ids = np.array([1, 2, 3])
    table = children_table(child_offsets, child_ids, max_branching=2)
    assert table.tolist() == [[1, 2], [3, -1], [-1, -1], [-1, -1]]


def test_uniform_negatives_are_other_nodes_of_the_level_with_uniform_q() -> None:
    _, item_path = binary_tree(3)
    levels = level_sizes(item_path, 3)
    assert levels == [(1, 2), (3, 4), (7, 8)]
    pos = item_path[torch.tensor([1, 6])]  # [2, 3]
    neg, log_q, valid = uniform_negatives(pos, levels, m=4000, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (2, 3, 4000) and valid.all()
    for j, (lo, count) in enumerate(levels):
        assert ((neg[:, j] >= lo) & (neg[:, j] < lo + count)).all()
        assert (neg[:, j] != pos[:, j, None]).all()
        torch.testing.assert_close(log_q[:, j], torch.full((2, 4000), -math.log(count - 1)))
        freq = torch.bincount(neg[0, j] - lo, minlength=count).double() / 4000
        expected = torch.full((count,), 1.0 / (count - 1), dtype=torch.float64)
        expected[pos[0, j] - lo] = 0.0
        torch.testing.assert_close(freq, expected, atol=0.03, rtol=0.0)  # ~4 std at p = 1/7


def node_score_table(num_users: int, num_nodes: int, seed: int) -> torch.Tensor:
    return torch.randn((num_users, num_nodes), generator=torch.Generator().manual_seed(seed))


def test_topdown_log_q_is_the_product_of_edge_softmaxes_and_matches_frequencies() -> None:
    children, _ = binary_tree(3)
    scores = node_score_table(2, children.shape[0], seed=3)  # [users, nodes] f(u, n)

    def score_pairs(users: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        return scores[users[:, None], cand.clamp(min=0)]

    m = 6000
    nodes, log_q = topdown_negatives(score_pairs, children, 2, 3, m, torch.Generator().manual_seed(0))
    assert nodes.shape == (2, 3, m)
    parent = torch.full((children.shape[0],), -1, dtype=torch.int64)
    for p in range(children.shape[0]):
        for c in children[p]:
            if c >= 0:
                parent[c] = p
    for u in range(2):
        for j in range(3):
            for node in range(2 ** (j + 1) - 1, 2 ** (j + 2) - 1):
                expected, n = 0.0, node
                while n > 0:  # product of edge softmaxes along the root path
                    sib = children[parent[n]]
                    expected += (scores[u, n] - torch.logsumexp(scores[u, sib], 0)).item()
                    n = int(parent[n])
                hit = nodes[u, j] == node
                freq = hit.double().mean().item()
                assert freq == pytest.approx(math.exp(expected), abs=0.02)  # ~3 std at p = 0.5
                if hit.any():
                    assert log_q[u, j][hit].allclose(torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_topdown_q_equals_the_level_softmax_when_parents_are_logsumexp_of_children() -> None:
    """Theorem 3: if exp(o_n) = sum of exp(o_c) over children, top-down q is the level softmax."""
    children, _ = binary_tree(3)
    num_nodes = children.shape[0]
    scores = node_score_table(1, num_nodes, seed=4)[0].clone()
    for n in range(2**3 - 2, -1, -1):  # internal nodes bottom-up
        scores[n] = torch.logsumexp(scores[children[n]], 0)

    def score_pairs(users: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        return scores[cand.clamp(min=0)]

    nodes, log_q = topdown_negatives(score_pairs, children, 1, 3, 200, torch.Generator().manual_seed(0))
    for j in range(3):
        lo, hi = 2 ** (j + 1) - 1, 2 ** (j + 2) - 1
        level_logp = torch.log_softmax(scores[lo:hi], 0)
        torch.testing.assert_close(log_q[0, j], level_logp[nodes[0, j] - lo], atol=1e-5, rtol=0.0)


def test_rectified_weights_on_the_papers_example() -> None:
    """Proposition 1's user: eta = (.21, 0, .12, .18, .19, 0, .16, .14) on a binary tree of height 3."""
    _, item_path = binary_tree(3)
    eta = torch.tensor([[0.0, 0.21, 0.0, 0.12, 0.18, 0.19, 0.0, 0.16, 0.14]])
    targets = torch.tensor([1, 4, 5, 8])
    got = rectified_weights(eta.log().expand(4, -1), targets, item_path)
    # item 1 is best everywhere; item 4 beats 3 but not 1; item 5 is best of 5..8; item 8 loses to 7
    assert got.tolist() == [[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]]


def test_rectified_ratio_weights_relax_the_indicator() -> None:
    _, item_path = binary_tree(3)
    eta = torch.tensor([[0.0, 0.21, 0.0, 0.12, 0.18, 0.19, 0.0, 0.16, 0.14]])
    got = rectified_weights(eta.log().expand(2, -1), torch.tensor([4, 8]), item_path, mode="ratio")
    expected = torch.tensor([[0.18 / 0.21, 1.0, 1.0], [0.14 / 0.19, 0.14 / 0.16, 1.0]])
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="rectify mode"):
        rectified_weights(eta, torch.tensor([1]), item_path, mode="soft")
