"""URI's index building blocks: the capacity-constrained assignment of a level, prefix groups, the
per-level APE report, and the sibling-leaf hard negatives of the ranker."""

from __future__ import annotations

import math

import numpy as np

from models.index import TreeIndex
from training.metrics import average_partition_entropy
from training.splits import EvalSet

# --------------------------------------------------------------------------------------------
# Assignment, APE, negatives


def assign_level(probs: np.ndarray, parents: np.ndarray, k: int) -> np.ndarray:
    """Capacity-constrained token assignment of one level (paper 4.2, Li et al. 2023).

    probs: [N, k] the items' token distributions; parents: [N] int64 group of each item (its code
    prefix; all equal at level 1). Within a group of n items every token takes at most
    ``ceil(n / k)`` items. Returns tokens [N] int64.
    """
    from training.clustering import capacity_assign

    tokens = np.empty(len(probs), dtype=np.int64)
    order = np.argsort(parents, kind="stable")
    bounds = np.flatnonzero(np.diff(parents[order])) + 1
    for group in np.split(order, bounds):
        capacity = np.full(k, math.ceil(len(group) / k), dtype=np.int64)  # [k]
        tokens[group] = capacity_assign(probs[group], capacity)
    return tokens


def group_ids(codes: np.ndarray) -> np.ndarray:
    """``codes[N, l] -> [N]`` int64 id of each distinct prefix (0 when l == 0)."""
    if codes.shape[1] == 0:
        return np.zeros(len(codes), dtype=np.int64)
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def eval_queries(eval_set: EvalSet) -> list[np.ndarray]:
    """APE queries of held-out users: each user's history and targets together."""
    return [np.concatenate([h, t]) for h, t in zip(eval_set.histories, eval_set.targets, strict=True)]


def level_report(codes: np.ndarray, level: int, queries: list[np.ndarray]) -> dict[str, float]:
    """APE and bucket sizes of the index truncated at ``level`` (codes [N+1, L], row 0 ignored)."""
    buckets = np.full(len(codes), -1, dtype=np.int64)
    buckets[1:] = group_ids(codes[1:, :level])
    sizes = np.bincount(buckets[1:])
    return {
        "ape": average_partition_entropy(buckets, queries),
        "buckets": len(sizes),
        "bucket_min": int(sizes.min()),
        "bucket_max": int(sizes.max()),
        "bucket_mean": float(sizes.mean()),
    }


class SiblingSampler:
    """Hard negatives (paper 4.3): an item of a sibling leaf (same parent) of the positive's leaf.

    Falls back to another item of the same leaf when the leaf has no sibling, and to a uniform item
    when that leaf holds only the positive.
    """

    def __init__(self, index: TreeIndex, rng: np.random.Generator) -> None:
        self.index = index
        self.rng = rng
        self.leaf_of_item = index.item_path[:, -1].astype(np.int64)  # [N+1] global leaf ids
        self.parent = index.parents()

    def sample(self, positives: np.ndarray) -> np.ndarray:
        """``positives[B] -> [B]`` dense item ids."""
        idx, rng = self.index, self.rng
        leaf = self.leaf_of_item[positives]  # [B] global leaf ids
        first = idx.child_offsets[self.parent[leaf]]  # [B] CSR start of the parent's children
        n_sib = idx.child_offsets[self.parent[leaf] + 1] - first  # leaves under the parent, own included
        own_pos = leaf - idx.child_ids[first]  # from_codes numbers siblings contiguously
        pick = rng.integers(0, np.maximum(n_sib - 1, 1))  # among the other siblings
        pick = np.where(n_sib > 1, pick + (pick >= own_pos), own_pos)
        chosen = idx.child_ids[first + pick] - idx.leaf_start  # [B] 0-based leaf index
        sizes = np.diff(idx.leaf_offsets)
        items = idx.leaf_items[idx.leaf_offsets[chosen] + rng.integers(0, sizes[chosen])]
        lonely = items == positives
        items[lonely] = rng.integers(1, idx.num_items + 1, size=int(lonely.sum()))
        return items
