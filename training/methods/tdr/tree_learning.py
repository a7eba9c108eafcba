"""TDR tree learning (paper section 6): with the preference model fixed, reassign items to leaves.

The tree's shape (its nodes, and the number of leaves under each) is kept; only the item -> leaf
mapping ``pi`` changes, so node ids and node embeddings stay valid. Items start at the root and move
down ``step`` levels at a time (the paper's ``d``): an item assigned to node ``p`` at level ``l``
chooses among ``p``'s descendants at level ``l' = min(L, l + step)`` the one with the highest

    Score(item, n) = sum over the item's training pairs (u, item) of log softmax_{n' in cand(p)} f(u, n')   (eq. 24)

under the capacity of each descendant (the number of leaf slots below it), overflowing to the next
best (``training.clustering.capacity_assign``). After the leaf level every item holds one slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from models.index import TreeIndex
from training.clustering import capacity_assign

log = logging.getLogger(__name__)

# (histories[K, T] int64, candidates[K, C] global node ids, -1 padded) -> scores[K, C] (model fixed)
HistoryScorer = Callable[[Tensor, Tensor], Tensor]


def descendants_at(index: TreeIndex, level: int, target_level: int) -> tuple[np.ndarray, np.ndarray]:
    """Descendants at ``target_level`` of every node of ``level``.

    -> (table [n_level, C] global ids, -1 padded, sorted ascending; capacity [num_nodes] leaf slots
    (items of the current tree) below every node of ``target_level``, 0 elsewhere).
    """
    lo = index.level_offsets
    parent = index.parents()
    nodes = np.arange(lo[target_level], lo[target_level + 1])  # [n_target]
    anc = nodes.copy()
    for _ in range(target_level - level):
        anc = parent[anc]
    local = anc - lo[level]  # [n_target] row of the ancestor
    counts = np.bincount(local, minlength=int(lo[level + 1] - lo[level]))
    table = np.full((counts.size, max(int(counts.max()), 1)), -1, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.argsort(local, kind="stable")
    col = np.arange(nodes.size) - np.repeat(starts, counts)
    table[local[order], col] = nodes[order]
    capacity = np.zeros(index.num_nodes, np.int64)
    if target_level == index.levels:
        capacity[nodes] = np.diff(index.leaf_offsets)
    else:
        capacity += np.bincount(index.item_path[1:, target_level - 1], minlength=index.num_nodes)
    return table, capacity


@torch.no_grad()
def item_node_scores(
    score: HistoryScorer,
    histories: np.ndarray,
    targets: np.ndarray,
    candidates: np.ndarray,
    num_items: int,
    batch_size: int = 1024,
) -> np.ndarray:
    """Eq. 24 for one step: ``[N+1, C]`` summed log-softmax of each item's pairs over its candidates.

    histories: [P, T] the users of the pairs; targets: [P] their items; candidates: [N+1, C] the
    candidate nodes of every item (-1 padded) -> scores [N+1, C] (-inf at padding, 0 for items with
    no pair, so that they take whatever capacity is left).
    """
    total = torch.zeros((num_items + 1, candidates.shape[1]), dtype=torch.float64)
    cand_all = torch.from_numpy(candidates)
    for start in range(0, len(targets), batch_size):
        t = torch.from_numpy(targets[start : start + batch_size])  # [K]
        cand = cand_all[t]  # [K, C]
        s = score(torch.from_numpy(histories[start : start + batch_size]), cand).float()  # [K, C]
        logp = torch.log_softmax(s.masked_fill(cand < 0, float("-inf")), dim=1)
        total.index_add_(0, t, logp.masked_fill(cand < 0, 0.0).double())
    return total.masked_fill(cand_all < 0, float("-inf")).numpy()


def learn_tree(
    index: TreeIndex,
    codes: np.ndarray,
    score: HistoryScorer,
    histories: np.ndarray,
    targets: np.ndarray,
    step: int,
    batch_size: int = 1024,
) -> tuple[np.ndarray, dict[str, float]]:
    """One tree-learning pass. index/codes: the current tree and its codes [N+1, L]; histories [P, T]
    and targets [P]: training pairs (already subsampled by the caller) -> (new codes [N+1, L] on the
    same set of leaf codes, stats: "moved" = share of items whose leaf changed, "prefer_current_level<l>" =
    share of items whose best node by eq. 24 at level l, before capacities, is their current one).
    """
    if step < 1:
        raise ValueError(f"tree learning step must be >= 1, got {step}")
    num_items, num_levels = index.num_items, index.levels
    leaf_code = np.zeros((index.num_leaves, num_levels), np.int64)
    leaf_code[index.leaf_of_item()[1:]] = codes[1:]
    assigned = np.zeros(num_items + 1, np.int64)  # global node per item; all at the root
    stats: dict[str, float] = {}
    level = 0
    while level < num_levels:
        target_level = min(num_levels, level + step)
        table, capacity = descendants_at(index, level, target_level)
        cand = np.full((num_items + 1, table.shape[1]), -1, np.int64)
        cand[1:] = table[assigned[1:] - index.level_offsets[level]]
        scores = item_node_scores(score, histories, targets, cand, num_items, batch_size)  # [N+1, C]
        old_node = index.item_path[1:, target_level - 1]  # [N] the items' nodes in the current tree
        top = cand[1:][np.arange(num_items), scores[1:].argmax(axis=1)]  # [N] best candidate by eq. 24
        stats[f"prefer_current_level{target_level}"] = float((top == old_node).mean())
        new_assigned = np.zeros_like(assigned)
        for parent in np.unique(assigned[1:]):
            items = np.flatnonzero(assigned == parent)
            items = items[items > 0]
            row = table[parent - index.level_offsets[level]]
            row = row[row >= 0]  # [c] the parent's descendants
            choice = capacity_assign(scores[items][:, : row.size], capacity[row])  # [n] index into row
            new_assigned[items] = row[choice]
        assigned = new_assigned
        log.info(
            "tree learning: items assigned to level %d of %d (%.1f%% prefer their current node)",
            target_level,
            num_levels,
            100 * stats[f"prefer_current_level{target_level}"],
        )
        level = target_level
    new_codes = np.zeros_like(codes)
    new_codes[1:] = leaf_code[assigned[1:] - index.leaf_start]
    stats["moved"] = float((assigned[1:] != index.item_path[1:, -1]).mean())
    return new_codes, stats
