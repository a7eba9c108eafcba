"""The descent of placement (:mod:`models.catalogue.placement`): from the root, level by level, an
added item's unit vector against the centroids of the children of the ``DESCENT_WIDTH`` best nodes
so far, batched over the delta's items; it yields the best parents of leaves, best first."""

from __future__ import annotations

import numpy as np

from models.index import TreeIndex

DESCENT_WIDTH = 4  # parents of leaves tried per added item, best first
CHUNK = 1024  # items per batched descent step (bounds the [m, width*C, Dr] gather)
GROUPED_NODES = 512  # beam nodes in a chunk up to which their children are scored node by node
DENSE_LEVEL_FACTOR = 4  # a level of at most this many times the kids scored is scored whole (one matmul)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero): ``[M, D] -> [M, D]`` float32."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def candidate_parents(index: TreeIndex, centroid_sum: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """``unit [M, Dr]`` -> ``[M, P]`` parents of leaves (level L-1 nodes), best first, -1 padded;
    ``centroid_sum [S, Dr]``: the unit-vector sums of nodes 0..S-1 (S >= ``index.leaf_start``)."""
    M = unit.shape[0]
    if index.levels == 1:
        return np.zeros((M, 1), np.int64)
    centroids = unit_rows(centroid_sum[: index.leaf_start]).astype(np.float32)  # [S, Dr]
    out = np.full((M, DESCENT_WIDTH), -1, np.int64)
    co, ci, lo_ = index.child_offsets, index.child_ids, index.level_offsets
    counts = np.diff(co)
    width = int(counts[: index.leaf_start].max())
    slot = np.arange(width)
    for lo in range(0, M, CHUNK):
        u = unit[lo : lo + CHUNK]  # [m, Dr]
        beams = np.zeros((len(u), 1), np.int64)  # [m, w] at the root
        for level in range(1, index.levels):  # the kids' level
            start, count = co[beams.clip(0)], counts[beams.clip(0)] * (beams >= 0)  # [m, w]
            ok = slot[None, None, :] < count[:, :, None]  # [m, w, C]
            kids = np.where(ok, ci[(start[:, :, None] + slot).clip(max=len(ci) - 1)], -1).reshape(len(u), -1)
            first, last = int(lo_[level]), int(lo_[level + 1])
            if last - first <= DENSE_LEVEL_FACTOR * kids.shape[1]:  # a matmul with the level, then the kids
                whole = u @ centroids[first:last].T  # [m, n_level]
                score = np.take_along_axis(whole, (kids - first).clip(0, last - first - 1), 1)
            else:
                score = _kid_scores(u, beams, width, centroids, co, ci)  # [m, w*C]
            score = np.where(kids >= 0, score, -np.inf)
            top = best_columns(score, DESCENT_WIDTH)
            beams = np.where(
                np.take_along_axis(score, top, 1) > -np.inf, np.take_along_axis(kids, top, 1), -1
            )
        out[lo : lo + len(u), : beams.shape[1]] = beams
    return out


def _kid_scores(
    u: np.ndarray, beams: np.ndarray, width: int, centroids: np.ndarray, co: np.ndarray, ci: np.ndarray
) -> np.ndarray:
    """``u [m, Dr]`` against the centroids of the children of each row's ``beams [m, w]`` (child s of
    beam j in column ``j * width + s``): ``[m, w * width]``, unset columns 0. Rows sharing a beam node
    are scored together, one small matmul per node, when few nodes are shared (no ``[m, w*C, Dr]``
    gather: at 1,024 rows and 400 children that copy is 100 MB per chunk); else the gather."""
    m, w = beams.shape
    nodes = beams.reshape(-1)
    order = np.argsort(nodes, kind="stable")
    unique, begin = np.unique(nodes[order], return_index=True)
    if len(unique) > GROUPED_NODES:
        kids = np.where(
            np.arange(width) < (co[nodes + 1] - co[nodes])[:, None],
            ci[(co[nodes][:, None] + np.arange(width)).clip(max=len(ci) - 1)],
            -1,
        ).reshape(m, -1)
        return np.einsum("md,mcd->mc", u, centroids[kids.clip(0)])
    score = np.zeros((m, w * width), np.float32)
    end = np.append(begin[1:], len(nodes))
    for node, b, e in zip(unique.tolist(), begin.tolist(), end.tolist(), strict=True):
        if node < 0:
            continue
        pairs = order[b:e]
        rows, slots = pairs // w, pairs % w
        children = ci[co[node] : co[node + 1]]
        cols = slots[:, None] * width + np.arange(len(children))  # [r, c]
        score[rows[:, None], cols] = u[rows] @ centroids[children].T
    return score


def best_columns(score: np.ndarray, k: int) -> np.ndarray:
    """``score [m, n]`` -> ``[m, min(k, n)]`` the columns of each row's k highest scores, best first,
    without sorting all n. Among equal scores the order is by column; which of several equal scores
    at the k-th place is kept is up to the partition, deterministic for the same input."""
    n = score.shape[1]
    if n > k:
        cols = np.argpartition(-score, k - 1, axis=1)[:, :k]
    else:
        cols = np.broadcast_to(np.arange(n), score.shape)
    order = np.lexsort((cols, -np.take_along_axis(score, cols, 1)), axis=-1)
    return np.take_along_axis(cols, order, 1)
