"""The IVF baseline: nlist rule, the exhaustive setting equals brute force, candidates counted are the
items actually scored, and the log-candidates interpolation."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("faiss")

from training.ivf import IvfIndex, interpolate_at, ivf_nlist, nprobe_sweep

N, D, USERS, K = 600, 16, 40, 20


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    item_emb = rng.standard_normal((N + 1, D)).astype(np.float32)
    item_emb[0] = 0.0
    queries = rng.standard_normal((USERS, D)).astype(np.float32)
    exclude = [rng.integers(1, N + 1, size=int(rng.integers(0, 30))) for _ in range(USERS)]
    return item_emb, queries, exclude


def brute_force(item_emb: np.ndarray, queries: np.ndarray, exclude: list[np.ndarray], allowed=None):
    scores = queries @ item_emb.T  # [U, N+1]
    scores[:, 0] = -np.inf
    out = np.zeros((len(queries), K), np.int64)
    for row, excl in enumerate(exclude):
        s = scores[row].copy()
        s[excl] = -np.inf
        if allowed is not None:
            mask = np.full(len(s), True)
            mask[allowed[row]] = False
            s[mask] = -np.inf
        top = np.argsort(-s, kind="stable")[:K]
        top = top[np.isfinite(s[top])]
        out[row, : len(top)] = top
    return out


def test_nlist_follows_the_definition() -> None:
    assert ivf_nlist(20_000) == 1024 and ivf_nlist(250_000) == 1024
    assert ivf_nlist(1682) == round(1682 / 12) and ivf_nlist(12_101) == round(12_101 / 12)
    assert ivf_nlist(5) == 1
    sweep = nprobe_sweep(140)
    assert sweep[0] == 1 and sweep[-1] == 140 and sweep == sorted(set(sweep))


def test_exhaustive_setting_equals_brute_force(data) -> None:
    item_emb, queries, exclude = data
    index = IvfIndex(item_emb)
    assert index.nlist == round(N / 12) and index.list_sizes.sum() == N
    result = index.search(queries, K, index.nlist, exclude)
    np.testing.assert_array_equal(result.items, brute_force(item_emb, queries, exclude))
    assert (result.num_scored == N).all()


def test_candidates_are_the_items_of_the_probed_cells(data) -> None:
    item_emb, queries, exclude = data
    index = IvfIndex(item_emb)
    nprobe = 3
    _, cells = index.quantizer.search(queries, nprobe)
    _, cell_of_item = index.quantizer.search(np.ascontiguousarray(item_emb[1:]), 1)
    probed = [np.flatnonzero(np.isin(cell_of_item[:, 0], cells[row])) + 1 for row in range(USERS)]
    result = index.search(queries, K, nprobe, exclude)
    # counted = the items scored: brute force restricted to exactly those items gives the same answer
    assert result.num_scored.tolist() == [len(p) for p in probed]
    np.testing.assert_array_equal(result.items, brute_force(item_emb, queries, exclude, probed))
    assert result.num_scored.mean() < N / 4  # a real restriction, not the whole catalogue


def test_interpolation_is_linear_in_log_candidates() -> None:
    cands, recall = [10.0, 100.0, 1000.0], [0.1, 0.3, 0.4]
    assert interpolate_at(cands, recall, math.sqrt(10 * 100)) == pytest.approx(0.2)
    assert interpolate_at(cands, recall, 100.0) == pytest.approx(0.3)
    assert interpolate_at(cands[::-1], recall[::-1], 10**2.5) == pytest.approx(0.35)
    assert math.isnan(interpolate_at(cands, recall, 5.0))
    assert interpolate_at(cands, recall, 5000.0) == 0.4
