"""The most-popular baseline: the most frequent training items not in the history."""

from __future__ import annotations

import time

import numpy as np
import torch

from training.context import TrainContext, TrainedMethod
from training.methods.sasrec.model import top_k_excluding
from training.splits import Split
from training.trainer import popularity_counts


class Popularity:
    """Recommends the most frequent training items not in the history."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = np.asarray(counts, dtype=np.float64)  # [N+1], counts[0] = 0

    @classmethod
    def fit(cls, split: Split) -> Popularity:
        return cls(popularity_counts(split.train, split.num_items))

    def recommend(self, histories: list[np.ndarray], k: int, exclude: list[np.ndarray] | None) -> np.ndarray:
        scores = torch.from_numpy(self.counts).float().expand(len(histories), -1)  # [B, N+1]
        return top_k_excluding(scores, k, exclude)


def train_popular(ctx: TrainContext) -> TrainedMethod:
    start = time.perf_counter()
    model = Popularity.fit(ctx.split)
    return TrainedMethod(recommender=model, info={"train_seconds": time.perf_counter() - start})
