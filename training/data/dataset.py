"""Interaction data types: the item vocabulary, per-user sequences, the synthetic variant, stats.

Raw ids stay strings; dense item ids are ``1..N`` with ``0`` as padding (see docs/CONTRACTS.md
"Ids").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A data file that cannot be read as the format it claims to be."""

    def __init__(self, path: str | Path, line: int | None, msg: str) -> None:
        self.path = str(path)
        self.line = line
        self.msg = msg
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {msg}")


@dataclass(frozen=True)
class ItemVocab:
    """Raw item ids by dense id; ``raw_ids[0] == ""`` is the padding id."""

    raw_ids: list[str]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.raw_ids or self.raw_ids[0] != "":
            raise ValueError('ItemVocab.raw_ids must start with the padding id ""')
        index = {raw: i for i, raw in enumerate(self.raw_ids) if i > 0}
        if len(index) != len(self.raw_ids) - 1:
            raise ValueError("ItemVocab.raw_ids holds duplicate ids")
        object.__setattr__(self, "_index", index)

    def dense(self, raw: str) -> int | None:
        """The dense id of a raw id, or None when unknown."""
        return self._index.get(raw)

    @property
    def num_items(self) -> int:
        return len(self.raw_ids) - 1


@dataclass(frozen=True)
class Dataset:
    """Per-user item sequences (dense ids, time order) with the item vocabulary."""

    name: str
    user_ids: list[str]
    sequences: list[np.ndarray]  # each int64 [n_u], dense ids >= 1
    vocab: ItemVocab
    item_attributes: list[np.ndarray] | None = None  # [N+1] arrays of attribute ids >= 1
    num_attributes: int = 0
    skipped_lines: int = 0
    attribute_vocab: list[str] | None = None  # [A+1] raw attribute id of each attribute id, [0] == ""

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.sequences):
            raise ValueError(f"{len(self.user_ids)} user ids but {len(self.sequences)} sequences")
        if self.item_attributes is not None and len(self.item_attributes) != self.vocab.num_items + 1:
            raise ValueError(
                f"item_attributes has {len(self.item_attributes)} rows, expected N+1 = {self.vocab.num_items + 1}"
            )
        if self.attribute_vocab is not None and len(self.attribute_vocab) != self.num_attributes + 1:
            raise ValueError(
                f"attribute_vocab has {len(self.attribute_vocab)} entries, expected num_attributes + 1 = "
                f"{self.num_attributes + 1}"
            )

    def attribute_names(self) -> list[str]:
        """Raw attribute id of each attribute id (``[0] == ""``): as the data file spells them, or the
        attribute ids themselves as strings where the data set kept no raw vocabulary."""
        if self.attribute_vocab is not None:
            return list(self.attribute_vocab)
        return [""] + [str(a) for a in range(1, self.num_attributes + 1)]

    @property
    def num_items(self) -> int:
        return self.vocab.num_items

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def fingerprint(self) -> str:
        """sha256 over the item vocabulary and every sequence (hex)."""
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return str(cached)
        h = hashlib.sha256()
        h.update("\x1f".join(self.vocab.raw_ids).encode())
        h.update(np.asarray([len(s) for s in self.sequences], dtype=np.int64).tobytes())
        for seq in self.sequences:
            h.update(np.ascontiguousarray(seq, dtype=np.int64).tobytes())
        digest = h.hexdigest()
        self.__dict__["_fingerprint"] = digest
        return digest


@dataclass(frozen=True)
class SyntheticDataset(Dataset):
    """A dataset with planted hierarchical item clusters."""

    item_clusters: np.ndarray = field(kw_only=True)  # [N+1, depth] cluster index per level, row 0 = -1
    branching: int = field(kw_only=True, default=0)


def dataset_stats(ds: Dataset) -> dict[str, float | int | str]:
    """Users, items, interactions, density and history-length quantiles."""
    lengths = np.asarray([len(s) for s in ds.sequences], dtype=np.int64)
    q = np.quantile(lengths, [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]) if len(lengths) else np.zeros(7)
    stats: dict[str, float | int | str] = {
        "name": ds.name,
        "users": ds.num_users,
        "items": ds.num_items,
        "interactions": ds.num_interactions,
        "density": ds.num_interactions / max(1, ds.num_users * ds.num_items),
        "len_mean": float(lengths.mean()) if len(lengths) else 0.0,
    }
    for name, value in zip(("min", "p25", "p50", "p75", "p90", "p99", "max"), q, strict=True):
        stats[f"len_{name}"] = float(value)
    stats["attributes"] = ds.num_attributes
    stats["skipped_lines"] = ds.skipped_lines
    stats["fingerprint"] = ds.fingerprint()[:16]
    return stats
