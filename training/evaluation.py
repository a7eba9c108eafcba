"""Run a Recommender over an EvalSet and compute the ranking metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from training.metrics import DEFAULT_KS, evaluate_ranking
from training.splits import EvalSet


class Recommender(Protocol):
    """Anything that ranks items for histories (a trained method, a bundle through the Retriever)."""

    def recommend(
        self, histories: list[np.ndarray], k: int, exclude: list[np.ndarray] | None
    ) -> np.ndarray:  # [B, k] dense ids, 0 = none
        ...


def rank_eval_set(
    recommender: Recommender,
    evalset: EvalSet,
    k: int,
    *,
    exclude_history: bool = True,
    batch_size: int = 512,
    limit: int = 0,
) -> np.ndarray:
    """Top-``k`` items ``[B, k]`` for the users of ``evalset`` (the first ``limit`` if > 0); with
    ``exclude_history`` each user's :meth:`EvalSet.excluded` items are left out."""
    users = evalset.head(limit)
    histories, excluded = users.histories, users.excluded()
    out = [np.zeros((0, k), dtype=np.int64)]
    for start in range(0, len(histories), batch_size):
        batch = histories[start : start + batch_size]
        exclude = excluded[start : start + batch_size] if exclude_history else None
        ranked = np.asarray(recommender.recommend(batch, k, exclude))
        if ranked.shape != (len(batch), k):
            raise ValueError(f"recommend returned shape {ranked.shape}, expected {(len(batch), k)}")
        out.append(ranked.astype(np.int64, copy=False))
    return np.concatenate(out)


def evaluate_recommender(
    recommender: Recommender,
    evalset: EvalSet,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exclude_history: bool = True,
    batch_size: int = 512,
    limit: int = 0,
) -> dict[str, float]:
    """Recall / NDCG / HR at every k in ``ks``; history items are excluded from the ranking."""
    ranked = rank_eval_set(
        recommender, evalset, max(ks), exclude_history=exclude_history, batch_size=batch_size, limit=limit
    )
    targets = evalset.targets[: len(ranked)]
    return evaluate_ranking(ranked, targets, ks)
