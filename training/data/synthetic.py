"""Synthetic interaction data with planted hierarchical item clusters (tests, demos, quick runs)."""

from __future__ import annotations

import numpy as np

from training.data.dataset import ItemVocab, SyntheticDataset


def synthetic_dataset(
    num_users: int = 2000,
    num_items: int = 500,
    branching: int = 4,
    depth: int = 2,
    seed: int = 0,
    *,
    min_len: int = 6,
    max_len: int = 20,
    clusters_per_user: int = 2,
    follow_prob: float = 0.8,
) -> SyntheticDataset:
    """Users walking through planted hierarchical item clusters.

    The ``branching ** depth`` leaf clusters each hold a contiguous block of items in a fixed
    order. A user picks a level-1 subtree and ``clusters_per_user`` leaves inside it, starts at a
    random item and, with probability ``follow_prob``, next takes the successor of the last item
    in its cluster's order (otherwise a random item of another of its leaves). A sequential model
    learns the successor rule; popularity cannot, so it loses by a wide margin.
    """
    if branching < 2 or depth < 1:
        raise ValueError(f"need branching >= 2 and depth >= 1, got branching={branching} depth={depth}")
    num_leaves = branching**depth
    if num_items < num_leaves:
        raise ValueError(f"num_items={num_items} is fewer than the {num_leaves} leaf clusters")
    if not 2 <= min_len <= max_len:
        raise ValueError(f"need 2 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = np.random.default_rng(seed)
    leaf_of_item = np.sort(rng.permutation(np.arange(num_items) % num_leaves))  # [N] contiguous blocks
    leaf_start = np.searchsorted(leaf_of_item, np.arange(num_leaves))
    leaf_size = np.bincount(leaf_of_item, minlength=num_leaves)
    clusters = np.full((num_items + 1, depth), -1, dtype=np.int64)  # [N+1, depth]
    for level in range(depth):
        clusters[1:, level] = leaf_of_item // branching ** (depth - 1 - level)
    leaves_per_top = num_leaves // branching
    k = min(clusters_per_user, leaves_per_top)
    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    sequences: list[np.ndarray] = []
    for u in range(num_users):
        top = rng.integers(branching)
        leaves = top * leaves_per_top + rng.choice(leaves_per_top, size=k, replace=False)
        leaf = int(leaves[0])
        pos = int(rng.integers(leaf_size[leaf]))
        seq = np.empty(lengths[u], dtype=np.int64)
        for t in range(lengths[u]):
            seq[t] = 1 + leaf_start[leaf] + pos
            if rng.random() < follow_prob:
                pos = (pos + 1) % int(leaf_size[leaf])
            else:
                leaf = int(rng.choice(leaves))
                pos = int(rng.integers(leaf_size[leaf]))
        sequences.append(seq)
    return SyntheticDataset(
        name=f"synthetic-u{num_users}-i{num_items}-b{branching}-d{depth}-s{seed}",
        user_ids=[str(u) for u in range(num_users)],
        sequences=sequences,
        vocab=ItemVocab(["", *(str(i) for i in range(1, num_items + 1))]),
        item_clusters=clusters,
        branching=branching,
    )
