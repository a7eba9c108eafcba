"""The arrays of the tree a catalogue version carries beside its index
(:mod:`models.catalogue.catalogue`): items below every node, the sums of unit item vectors below
them (placement's centroids), children as CSR, and the leaves' live items."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from models.catalogue.descent import unit_rows
from models.index import TreeIndex

CENTROID_CHUNK = 1 << 16  # items per step of the version-0 centroid sums (bounds its temporaries)


def subtree_counts(index: TreeIndex) -> np.ndarray:
    """``[num_nodes]`` items below every node (the root holds all)."""
    counts = np.bincount(index.item_path[1:].astype(np.int64).reshape(-1), minlength=index.num_nodes)
    counts[0] = index.num_items
    return counts.astype(np.int64)


def summed_levels(index: TreeIndex, centroid_sum: np.ndarray) -> int:
    """Levels whose nodes have centroid sums: all L with buckets, the internal L-1 with single-item leaves."""
    return index.levels if centroid_sum.shape[0] > index.leaf_start else index.levels - 1


def centroid_sums(index: TreeIndex, emb: np.ndarray, *, unit: bool = True) -> np.ndarray:
    """``[S, Dr]`` float64: the sum of unit item vectors below each node (``unit=False``: of the
    vectors as they are). ``S = num_nodes`` when leaves hold several items (URI buckets: placement
    compares bucket centroids), else the internal nodes only (a single-item leaf's centroid is its item).

    The deepest summed level is one ``reduceat`` over the items sorted by leaf (sorted by every
    ancestor too: node ids follow the code prefix); each level above sums its children's rows."""
    buckets = int(np.diff(index.leaf_offsets).max()) > 1
    deepest = index.levels if buckets else index.levels - 1
    sums = np.zeros((index.num_nodes if buckets else index.leaf_start, emb.shape[1]), np.float64)
    order = index.leaf_items  # [N] dense ids sorted by leaf
    if deepest >= 1:  # in chunks of items: no [N, Dr] temporaries (at 1M items: ~0.5 GiB of peak RSS)
        for begin in range(0, len(order), CENTROID_CHUNK):
            rows = order[begin : begin + CENTROID_CHUNK]  # [c] a run of the leaf order
            nodes = index.item_path[rows, deepest - 1].astype(np.int64)  # [c] non-decreasing
            starts = np.flatnonzero(np.r_[True, nodes[1:] != nodes[:-1]])  # distinct nodes: += is safe
            vectors = unit_rows(emb[rows]) if unit else np.asarray(emb[rows], np.float64)
            sums[nodes[starts]] += np.add.reduceat(vectors, starts, axis=0)
    lo, co = index.level_offsets, index.child_offsets
    for level in range(deepest - 1, -1, -1):  # level's nodes from their children's sums
        first, last = int(lo[level]), int(lo[level + 1])
        kids = index.child_ids[co[first] : co[last]]  # children of the level's nodes, grouped by parent
        counts = np.diff(co[first : last + 1])
        _add_grouped(sums, kids, counts, first)
    return sums


def added_sums(
    index: TreeIndex,
    live_count: np.ndarray,
    centroid_sum: np.ndarray,
    paths: np.ndarray,
    vectors: np.ndarray,
    new_leaves: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The live counts and centroid sums after adding items with ``paths [M, L]`` (node per level,
    the new leaves' ids included) and ``vectors [M, Dr]``; ``new_leaves`` nodes appended after the
    tree's ``num_nodes``. New arrays; the inputs are left as they are."""
    counts = np.concatenate([live_count, np.zeros(new_leaves, np.int64)])
    counts += np.bincount(paths.reshape(-1), minlength=len(counts))
    counts[0] += len(paths)
    summed = summed_levels(index, centroid_sum)
    extra_rows = new_leaves if summed == index.levels else 0
    sums = np.concatenate([centroid_sum, np.zeros((extra_rows, vectors.shape[1]))])
    unit = unit_rows(vectors)
    for level in range(summed):
        add_rows(sums, paths[:, level], unit)
    return counts, sums


def add_rows(target: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """``target[rows[i]] += values[i]`` for every i, repeated rows summed (``np.add.at``'s meaning,
    by one sort and a segment sum: ``np.add.at`` took 0.7 s for 100k rows of 64)."""
    if len(rows) == 0:
        return
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    target[sorted_rows[starts]] += np.add.reduceat(values[order].astype(target.dtype), starts, axis=0)


def _add_grouped(sums: np.ndarray, kids: np.ndarray, counts: np.ndarray, first: int) -> None:
    """``sums[first + j] += sums[kids of j]``, kids grouped by their parent ``j`` (one ``reduceat``)."""
    full = np.flatnonzero(counts > 0)
    starts = (np.cumsum(counts) - counts)[full]
    sums[first + full] += np.add.reduceat(sums[kids], starts, axis=0)


def children_csr(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``parent [num_nodes]`` -> ``(child_offsets [num_nodes+1], child_ids [num_nodes-1])``; children of
    a node in id order (a stable sort keeps the bundle's order, then the added leaves)."""
    n = len(parent)
    child_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(parent[1:], minlength=n), out=child_offsets[1:])
    child_ids = (np.argsort(parent[1:], kind="stable") + 1).astype(np.int64)
    return child_offsets, child_ids


def live_leaves(index: TreeIndex, leaf_of: np.ndarray, live: np.ndarray) -> TreeIndex:
    """``index`` with ``leaf_offsets``/``leaf_items`` holding the live items only (a leaf may be empty)."""
    num_leaves = index.num_nodes - index.leaf_start
    items = np.flatnonzero(live)  # [n] ascending
    leaf = leaf_of[items] - index.leaf_start  # [n]
    order = np.argsort(leaf, kind="stable")
    leaf_offsets = np.zeros(num_leaves + 1, np.int64)
    np.cumsum(np.bincount(leaf, minlength=num_leaves), out=leaf_offsets[1:])
    return replace(index, leaf_offsets=leaf_offsets, leaf_items=items[order].astype(np.int64))
