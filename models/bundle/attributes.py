"""Item attributes (brand, categories, ...) of a bundle's items, as a CSR table over dense ids.

Stored in ``items.npz`` beside the item table when the training data has attributes (optional):

```
attr_offsets [N+2] int64    row r (dense item id r, row 0 = padding, empty) is
                            attr_values[attr_offsets[r]:attr_offsets[r+1]]
attr_values  [nnz] int64    indices into attr_vocab, unique and sorted within a row
attr_vocab   [A]   unicode  raw attribute ids, as the data (and users) know them
```

:meth:`ItemAttributes.items_with` answers a ``categories`` filter: the dense ids of the items that
hold any of the given raw attribute ids (unknown ids match nothing). Items added after training
(:meth:`ItemAttributes.extended`) get rows after the last one (dense ids N+1, N+2, ...); their
attribute ids the vocabulary lacks are appended to it. Everything is numpy; nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

ARRAYS = ("attr_offsets", "attr_values", "attr_vocab")
"""The array names in ``items.npz``; all three or none."""


@dataclass(frozen=True, eq=False)
class ItemAttributes:
    """Attributes of dense item ids ``0..rows-1`` (row 0, the padding id, holds none).

    ``vocab`` [A] unicode raw attribute ids; ``offsets`` [rows+1] int64; ``values`` [nnz] int64
    indices into ``vocab``. Build it with :meth:`from_rows` or :meth:`from_arrays` (which check it).
    """

    vocab: np.ndarray
    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def from_arrays(
        cls, vocab: np.ndarray, offsets: np.ndarray, values: np.ndarray, rows: int | None = None
    ) -> ItemAttributes:
        """The table of stored arrays, checked; raises ``ValueError`` naming the array at fault.

        ``rows``: the number of dense ids expected (N+1), when known."""
        if vocab.ndim != 1 or vocab.dtype.kind != "U":
            raise ValueError(f"attr_vocab is {vocab.dtype}{list(vocab.shape)}, expected unicode[A]")
        if len(set(vocab.tolist())) != len(vocab):
            raise ValueError("attr_vocab has duplicate attribute ids")
        if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) < 2:
            raise ValueError(f"attr_offsets is {offsets.dtype}{list(offsets.shape)}, expected int64[N+2]")
        if rows is not None and len(offsets) != rows + 1:
            raise ValueError(f"attr_offsets has {len(offsets)} entries, expected num_items + 2 = {rows + 1}")
        if values.ndim != 1 or values.dtype != np.int64:
            raise ValueError(f"attr_values is {values.dtype}{list(values.shape)}, expected int64[nnz]")
        if offsets[0] != 0 or offsets[-1] != len(values) or np.any(np.diff(offsets) < 0):
            raise ValueError(
                f"attr_offsets must rise from 0 to len(attr_values) = {len(values)}, "
                f"got {offsets[0]}..{offsets[-1]}"
            )
        if offsets[1] != 0:
            raise ValueError("attr_offsets: row 0 (the padding id) must hold no attribute")
        if len(values) and (values.min() < 0 or values.max() >= len(vocab)):
            raise ValueError(
                f"attr_values must index attr_vocab (0..{len(vocab) - 1}), got {values.min()}..{values.max()}"
            )
        return cls(vocab=vocab, offsets=offsets, values=values)

    @classmethod
    def from_rows(cls, rows: Sequence[Iterable[str]], vocab: Sequence[str] = ()) -> ItemAttributes:
        """The table of raw attribute ids per dense id (``rows[0]`` is the padding row, must be
        empty); ``vocab`` fixes the order of known ids, new ones are appended in order of appearance."""
        if rows and list(rows[0]):
            raise ValueError("rows[0] is the padding id and must hold no attribute")
        return cls(
            vocab=np.asarray(list(vocab), dtype=np.str_).reshape(-1),
            offsets=np.zeros(1, np.int64),
            values=np.zeros(0, np.int64),
        ).extended([list(r) for r in rows])

    @property
    def num_rows(self) -> int:
        """Dense ids covered, padding included (N+1 for a bundle of N items)."""
        return len(self.offsets) - 1

    @cached_property
    def _index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.vocab.tolist())}

    @cached_property
    def _by_attribute(self) -> tuple[np.ndarray, np.ndarray]:
        """The transpose (CSC): ``items[starts[a]:starts[a+1]]`` are the dense ids holding attribute a."""
        rows = np.repeat(np.arange(self.num_rows, dtype=np.int64), np.diff(self.offsets))  # [nnz]
        order = np.argsort(self.values, kind="stable")
        starts = np.searchsorted(self.values[order], np.arange(len(self.vocab) + 1))
        return rows[order], starts.astype(np.int64)

    def index_of(self, raw: str) -> int | None:
        """The vocabulary index of a raw attribute id, or None when unknown."""
        return self._index.get(raw)

    def attributes_of(self, dense_id: int) -> list[str]:
        """Raw attribute ids of one dense item id (``[]`` for the padding id or an item with none)."""
        if not 0 <= dense_id < self.num_rows:
            raise IndexError(f"dense id {dense_id} is outside 0..{self.num_rows - 1}")
        lo, hi = self.offsets[dense_id], self.offsets[dense_id + 1]
        return [str(a) for a in self.vocab[self.values[lo:hi]]]

    def items_with(self, raw_attr_ids: Iterable[str]) -> np.ndarray:
        """Sorted unique dense ids (int64) of the items holding any of ``raw_attr_ids``."""
        items, starts = self._by_attribute
        known = sorted({i for a in raw_attr_ids if (i := self._index.get(str(a))) is not None})
        if not known:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate([items[starts[a] : starts[a + 1]] for a in known]))

    def extended(self, new_rows: Sequence[Iterable[str]]) -> ItemAttributes:
        """This table with one row per added item after the last (dense ids ``num_rows``, ...);
        attribute ids the vocabulary lacks are appended to it (in order of appearance)."""
        index = dict(self._index)
        added: list[str] = []
        lengths, flat = [], []
        for row in new_rows:
            ids = set()
            for raw in row:
                raw = str(raw)
                if raw not in index:
                    index[raw] = len(index)
                    added.append(raw)
                ids.add(index[raw])
            lengths.append(len(ids))
            flat.extend(sorted(ids))
        vocab = np.concatenate([self.vocab, np.asarray(added, dtype=np.str_)]) if added else self.vocab
        offsets = np.concatenate(
            [self.offsets, self.offsets[-1] + np.cumsum(np.asarray(lengths, dtype=np.int64))]
        )
        values = np.concatenate([self.values, np.asarray(flat, dtype=np.int64)])
        return ItemAttributes(vocab=vocab, offsets=offsets.astype(np.int64), values=values)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as stored in ``items.npz`` (:data:`ARRAYS`)."""
        return {"attr_offsets": self.offsets, "attr_values": self.values, "attr_vocab": self.vocab}
