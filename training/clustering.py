"""Balanced hierarchical clustering (SEATER Algorithm 1) and capacity-constrained assignment.

SEATER builds equal-length identifiers by splitting the item set recursively into ``k`` clusters
of sizes ``floor(n/k)`` or ``floor(n/k)+1`` with constrained k-means. The reference library
(``k-means-constrained``, a min-cost-flow solver) is not installed here and would not scale to a
million items in minutes anyway (its flow graph has ``n * k`` arcs per split, solved one split at
a time). Instead this module runs k-means whose assignment step is the capacity greedy below, on
all the splits of a level at once (the clusters of a level are padded to one ``[G, M, D]`` batch
and scored with one batched matmul), so a level of a 1M-item tree is a few torch ops per
iteration rather than thousands of small solver calls.

Capacity greedy (:func:`capacity_assign`, also used by URI and TDR): items take their best node
in order of confidence (the margin between their best and second-best score); an item finding
its best node full goes to its next choice. This is computed exactly, but vectorised, as deferred
acceptance: every unplaced item proposes to its best node not yet refused to it, each node keeps
the most confident proposers up to its capacity and refuses the rest, until every item is placed.
With one priority order shared by all nodes the result equals the sequential greedy (the stable
matching is unique and is the serial dictatorship); each round is one sort of the proposals.

Fixed depth: every leaf of the index must sit at level L (``TreeIndex.from_codes`` takes
full-length codes). Every cluster is therefore split at every level: a cluster of ``n > k`` items
by balanced k-means, a cluster of ``n <= k`` items into ``n`` singletons (codes ``0..n-1``, which
is SEATER's last step and also the balanced split of ``n <= k`` items, sizes 0 or 1). A cluster
that SEATER would stop early thus continues as single-child chains (code 0) down to level L.
With ``levels=None``, ``L`` is the smallest depth with ``k**L >= N``, so every leaf holds one
item; a smaller ``levels`` leaves buckets of several items in the leaves (URI-style).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class KMeansConfig:
    """Settings of the (balanced) k-means run at every level of the tree."""

    iters: int = 8
    """Lloyd iterations per level (fewer when the assignment stops changing)."""
    balanced_iters: int = 3
    """With ``balanced``, the last this many iterations use the capacity greedy (at least the
    last one always does); the earlier ones are plain Lloyd steps that move the centroids cheaply."""
    tol: float = 1e-3
    """Stop a level when fewer than this fraction of items changed cluster in an iteration."""
    balanced: bool = True
    """False runs plain (unbalanced) k-means: the baseline of ``genret bench cluster``."""

    def __post_init__(self) -> None:
        if self.iters < 1 or not 1 <= self.balanced_iters <= self.iters:
            raise ValueError(f"need 1 <= balanced_iters <= iters, got {self.balanced_iters} and {self.iters}")
        if not 0.0 <= self.tol < 1.0:
            raise ValueError(f"tol must be in [0, 1), got {self.tol}")


# ---------------------------------------------------------------------------- capacity greedy
@overload
def capacity_assign(scores: np.ndarray, capacity: int | np.ndarray | Tensor) -> np.ndarray: ...
@overload
def capacity_assign(scores: Tensor, capacity: int | np.ndarray | Tensor) -> Tensor: ...
def capacity_assign(scores: np.ndarray | Tensor, capacity: int | np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Assign each of N items to one of C nodes, at most ``capacity[c]`` items per node.

    ``scores [N, C]`` (higher = better), ``capacity [C]`` ints (or one int for every node) with
    ``sum >= N`` -> ``[N]`` node index (int64, same kind as ``scores``: numpy in, numpy out).
    Items are placed in order of confidence (best minus second-best score), each on its best node
    that still has room.
    """
    s = torch.as_tensor(scores, dtype=torch.float32).cpu()  # [N, C]
    if s.dim() != 2:
        raise ValueError(f"scores must be [N, C], got shape {tuple(s.shape)}")
    cap = torch.as_tensor(capacity, dtype=torch.int64).cpu()
    if cap.dim() == 0:
        cap = cap.expand(s.shape[1])
    out = capacity_assign_grouped(s, torch.zeros(s.shape[0], dtype=torch.int64), cap[None, :])
    return out.numpy() if isinstance(scores, np.ndarray) else out.to(scores.device)


