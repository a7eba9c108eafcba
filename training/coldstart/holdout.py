"""The held-out items of a cold-start run: the reduced data and split without them, and their
add to a bundle's catalogue through the live path with content-tower vectors only."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.bundle.bundle import Bundle
from models.catalogue.catalogue import ApplyReport, Catalogue, Delta, NewItem
from training.data import Dataset, ItemVocab
from training.splits import EvalSet, Split


@dataclass(frozen=True)
class Holdout:
    """Held-out items and the reduced data set without them."""

    items: np.ndarray  # [H] full-data dense ids held out, ascending
    dataset: Dataset  # the reduced data set (dense ids renumbered 1..N-H)
    to_reduced: np.ndarray  # [N+1] full dense id -> reduced dense id (0: held out or padding)
    share: float
    seed: int

    def is_held(self, full_ids: np.ndarray) -> np.ndarray:
        """``[n]`` bool: which of ``full_ids`` (dense ids >= 1) are held out."""
        return self.to_reduced[np.asarray(full_ids, np.int64)] == 0

    def raw_ids(self, full: Dataset) -> list[str]:
        return [full.vocab.raw_ids[int(i)] for i in self.items]


def hold_out_items(ds: Dataset, share: float = 0.1, seed: int = 0) -> Holdout:
    """``round(share * N)`` items drawn uniformly at random (``seed``) and the data set without them."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    n = ds.num_items
    count = min(n - 1, max(1, round(share * n)))
    held = np.sort(np.random.default_rng(seed).choice(np.arange(1, n + 1), size=count, replace=False))
    kept = np.setdiff1d(np.arange(1, n + 1), held)  # [N-H] full dense ids kept, ascending
    to_reduced = np.zeros(n + 1, np.int64)
    to_reduced[kept] = np.arange(1, len(kept) + 1)
    attrs = ds.item_attributes
    attributes = None if attrs is None else [attrs[0], *(attrs[int(i)] for i in kept)]
    reduced = Dataset(
        name=f"{ds.name}-holdout{share:g}-s{seed}",
        user_ids=list(ds.user_ids),
        sequences=[_mapped(s, to_reduced) for s in ds.sequences],
        vocab=ItemVocab(["", *(ds.vocab.raw_ids[int(i)] for i in kept)]),
        item_attributes=attributes,
        num_attributes=ds.num_attributes,
        attribute_vocab=ds.attribute_vocab,
    )
    return Holdout(items=held, dataset=reduced, to_reduced=to_reduced, share=share, seed=seed)


def _mapped(ids: np.ndarray, to_reduced: np.ndarray) -> np.ndarray:
    out = to_reduced[np.asarray(ids, np.int64)]
    return out[out > 0]


def reduced_split(full: Split, holdout: Holdout) -> Split:
    """``full`` with the held-out items removed (users keep their part; an evaluation user left with
    an empty history or no target is dropped from that part). Its ``kind`` names the hold-out, so
    that a SASRec cached for it is never taken for the plain split's."""
    parts = []
    for evalset in (full.valid, full.test):
        ids, histories, targets = [], [], []
        for user, history, target in zip(evalset.user_ids, evalset.histories, evalset.targets, strict=True):
            h, t = _mapped(history, holdout.to_reduced), _mapped(target, holdout.to_reduced)
            if len(h) and len(t):
                ids.append(user)
                histories.append(h)
                targets.append(t)
        parts.append(EvalSet(ids, histories, targets))
    return Split(
        kind=f"{full.kind}-holdout{holdout.share:g}-s{holdout.seed}",
        seed=full.seed,
        max_len=full.max_len,
        train=[_mapped(s, holdout.to_reduced) for s in full.train],
        valid=parts[0],
        test=parts[1],
        num_items=holdout.dataset.num_items,
    )


@dataclass(frozen=True)
class Added:
    """The catalogue with the held-out items added, and what the add did."""

    catalogue: Catalogue
    report: ApplyReport | None
    added: int
    no_known_attributes: int  # held-out items the content tower cannot place (not added)
    seconds: float

    def summary(self) -> dict[str, Any]:
        r = self.report
        counts = (r.new_leaves, r.joined_copies, r.over_capacity) if r else (0, 0, 0)
        out = {"added": self.added, "no_known_attributes": self.no_known_attributes, "seconds": self.seconds}
        return out | dict(zip(("new_leaves", "joined_copies", "over_capacity"), counts, strict=True))


def add_held_out(bundle: Bundle, full: Dataset, holdout: Holdout) -> Added:
    """Add the held-out items to ``bundle``'s catalogue through the live path, vectors from the
    content tower only."""
    content = bundle.content
    if content is None or full.item_attributes is None:
        raise ValueError("cold start needs item attributes and a bundle with a content tower (content.npz)")
    names = full.attribute_names()
    items = []
    for dense in holdout.items.tolist():
        attrs = tuple(names[int(a)] for a in full.item_attributes[dense])
        if content.has_known(attrs):
            items.append(NewItem(id=full.vocab.raw_ids[dense], vector=None, attributes=attrs))
    start = time.perf_counter()
    catalogue, report = Catalogue.from_bundle(bundle), None
    if items:
        catalogue, report = catalogue.apply(Delta(add=tuple(items)), content=content)
    seconds = time.perf_counter() - start
    return Added(catalogue, report, len(items), len(holdout.items) - len(items), seconds)
