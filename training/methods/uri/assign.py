"""Where URI's item tokens come from: the items' own P_I, or the evidence of their queries; and the
balanced k-means warm start of a level.

* **Item assignment** (paper 4.2): each item takes the argmax of its own ``P_I`` under capacity.
* **Query-evidence assignment** (paper 4.1, the greedy algorithm behind the M-step): item ``y``
  takes the argmax of ``E_{x in X_y}[P_Q(x)]``, the mean token distribution of its training
  queries (the histories whose next item is ``y``), under the same capacity.
  :class:`QueryEvidence` accumulates those ``P_Q`` during an epoch at no extra forward pass; an
  item's score is ``(sum_x P_Q(x) + prior * P_I(y)) / (n_y + prior)``, so that an item with few
  queries leans on its own ``P_I`` and one with none keeps it.
* **Warm start** (:func:`kmeans_within_parents`): a level's tokens start as balanced k-means codes of
  the items' vectors inside each parent (the items sharing the assigned prefix). URI then trains
  the decoder on them and moves items by query evidence (hard EM, :meth:`URITrainer.train_level`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from training.clustering import balanced_tree_codes
from training.distributed import DistContext


class QueryEvidence:
    """Running ``sum_x P_Q(x)`` and ``n`` per target item over the pairs seen since :meth:`reset`."""

    def __init__(self, num_items: int, k: int) -> None:
        self.sums = torch.zeros(num_items + 1, k, dtype=torch.float64)  # [N+1, k]
        self.counts = torch.zeros(num_items + 1, dtype=torch.float64)  # [N+1]

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def add(self, items: np.ndarray, query_logits: Tensor) -> None:
        """``items [B]`` the pairs' positives, ``query_logits [B, k]`` their queries' scores."""
        probs = torch.softmax(query_logits.detach().double(), dim=-1)  # [B, k]
        index = torch.as_tensor(items, dtype=torch.long)
        self.sums.index_add_(0, index, probs)
        self.counts.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))

    def scores(self, item_probs: np.ndarray, prior: float) -> np.ndarray:
        """``item_probs [N, k]`` (P_I) -> ``[N, k]`` per-item scores ``(sum P_Q + prior P_I) / (n + prior)``.

        With ``prior = 0`` an item with no query keeps ``P_I``.
        """
        sums = self.sums[1:].numpy()  # [N, k]
        counts = self.counts[1:].numpy()[:, None]  # [N, 1]
        blended = (sums + prior * item_probs) / np.maximum(counts + prior, 1e-12)
        return np.where(counts + prior > 0, blended, item_probs)

    def reduce(self, dist: DistContext) -> None:
        """Under torchrun: the mean over ranks of the sums and counts (their ratio is the global one)."""
        if dist.is_distributed:  # all_reduce_mean returns float32: keep the float64 accumulators
            self.sums = dist.all_reduce_mean(self.sums).double()
            self.counts = dist.all_reduce_mean(self.counts).double()

    def coverage(self) -> float:
        """Share of items with at least one query in the accumulated pairs."""
        return float((self.counts[1:] > 0).double().mean())


def kmeans_within_parents(vectors: np.ndarray, parents: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Balanced k-means tokens of one level inside every parent.

    ``vectors [N, D]`` the items' vectors, ``parents [N]`` int64 group of each item (all equal at
    level 1) -> ``[N]`` int64 tokens in ``[0, k)`` (a parent of ``n <= k`` items: tokens ``0..n-1``).
    """
    tokens = np.zeros(len(vectors), dtype=np.int64)
    for group in np.unique(parents):
        members = np.flatnonzero(parents == group)
        emb = np.concatenate([np.zeros((1, vectors.shape[1]), vectors.dtype), vectors[members]])  # [n+1, D]
        tokens[members] = balanced_tree_codes(emb, k, levels=1, seed=seed + int(group))[1:, 0]
    return tokens
