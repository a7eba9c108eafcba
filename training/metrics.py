"""Offline ranking metrics and the Average Partition Entropy of an index.

Ranking metrics take ``ranked [B, K]`` (dense item ids, best first; ``0`` or ``-1`` = no item)
and ``targets`` (one array of relevant dense ids per row, treated as a set). Each is the mean
over the rows that have at least one target:

* ``recall@k`` = |top-k ∩ targets| / |targets|
* ``hr@k`` = 1 if top-k ∩ targets is not empty
* ``ndcg@k`` = DCG / ideal DCG with DCG = Σ_{hits at rank r (0-based) < k} 1 / log2(r + 2) and the
  ideal DCG over the first min(|targets|, k) ranks.

An item repeated within a row counts once, at its first rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (10, 20, 50)
LOO_KS: tuple[int, ...] = (5, 10, 20)
"""Leave-one-out reports the cut-offs the literature reports on that protocol (one target per user)."""


def split_ks(kind: str) -> tuple[int, ...]:
    """The cut-offs a split's test metrics are reported at: ``loo`` -> :data:`LOO_KS`, else :data:`DEFAULT_KS`."""
    return LOO_KS if kind == "loo" else DEFAULT_KS


def _hit_matrix(ranked: np.ndarray, targets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``hits [B, K]`` (True where the ranked item is a not-yet-seen target) and ``sizes [B]``."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be [B, K], got shape {ranked.shape}")
    if len(targets) != ranked.shape[0]:
        raise ValueError(f"{ranked.shape[0]} ranked rows but {len(targets)} target sets")
    hits = np.zeros(ranked.shape, dtype=bool)
    sizes = np.zeros(ranked.shape[0], dtype=np.int64)
    for b, (row, target) in enumerate(zip(ranked, targets, strict=True)):
        target = np.unique(np.asarray(target))
        target = target[target > 0]
        sizes[b] = len(target)
        if not len(target):
            continue
        _, first = np.unique(row, return_index=True)
        first_seen = np.zeros(len(row), dtype=bool)
        first_seen[first] = True
        hits[b] = first_seen & (row > 0) & np.isin(row, target)
    return hits, sizes


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _recall(hits: np.ndarray, sizes: np.ndarray, k: int) -> float:
    valid = sizes > 0
    if not valid.any():
        return 0.0
    return float((hits[valid, :k].sum(axis=1) / sizes[valid]).mean())


def _hr(hits: np.ndarray, sizes: np.ndarray, k: int) -> float:
    valid = sizes > 0
    if not valid.any():
        return 0.0
    return float(hits[valid, :k].any(axis=1).mean())


def _ndcg(hits: np.ndarray, sizes: np.ndarray, k: int) -> float:
    valid = sizes > 0
    if not valid.any():
        return 0.0
    width = min(k, hits.shape[1])
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]
    dcg = (hits[valid, :width] * discount[:width]).sum(axis=1)
    ideal = np.cumsum(discount)[np.minimum(sizes[valid], k) - 1]
    return float((dcg / ideal).mean())


def per_user_recall(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> np.ndarray:
    """``[rows with a target]`` each row's recall@k (their mean is :func:`recall_at_k`)."""
    _check_k(k)
    hits, sizes = _hit_matrix(ranked, targets)
    valid = sizes > 0
    return hits[valid, :k].sum(axis=1) / sizes[valid]


def recall_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    _check_k(k)
    return _recall(*_hit_matrix(ranked, targets), k)


def hr_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    _check_k(k)
    return _hr(*_hit_matrix(ranked, targets), k)


def ndcg_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    _check_k(k)
    return _ndcg(*_hit_matrix(ranked, targets), k)


def evaluate_ranking(
    ranked: np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """``{"recall@10": .., "ndcg@10": .., "hr@10": .., ...}`` for every k in ``ks``."""
    hits, sizes = _hit_matrix(ranked, targets)
    out: dict[str, float] = {}
    for k in ks:
        _check_k(k)
        out[f"recall@{k}"] = _recall(hits, sizes, k)
        out[f"ndcg@{k}"] = _ndcg(hits, sizes, k)
        out[f"hr@{k}"] = _hr(hits, sizes, k)
    return out


def label_groups(label_of_item: np.ndarray) -> list[np.ndarray]:
    """Items grouped by label (``label_of_item [N+1]``, row 0 and labels < 0 ignored).

    Each label acts as one APE query whose positive items are the items carrying that label.
    """
    labels = np.asarray(label_of_item)
    items = np.arange(len(labels))
    keep = (items > 0) & (labels >= 0)
    items, labels = items[keep], labels[keep]
    order = np.argsort(labels, kind="stable")
    items, labels = items[order], labels[order]
    bounds = np.flatnonzero(np.diff(labels)) + 1
    return [g for g in np.split(items, bounds) if len(g)]


def average_partition_entropy(
    leaf_of_item: np.ndarray, positives: Sequence[np.ndarray] | np.ndarray
) -> float:
    """Average Partition Entropy (URI paper, section 3, eq. 3) of an item -> leaf mapping.

    ``APE(Idx) = E_x [H(Q_x)]`` where, for a query ``x`` with positive items ``Y_x``,
    ``Q_x = [n_1/n, ..., n_k/n]`` is the distribution of those items over the leaves and
    ``H`` the (natural-log) entropy. Lower is better; it is meaningful only for balanced indexes
    (one leaf for everything gives 0).

    ``leaf_of_item [N+1]``: the leaf of each dense item id (row 0 and values < 0 ignored).
    ``positives``: one array of dense item ids per query (for example each user's items, or the
    targets of an EvalSet); or a ``label_of_item [N+1]`` array, whose labels (categories,
    planted clusters) then act as the queries (see :func:`label_groups`). Items are counted
    once per query; queries with no indexed item are left out of the mean.
    """
    leaves = np.asarray(leaf_of_item)
    if leaves.ndim != 1:
        raise ValueError(f"leaf_of_item must be [N+1], got shape {leaves.shape}")
    groups: Sequence[np.ndarray]
    if isinstance(positives, np.ndarray) and positives.dtype != object:
        groups = label_groups(positives)
    else:
        groups = list(positives)
    entropies: list[float] = []
    for group in groups:
        items = np.unique(np.asarray(group, dtype=np.int64))
        items = items[(items > 0) & (items < len(leaves))]
        item_leaves = leaves[items]
        item_leaves = item_leaves[item_leaves >= 0]
        if not len(item_leaves):
            continue
        _, counts = np.unique(item_leaves, return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies)) if entropies else 0.0
