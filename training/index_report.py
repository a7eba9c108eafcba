"""Average Partition Entropy rows of indexes built different ways (URI paper, Table 2), for
``genret index-report``: buckets of every item at every level of an index, a random balanced index,
item labels (planted clusters, or category paths from item attributes) and one APE row per index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.data import Dataset, SyntheticDataset
from training.metrics import average_partition_entropy


def level_buckets(codes: np.ndarray) -> np.ndarray:
    """``codes [N+1, L]`` (row 0 ignored) -> ``[N+1, L]`` bucket id of every item at every level (row 0 = -1)."""
    out = np.full(codes.shape, -1, dtype=np.int64)
    for level in range(codes.shape[1]):
        _, inverse = np.unique(codes[1:, : level + 1], axis=0, return_inverse=True)
        out[1:, level] = inverse.reshape(-1)
    return out


def random_codes(num_items: int, k: int, levels: int, seed: int) -> np.ndarray:
    """A random balanced index: items dealt into ``k^L`` leaves, ``[N+1, L]`` codes (row 0 = -1)."""
    leaf = np.random.default_rng(seed).permutation(num_items) % k**levels  # [N]
    codes = np.full((num_items + 1, levels), -1, dtype=np.int64)
    for level in range(levels):
        codes[1:, level] = (leaf // k ** (levels - 1 - level)) % k
    return codes


def category_labels(ds: Dataset) -> np.ndarray | None:
    """``[N+1]`` label per item (row 0 and unlabelled = -1); see the module docstring."""
    if isinstance(ds, SyntheticDataset):
        return ds.item_clusters[:, 0].astype(np.int64)
    if ds.item_attributes is None or ds.num_attributes == 0:
        return None
    freq = np.bincount(
        np.concatenate([a for a in ds.item_attributes if len(a)]), minlength=ds.num_attributes + 1
    )
    paths: dict[tuple[int, ...], int] = {}
    labels = np.full(ds.num_items + 1, -1, dtype=np.int64)
    for item in range(1, ds.num_items + 1):
        attrs = ds.item_attributes[item]
        if len(attrs):
            path = tuple(int(a) for a in sorted(attrs, key=lambda a: (-freq[a], a))[:2])
            labels[item] = paths.setdefault(path, len(paths))
    return labels


def ape_row(
    name: str,
    buckets: np.ndarray,
    queries: dict[str, list[np.ndarray]],
    labels: np.ndarray | None,
) -> dict[str, Any]:
    """APE of one index at every level: ``buckets [N+1, L]``; ``queries``: one column per query set
    (e.g. ``train`` = training users' sequences, ``test`` = test users' history and targets)."""
    row: dict[str, Any] = {"index": name}
    for level in range(buckets.shape[1]):
        for column, sets in queries.items():
            row[f"{column}_l{level + 1}"] = average_partition_entropy(buckets[:, level], sets)
        if labels is not None:
            row[f"labels_l{level + 1}"] = average_partition_entropy(buckets[:, level], labels)
    _, sizes = np.unique(buckets[1:, -1], return_counts=True)
    row["leaves"] = len(sizes)
    row["leaf_min"], row["leaf_max"] = int(sizes.min()), int(sizes.max())
    return row
