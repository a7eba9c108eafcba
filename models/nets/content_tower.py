"""The content tower: an item's attributes -> a vector in the bundle's item space (``item_emb``).

For items nobody has interacted with (added after training without a vector). The tower is
linear in the mean of the item's attribute one-hots (two ridge regressions fitted at export time:
:mod:`training.content_tower`), a direction and a norm::

    known = [a for a in attrs if a is known]
    u = bias + mean(weight[known])                  # [Dr]  the vector regression
    n = max(norm_bias + mean(norm_weight[known]), 0) # []   the norm regression
    vector(attrs) = u * n / |u|                     # [Dr]

The norm is predicted separately because the regressed vectors are shrunk towards the mean item
vector, and a short vector is never retrieved by inner product.

Stored as the optional bundle file ``content.npz`` (listed in the manifest's files with its
sha256 like every other file)::

    vocab       [A]     unicode  the raw attribute ids the tower knows
    weight      [A, Dr] float32  one row per known attribute
    bias        [Dr]    float32  the vector of an item whose attributes say nothing (the mean item)
    norm_weight [A]     float32  one per known attribute
    norm_bias   []      float32  the mean item norm

An item none of whose attributes the tower knows gets no vector: :meth:`ContentTower.vectors`
refuses it, and callers check :meth:`ContentTower.has_known` first (then they must require a
vector). Serving needs numpy only; nothing is unpickled.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

CONTENT_FILE = "content.npz"
ARRAYS = ("vocab", "weight", "bias", "norm_weight", "norm_bias")


class ContentTowerError(ValueError):
    """A ``content.npz`` that cannot serve; the message names the array at fault."""


@dataclass(frozen=True, eq=False)
class ContentTower:
    """A linear map from a bag of raw attribute ids to an item vector ``[Dr]``."""

    vocab: np.ndarray  # [A] unicode raw attribute ids
    weight: np.ndarray  # [A, Dr] float32
    bias: np.ndarray  # [Dr] float32
    norm_weight: np.ndarray  # [A] float32
    norm_bias: np.ndarray  # [] float32

    def __post_init__(self) -> None:
        A = len(self.vocab)
        if self.vocab.ndim != 1 or self.vocab.dtype.kind != "U" or A < 1:
            raise ContentTowerError(
                f"vocab is {self.vocab.dtype}{list(self.vocab.shape)}, expected unicode[A >= 1]"
            )
        if len(set(self.vocab.tolist())) != A:
            raise ContentTowerError("vocab has duplicate attribute ids")
        if self.bias.ndim != 1 or self.bias.dtype != np.float32 or len(self.bias) < 1:
            raise ContentTowerError(f"bias is {self.bias.dtype}{list(self.bias.shape)}, expected float32[Dr]")
        Dr = len(self.bias)
        if self.weight.shape != (A, Dr) or self.weight.dtype != np.float32:
            raise ContentTowerError(
                f"weight is {self.weight.dtype}{list(self.weight.shape)}, expected float32[{A}, {Dr}] "
                "(one row per vocab entry, bias's width)"
            )
        for name, want in (("norm_weight", (A,)), ("norm_bias", ())):
            got = getattr(self, name)
            if got.shape != want or got.dtype != np.float32:
                raise ContentTowerError(
                    f"{name} is {got.dtype}{list(got.shape)}, expected float32{list(want)}"
                )
        if not all(np.isfinite(getattr(self, k)).all() for k in ARRAYS[1:]):
            raise ContentTowerError("weight, bias, norm_weight or norm_bias has NaN or infinite values")

    @classmethod
    def load(cls, path: str | Path) -> ContentTower:
        """Read ``content.npz``; raises :class:`ContentTowerError` if it is unreadable or malformed."""
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = set(ARRAYS) - set(data.files)
                if missing:
                    raise ContentTowerError(f"missing arrays {sorted(missing)}")
                return cls(**{k: data[k] for k in ARRAYS})
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            if isinstance(exc, ContentTowerError):
                raise
            raise ContentTowerError(f"cannot read: {exc}") from exc

    def save(self, path: str | Path) -> None:
        with Path(path).open("wb") as fh:
            np.savez(fh, **{k: getattr(self, k) for k in ARRAYS})

    @property
    def dim(self) -> int:
        """Dr, the width of the vectors (the bundle's ``dims.query``)."""
        return len(self.bias)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.vocab.tolist())}

    def known(self, attrs: Iterable[str]) -> list[int]:
        """Sorted unique vocabulary indices of the attributes of ``attrs`` the tower knows."""
        return sorted({i for a in attrs if (i := self._index.get(str(a))) is not None})

    def has_known(self, attrs: Iterable[str]) -> bool:
        """Whether the tower knows at least one of ``attrs`` (else it has no vector for the item)."""
        return any(str(a) in self._index for a in attrs)

    def vectors(self, attribute_lists: Sequence[Iterable[str]]) -> np.ndarray:
        """``[M, Dr]`` float32 vectors of M items given their raw attribute ids; unknown ids are
        ignored, repeated ones count once. Raises ``ValueError`` naming the first item with no known
        attribute (check :meth:`has_known`)."""
        out = np.empty((len(attribute_lists), self.dim), np.float32)  # [M, Dr]
        for i, attrs in enumerate(attribute_lists):
            idx = self.known(attrs)
            if not idx:
                raise ValueError(f"attribute_lists[{i}] holds no attribute the content tower knows")
            u = self.bias + self.weight[idx].mean(axis=0)  # [Dr]
            n = max(float(self.norm_bias + self.norm_weight[idx].mean()), 0.0)
            out[i] = u * (n / max(float(np.linalg.norm(u)), 1e-12))
        return out
