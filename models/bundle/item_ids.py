"""A bundle's raw item ids both ways without a Python object per item.

At 1M items a list of ``str`` and a ``dict`` from raw id to dense id cost about 120 MiB of a
replica's memory (65 + 56 MiB) and 0.4 s at load. :class:`RawIds` reads the bundle's numpy unicode
array itself; :class:`DenseIds` finds a raw id by binary search over a sorted order of that array
(one ``int64`` per item), a request's ids in one vectorised search (:meth:`DenseIds.many`).
The service's loaded model and version 0 of its catalogue share them; a catalogue version after a
delta holds its own ``tuple`` / ``dict`` (:mod:`models.catalogue.catalogue`). :func:`dense_many`
looks ids up in either, :func:`as_dict` gives the ``dict`` a delta starts from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import overload

import numpy as np


class RawIds(Sequence[str]):
    """``ids[N+1]`` (numpy unicode, ``ids[0] == ""``) as a sequence of ``str``: ``raw[d]`` is item ``d``'s id."""

    def __init__(self, ids: np.ndarray) -> None:
        if ids.ndim != 1 or ids.dtype.kind != "U":
            raise ValueError(f"raw ids must be a 1-d unicode array, got {ids.dtype}{list(ids.shape)}")
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids.tolist())

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [str(x) for x in self.ids[index].tolist()]
        return str(self.ids[index])


class DenseIds(Mapping[str, int]):
    """Raw id -> dense id (``1..N``; the padding id ``""`` is not a key) over the sorted order of ``ids[N+1]``.

    The ids must be unique (``models.bundle.items.read_items`` checks it). A lookup compares the
    found id with the asked one as Python strings, so an id the array cannot hold exactly (numpy
    drops trailing NULs) is never confused with one it holds.
    """

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.sorter = np.argsort(ids[1:], kind="stable")  # [N] indices into ids[1:], in raw-id order

    def __len__(self) -> int:
        return len(self.sorter)

    def __iter__(self) -> Iterator[str]:
        return (str(x) for x in self.ids[1:].tolist())

    def __getitem__(self, raw: str) -> int:
        (dense,) = self.many([raw])
        if dense is None:
            raise KeyError(raw)
        return dense

    def __contains__(self, raw: object) -> bool:
        return isinstance(raw, str) and self.many([raw])[0] is not None

    def many(self, raws: Sequence[str]) -> list[int | None]:
        """The dense id of each of ``raws`` (``None`` where unknown), in one binary search."""
        if not raws or not len(self.sorter):
            return [None] * len(raws)
        wanted = np.asarray(raws, dtype=str)  # [r]
        pos = np.searchsorted(self.ids[1:], wanted, sorter=self.sorter)  # [r] insertion points
        dense = self.sorter[np.minimum(pos, len(self.sorter) - 1)] + 1  # [r] the candidates
        found = self.ids[dense].tolist()
        return [int(d) if f == r else None for d, f, r in zip(dense.tolist(), found, raws, strict=True)]


def as_dict(mapping: Mapping[str, int]) -> dict[str, int]:
    """``mapping`` as a new ``dict`` (for :class:`DenseIds` in one pass over its array, not a search per key)."""
    if isinstance(mapping, DenseIds):
        return dict(zip(mapping.ids[1:].tolist(), range(1, len(mapping.ids)), strict=True))
    return dict(mapping)


def dense_many(mapping: Mapping[str, int], raws: Sequence[str]) -> list[int | None]:
    """``mapping.get`` of each of ``raws``: one search for a :class:`DenseIds`, a loop for a ``dict``."""
    if isinstance(mapping, DenseIds):
        return mapping.many(raws)
    return [mapping.get(raw) for raw in raws]
