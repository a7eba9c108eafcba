"""Balanced hierarchical clustering (SEATER Algorithm 1) and the capacity greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.index import TreeIndex
from training.clustering import (
    KMeansConfig,
    balanced_tree_codes,
    capacity_assign,
    capacity_assign_grouped,
    level_sizes,
    tree_codes,
)

SETTINGS = settings(max_examples=40, deadline=None)


def sequential_greedy(scores: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """The definition: items by decreasing best-minus-second margin take their best node with room."""
    top = np.sort(scores, axis=1)
    margin = top[:, -1] - (top[:, -2] if scores.shape[1] > 1 else 0.0)
    room = capacity.copy()
    out = np.full(scores.shape[0], -1)
    for item in np.argsort(-margin, kind="stable"):
        for node in np.argsort(-scores[item], kind="stable"):
            if room[node] > 0:
                room[node] -= 1
                out[item] = node
                break
    return out


@SETTINGS
@given(n=st.integers(1, 80), c=st.integers(1, 6), seed=st.integers(0, 10_000), slack=st.integers(0, 5))
def test_capacity_assign_is_the_sequential_greedy(n: int, c: int, seed: int, slack: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, c)).astype(np.float32)
    capacity = rng.multinomial(n + slack, np.full(c, 1.0 / c))
    got = capacity_assign(scores, capacity)
    assert isinstance(got, np.ndarray) and got.shape == (n,)
    assert (np.bincount(got, minlength=c) <= capacity).all()
    np.testing.assert_array_equal(got, sequential_greedy(scores, capacity))


def test_capacity_assign_torch_in_torch_out_and_refuses_too_little_room() -> None:
    scores = torch.tensor([[1.0, 0.0], [0.9, 0.0], [0.0, 0.1]])
    assert capacity_assign(scores, np.array([1, 2])).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="sum to at least N"):
        capacity_assign(scores, np.array([1, 1]))
    with pytest.raises(ValueError, match="capacity has"):
        capacity_assign(scores, np.array([1, 1, 1]))


def test_grouped_equals_one_call_per_group_and_scalar_capacity() -> None:
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(60, 3)).astype(np.float32)
    group = rng.integers(0, 4, 60)
    capacity = np.full((4, 3), 10)
    got = capacity_assign_grouped(
        torch.from_numpy(scores), torch.from_numpy(group), torch.from_numpy(capacity)
    )
    for g in range(4):
        members = group == g
        np.testing.assert_array_equal(got.numpy()[members], capacity_assign(scores[members], 10))
    with pytest.raises(ValueError, match="group 0 has"):
        capacity_assign_grouped(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), torch.ones(1, 2))


def split_sizes_balanced(codes: np.ndarray, k: int) -> None:
    """Every cluster of n items splits into min(n, k) children whose sizes differ by at most one."""
    body = codes[1:]
    for level in range(body.shape[1]):
        parents, parent_of = np.unique(body[:, :level], axis=0, return_inverse=True)
        parent_of = parent_of.reshape(-1)
        for p in range(len(parents)):
            members = body[parent_of == p]
            _, sizes = np.unique(members[:, level], return_counts=True)
            n = len(members)
            assert len(sizes) == min(n, k), (level, n, sizes)
            assert sizes.max() - sizes.min() <= 1, (level, n, sizes)


@SETTINGS
@given(
    n=st.integers(1, 150),
    k=st.integers(2, 5),
    seed=st.integers(0, 1000),
    extra_levels=st.sampled_from([None, -1, 1]),
)
def test_balanced_tree_codes_split_evenly(n: int, k: int, seed: int, extra_levels: int | None) -> None:
    emb = np.random.default_rng(seed).normal(size=(n + 1, 4)).astype(np.float32)
    full_depth = 1
    while k**full_depth < n:
        full_depth += 1
    levels = None if extra_levels is None else max(1, full_depth + extra_levels)
    codes = balanced_tree_codes(emb, k, levels=levels, seed=seed, iters=4)
    assert codes.shape == (n + 1, levels or full_depth) and (codes[0] == -1).all()
    split_sizes_balanced(codes, k)
    index = TreeIndex.from_codes(codes, k, "node")
    index.validate()
    if levels is None or levels >= full_depth:  # deep enough: one item per leaf (SEATER)
        assert index.num_leaves == n


def test_balanced_clusters_recover_planted_groups() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 20
    truth = np.repeat(np.arange(4), 25)
    emb = np.vstack([np.zeros((1, 8)), centers[truth] + rng.normal(size=(100, 8))]).astype(np.float32)
    codes = balanced_tree_codes(emb, 4, seed=1)
    assert level_sizes(codes)[0] == (4, 25, 25)
    # each planted group is exactly one level-1 cluster
    pairs = set(zip(truth.tolist(), codes[1:, 0].tolist(), strict=True))
    assert len(pairs) == 4


def test_plain_kmeans_baseline_gives_valid_codes() -> None:
    emb = np.random.default_rng(3).normal(size=(301, 6)).astype(np.float32)
    codes = tree_codes(emb, 4, levels=3, config=KMeansConfig(balanced=False, iters=5))
    TreeIndex.from_codes(codes, 4, "level").validate()
    with pytest.raises(ValueError, match="k must be"):
        balanced_tree_codes(emb, 1)
    with pytest.raises(ValueError, match="balanced_iters"):
        KMeansConfig(iters=2, balanced_iters=3)