def capacity_assign_grouped(scores: Tensor, group: Tensor, capacity: Tensor) -> Tensor:
    """Many independent :func:`capacity_assign` problems at once: item i may only take the ``k``
    nodes of its group. ``scores [N, k]``, ``group [N]`` in ``[0, G)``, ``capacity [G, k]`` ->
    ``[N]`` int64 node in ``[0, k)`` (per group the same result as :func:`capacity_assign`)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    group = torch.as_tensor(group, dtype=torch.int64)
    capacity = torch.as_tensor(capacity, dtype=torch.int64)
    if scores.dim() != 2 or group.shape != scores.shape[:1] or capacity.dim() != 2:
        raise ValueError(
            f"need scores [N, k], group [N], capacity [G, k]; got {tuple(scores.shape)}, "
            f"{tuple(group.shape)}, {tuple(capacity.shape)}"
        )
    num_groups, k = capacity.shape
    if k != scores.shape[1]:
        raise ValueError(f"scores have {scores.shape[1]} nodes per item but capacity has {k} per group")
    if scores.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    if int(group.min()) < 0 or int(group.max()) >= num_groups:
        raise ValueError(f"group ids must lie in [0, {num_groups})")
    if (capacity < 0).any():
        raise ValueError("capacities must be >= 0")
    short = torch.bincount(group, minlength=num_groups) > capacity.sum(1)  # [G]
    if short.any():
        bad = int(short.nonzero()[0, 0])
        raise ValueError(
            f"capacities must sum to at least N in every group: group {bad} has "
            f"{int((group == bad).sum())} items and room for {int(capacity[bad].sum())}"
        )
    return _grouped_capacity_assign(scores, group, capacity)


def _confidence_order(scores: Tensor) -> Tensor:
    """``[N]`` priority (0 = placed first): items with the largest best-vs-second margin first."""
    if scores.shape[1] > 1:
        top2 = scores.topk(2, dim=1).values  # [N, 2]
        margin = top2[:, 0] - top2[:, 1]
    else:
        margin = scores[:, 0]
    order = torch.argsort(margin, descending=True, stable=True)
    priority = torch.empty_like(order)
    priority[order] = torch.arange(order.numel())
    return priority


def _grouped_capacity_assign(scores: Tensor, group: Tensor, capacity: Tensor, chunks: int = 16) -> Tensor:
    """Capacity greedy within groups: item i may only take the ``k`` nodes of ``group[i]``.

    ``scores [N, k]``, ``group [N]`` in ``[0, G)``, ``capacity [G, k]`` -> ``[N]`` local node in ``[0, k)``.
    Items are taken in priority order in ``chunks`` slices; an earlier slice is never displaced by a
    later one (it has higher priority), so each slice runs deferred acceptance against the room
    left by the earlier slices, with full nodes refused up front.
    """
    with _one_thread():
        return _grouped_capacity_assign_1t(scores, group, capacity, chunks)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the greedy's many small gathers and sorts on one intra-op thread: they are memory bound,
    and on a busy machine torch's thread pool makes them an order of magnitude slower (figures:
    docs/results.md, "Trainer: tree building")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _grouped_capacity_assign_1t(scores: Tensor, group: Tensor, capacity: Tensor, chunks: int) -> Tensor:
    n, k = scores.shape
    priority = _confidence_order(scores)  # [N]
    by_priority = torch.argsort(priority)  # [N] items, most confident first
    room = capacity.reshape(-1).clone()  # [G*k] places left
    result = torch.empty(n, dtype=torch.int64)
    step = max(1, -(-n // chunks))
    for begin in range(0, n, step):
        items = by_priority[begin : begin + step]  # [P]
        offset = group[items] * k  # [P] global node of local node 0
        work = scores[items].masked_fill(
            room[offset[:, None] + torch.arange(k)] == 0, float("-inf")
        )  # [P, k]
        nodes = _deferred_acceptance(work, offset, priority[items], room)
        result[items] = nodes - offset
        room -= torch.bincount(nodes, minlength=room.numel())
    return result


def _deferred_acceptance(work: Tensor, offset: Tensor, priority: Tensor, room: Tensor) -> Tensor:
    """Every unplaced item proposes to its best node not yet refused to it; each node keeps the
    highest-priority proposers up to ``room`` and refuses the rest; repeat until all are placed.

    ``work [P, k]`` scores with refused nodes at -inf (updated in place), ``offset [P]``, ``priority
    [P]`` (lower first), ``room [G*k]`` -> ``[P]`` global node of each item.
    """
    p = work.shape[0]
    held = torch.full((p,), -1, dtype=torch.int64)  # [P] global node holding each item
    proposers = torch.arange(p)
    while proposers.numel():
        best, choice = work[proposers].max(dim=1)
        if torch.isneginf(best).any():
            raise ValueError("capacity_assign: a group has less capacity than items (or a score is -inf)")
        node = offset[proposers] + choice  # [P']
        touched = torch.zeros(room.numel(), dtype=torch.bool)
        touched[node] = True
        incumbents = ((held >= 0) & touched[held.clamp(min=0)]).nonzero().squeeze(1)
        items = torch.cat([incumbents, proposers])
        nodes = torch.cat([held[incumbents], node])
        order = torch.argsort(nodes * p + priority[items])  # by node, then priority
        items, nodes = items[order], nodes[order]
        rank = torch.arange(items.numel()) - _run_starts(nodes)  # rank of each item inside its node
        accepted = rank < room[nodes]
        held[items[accepted]] = nodes[accepted]
        losers = items[~accepted]
        held[losers] = -1
        work[losers, nodes[~accepted] - offset[losers]] = float("-inf")
        proposers = losers
    return held


# ---------------------------------------------------------------------------- balanced k-means
def _split_groups(
    x: Tensor, group: Tensor, num_groups: int, k: int, cfg: KMeansConfig, gen: torch.Generator
) -> Tensor:
    """Split every group of more than ``k`` items into ``k`` clusters at once.

    ``x [N, D]`` items of those groups, ``group [N]`` dense in ``[0, G)`` -> ``[N]`` cluster in ``[0, k)``.
    Balanced: group g of n items gets clusters of sizes floor(n/k) or floor(n/k)+1.
    """
    n, d = x.shape
    order = torch.argsort(group, stable=True)
    sizes = torch.bincount(group, minlength=num_groups)  # [G]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(n) - _run_starts(group[order])  # [N] position of each item inside its group
    # Items are packed into rows of at most R items of one group, so that one batched matmul scores
    # every item against its own group's centroids. R = the mean group size keeps the padding under
    # one row per group even when the groups are very unequal (plain k-means).
    width = int(-(-n // num_groups))  # R
    if int(sizes.max()) <= width + 1:
        width = int(sizes.max())
    rows_per_group = -(-sizes // width)  # [G]
    first_row = torch.cumsum(rows_per_group, 0) - rows_per_group  # [G]
    row = first_row[group] + torch.div(pos, width, rounding_mode="floor")  # [N]
    col = pos % width  # [N]
    num_rows = int(rows_per_group.sum())
    row_group = torch.repeat_interleave(torch.arange(num_groups), rows_per_group)  # [rows]
    packed = torch.zeros(num_rows, width, d)  # [rows, R, D]
    packed[row, col] = x

    # init: k distinct random members of each group (every group has more than k items)
    shuffled = torch.argsort(
        group.double() + torch.rand(n, generator=gen, dtype=torch.float64)
    )  # by group, random
    slot = torch.arange(n) - _run_starts(group[shuffled])
    pick = shuffled[slot < k]  # [G*k], grouped
    centroids = torch.empty(num_groups, k, d)  # [G, k, D]
    centroids[group[pick], slot[slot < k]] = x[pick]

    base = sizes // k  # [G]
    extra = sizes % k  # [G] clusters that get one more item
    assign = torch.full((n,), -1, dtype=torch.int64)
    balanced_left = cfg.balanced_iters if cfg.balanced else 0
    plain_left = cfg.iters - balanced_left
    while plain_left or balanced_left:
        balanced_step = plain_left == 0
        # score = -||x - c||^2 + ||x||^2 = 2 x.c - ||c||^2   [G, M, k]
        sq = (centroids * centroids).sum(-1)  # [G, k]
        rows_c = centroids[row_group]  # [rows, k, D]
        scores_rows = torch.baddbmm(-sq[row_group][:, None, :], packed, rows_c.transpose(1, 2), alpha=2.0)
        scores = scores_rows[row, col]  # [N, k]
        del scores_rows, rows_c
        if balanced_step:
            demand = torch.zeros(num_groups, k, dtype=torch.int64)
            demand.index_put_((group, scores.argmax(1)), torch.ones(n, dtype=torch.int64), accumulate=True)
            rank = torch.argsort(torch.argsort(demand, dim=1, descending=True, stable=True), dim=1)  # [G, k]
            capacity = base[:, None] + (rank < extra[:, None]).long()  # [G, k]
            new = _grouped_capacity_assign(scores, group, capacity)
        else:
            new = scores.argmax(1)
        changed = int((new != assign).sum())
        assign = new
        flat = group * k + assign  # [N]
        sums = torch.zeros(num_groups * k, d).index_add_(0, flat, x)
        counts = torch.bincount(flat, minlength=num_groups * k).to(x.dtype)
        filled = counts > 0
        centroids = centroids.reshape(num_groups * k, d)
        centroids[filled] = sums[filled] / counts[filled, None]  # empty clusters keep their centroid
        centroids = centroids.reshape(num_groups, k, d)
        if balanced_step:
            balanced_left -= 1
        else:
            plain_left -= 1
        if changed <= cfg.tol * n:
            if balanced_step or not cfg.balanced:
                break
            plain_left = 0  # the plain steps converged: go on to the balanced ones
    return assign


def tree_codes(
    emb: np.ndarray | Tensor,
    k: int,
    levels: int | None = None,
    seed: int = 0,
    config: KMeansConfig | None = None,
) -> np.ndarray:
    """Hierarchical k-means codes ``[N+1, L]`` (row 0 = -1) of item embeddings ``emb [N+1, D]``.

    Every level splits every cluster into at most ``k`` children (see the module docstring);
    codes are level-local cluster indices, ready for ``TreeIndex.from_codes(codes, k, ...)``.
    """
    cfg = config or KMeansConfig()
    x_all = torch.as_tensor(np.asarray(emb) if isinstance(emb, np.ndarray) else emb, dtype=torch.float32)
    if x_all.dim() != 2 or x_all.shape[0] < 2:
        raise ValueError(f"emb must be [N+1, D] with N >= 1 (row 0 = padding), got {tuple(x_all.shape)}")
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    x = x_all[1:]  # [N, D]
    n = x.shape[0]
    if levels is None:
        levels = 1
        while k**levels < n:
            levels += 1
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    gen = torch.Generator().manual_seed(seed)
    codes = torch.full((n + 1, levels), -1, dtype=torch.int64)
    group = torch.zeros(n, dtype=torch.int64)  # [N] dense cluster id at the current level
    num_groups = 1
    with torch.no_grad():
        for level in range(levels):
            sizes = torch.bincount(group, minlength=num_groups)
            local = torch.empty(n, dtype=torch.int64)
            big = sizes[group] > k  # [N] items of clusters that k-means splits
            if (~big).any():  # clusters of <= k items: one singleton child per item
                small_items = (~big).nonzero().squeeze(1)
                g = group[small_items]
                order = torch.argsort(g, stable=True)
                rank = torch.empty_like(order)
                rank[order] = torch.arange(order.numel()) - _run_starts(g[order])
                local[small_items] = rank
            if big.any():
                big_items = big.nonzero().squeeze(1)
                big_groups, dense = torch.unique(group[big_items], return_inverse=True)
                local[big_items] = _split_groups(x[big_items], dense, big_groups.numel(), k, cfg, gen)
            codes[1:, level] = local
            group = torch.unique(group * k + local, return_inverse=True)[1]
            num_groups = int(group.max()) + 1
    return codes.numpy()


def _run_starts(sorted_keys: Tensor) -> Tensor:
    """``sorted_keys [M]`` -> ``[M]`` index of the first element of each element's run of equal keys."""
    pos = torch.arange(sorted_keys.numel())
    is_start = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), dim=0).values


def balanced_tree_codes(
    emb: np.ndarray | Tensor, k: int, levels: int | None = None, seed: int = 0, iters: int = 8
) -> np.ndarray:
    """SEATER Algorithm 1: balanced hierarchical codes ``[N+1, L]`` (row 0 = -1) from ``emb [N+1, D]``."""
    config = KMeansConfig(iters=iters, balanced_iters=min(3, iters), balanced=True)
    return tree_codes(emb, k, levels=levels, seed=seed, config=config)


def level_sizes(codes: np.ndarray) -> list[tuple[int, int, int]]:
    """Per level: (number of clusters, min size, max size) in items, from codes ``[N+1, L]``."""
    body = np.asarray(codes)[1:]
    out = []
    for level in range(body.shape[1]):
        _, counts = np.unique(body[:, : level + 1], axis=0, return_counts=True)
        out.append((int(counts.size), int(counts.min()), int(counts.max())))
    return out
