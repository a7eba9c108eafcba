"""Brute-force top-K (the baseline the generative path is measured against) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.search import bruteforce
from models.search.bruteforce import bruteforce_topk


def test_matches_a_numpy_full_sort_and_honours_exclusions() -> None:
    rng = np.random.default_rng(0)
    item_emb = rng.standard_normal((51, 8)).astype(np.float32)  # [N+1, Dr], N = 50
    item_emb[0] = 0
    query = rng.standard_normal((3, 8)).astype(np.float32)  # [B, Dr]
    exclude = [np.array([], np.int64), np.array([5, 7, 9]), np.arange(1, 51)]
    ids, scores = bruteforce_topk(torch.from_numpy(query), torch.from_numpy(item_emb), 6, exclude)
    assert ids.shape == scores.shape == (3, 6)
    full = query @ item_emb.T  # [B, N+1]
    for row in range(2):
        allowed = [i for i in range(1, 51) if i not in set(exclude[row].tolist())]
        expected = sorted(allowed, key=lambda i: -full[row, i])[:6]
        assert ids[row].tolist() == expected
        np.testing.assert_allclose(scores[row], full[row, expected], rtol=1e-5)
    assert ids[2].tolist() == [0] * 6 and np.isneginf(scores[2]).all()  # everything excluded


def test_k_larger_than_the_catalogue_pads() -> None:
    item_emb = torch.eye(4)  # 3 items + padding row
    ids, scores = bruteforce_topk(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), item_emb, 5)
    assert ids.tolist() == [[3, 2, 1, 0, 0]]
    assert np.isneginf(scores[0, 3:]).all()


def test_chunked_scoring_matches_one_full_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks smaller than the table (and than k): the same ids and scores as a full sort."""
    monkeypatch.setattr(bruteforce, "CHUNK_ROWS", 7)
    rng = np.random.default_rng(1)
    item_emb = rng.standard_normal((60, 4)).astype(np.float32)  # N = 59, 9 chunks
    item_emb[0] = 0
    query = rng.standard_normal((4, 4)).astype(np.float32)
    exclude = [np.array([3, 14, 15, 58]), np.array([], np.int64), np.arange(1, 30), np.arange(1, 58)]
    ids, scores = bruteforce_topk(torch.from_numpy(query), torch.from_numpy(item_emb), 10, exclude)
    full = query @ item_emb.T
    for row in range(4):
        banned = set(exclude[row].tolist()) | {0}
        expected = sorted((i for i in range(60) if i not in banned), key=lambda i: -full[row, i])[:10]
        assert ids[row, : len(expected)].tolist() == expected
        np.testing.assert_allclose(scores[row, : len(expected)], full[row, expected], rtol=1e-5)
    assert ids[3, 2:].tolist() == [0] * 8 and np.isneginf(scores[3, 2:]).all()  # only 58, 59 left
