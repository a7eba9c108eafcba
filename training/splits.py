"""Train / validation / test splits.

``kind="user"`` (default; the SEATER / ComiRec protocol): users are shuffled by ``seed`` and cut
8:1:1. Training users give their whole sequence to the trainer. A validation or test user gives
the first 80% of its time-ordered items as history (at least one item, capped to the ``max_len``
most recent) and the rest as targets (at least one). Users with fewer than two items cannot be
evaluated and stay in training.

``kind="loo"`` (leave-one-out, the protocol of SASRec, S3-Rec, TIGER and their successors): every
user trains on all but its last two items; the second to last is its validation target (history:
the items before it), the last its test target (history: every item before it, the validation
target included). Users with fewer than three items only train. Every item is ranked (full
ranking, no sampled negatives) and *every* earlier item of the user is excluded from the ranking
(:attr:`EvalSet.seen`), not only the ``max_len`` most recent the model reads. A target that is also
in its user's history (a repeat visit: Yelp has them, Beauty and MovieLens do not) is therefore
never retrieved and counts as a miss, as in S3-Rec's evaluation, where the same files come from;
:func:`target_in_history_share` says how many targets that is.

The user split excludes the history the model reads (``histories``), as it always has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from training.data import Dataset

SPLIT_KINDS: tuple[str, ...] = ("user", "loo")


@dataclass(frozen=True)
class EvalSet:
    user_ids: list[str]
    histories: list[np.ndarray]  # dense ids, time order, the max_len most recent
    targets: list[np.ndarray]  # dense ids, distinct (first occurrence order)
    seen: list[np.ndarray] | None = None
    """Items excluded from each user's ranking when they differ from ``histories`` (LOO: every
    earlier item, not only the ``max_len`` most recent); None = ``histories``."""

    def __len__(self) -> int:
        return len(self.user_ids)

    def excluded(self) -> list[np.ndarray]:
        """What each user's ranking leaves out (history excluded): ``seen`` if set, else ``histories``."""
        return self.histories if self.seen is None else self.seen

    def head(self, limit: int) -> EvalSet:
        """The first ``limit`` users (all when ``limit <= 0``)."""
        if limit <= 0:
            return self
        seen = None if self.seen is None else self.seen[:limit]
        return EvalSet(self.user_ids[:limit], self.histories[:limit], self.targets[:limit], seen)


@dataclass(frozen=True)
class Split:
    kind: str
    seed: int
    max_len: int
    train: list[np.ndarray]  # full time-ordered sequences the trainer may learn from
    valid: EvalSet
    test: EvalSet
    num_items: int

    def describe(self) -> str:
        return (
            f"{self.kind} split, seed {self.seed}, T={self.max_len}: {len(self.train)} train sequences, "
            f"{len(self.valid)} valid / {len(self.test)} test users"
        )


def _distinct(items: np.ndarray) -> np.ndarray:
    _, first = np.unique(items, return_index=True)
    return items[np.sort(first)]


def _history_and_targets(seq: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """First 80% as history (>= 1 item, the max_len most recent kept), the rest as targets (>= 1)."""
    cut = min(max(1, len(seq) * 4 // 5), len(seq) - 1)
    return seq[:cut][-max_len:], _distinct(seq[cut:])


def _user_split(ds: Dataset, seed: int, max_len: int) -> Split:
    rng = np.random.default_rng(seed)
    order = rng.permutation(ds.num_users)
    n_train = round(0.8 * ds.num_users)
    n_valid = round(0.1 * ds.num_users)
    train_users = order[:n_train].tolist()
    parts: dict[str, EvalSet] = {}
    for name, users in (("valid", order[n_train : n_train + n_valid]), ("test", order[n_train + n_valid :])):
        ids: list[str] = []
        histories: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        for u in sorted(users.tolist()):
            seq = ds.sequences[u]
            if len(seq) < 2:
                train_users.append(u)
                continue
            history, target = _history_and_targets(seq, max_len)
            ids.append(ds.user_ids[u])
            histories.append(history)
            targets.append(target)
        parts[name] = EvalSet(ids, histories, targets)
    train = [ds.sequences[u] for u in sorted(train_users)]
    return Split("user", seed, max_len, train, parts["valid"], parts["test"], ds.num_items)


def _loo_split(ds: Dataset, seed: int, max_len: int) -> Split:
    train: list[np.ndarray] = []
    valid = EvalSet([], [], [], [])
    test = EvalSet([], [], [], [])
    for user, seq in zip(ds.user_ids, ds.sequences, strict=True):
        if len(seq) < 3:
            train.append(seq)
            continue
        train.append(seq[:-2])
        for part, cut in ((valid, len(seq) - 2), (test, len(seq) - 1)):
            assert part.seen is not None
            part.user_ids.append(user)
            part.histories.append(seq[:cut][-max_len:])
            part.seen.append(np.unique(seq[:cut]))
            part.targets.append(seq[cut : cut + 1])
    return Split("loo", seed, max_len, train, valid, test, ds.num_items)


def target_in_history_share(evalset: EvalSet) -> float:
    """Share of (user, target) pairs whose target is also among the user's excluded items (repeats)."""
    hits = total = 0
    for excluded, targets in zip(evalset.excluded(), evalset.targets, strict=True):
        hits += int(np.isin(targets, excluded).sum())
        total += len(targets)
    return hits / total if total else 0.0


def make_split(ds: Dataset, kind: str = "user", seed: int = 0, max_len: int = 50) -> Split:
    """Split a dataset; see the module docstring for the two protocols."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if kind == "user":
        return _user_split(ds, seed, max_len)
    if kind == "loo":
        return _loo_split(ds, seed, max_len)
    raise ValueError(f"unknown split kind {kind!r}; expected one of {', '.join(SPLIT_KINDS)}")


def training_pairs(sequences: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (prefix -> next item) pair of the sequences.

    Returns ``histories [P, max_len]`` (the max_len most recent items before the target,
    left-padded with 0) and ``targets [P]``.
    """
    histories: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    pad = np.zeros(max_len, dtype=np.int64)
    for seq in sequences:
        if len(seq) < 2:
            continue
        padded = np.concatenate([pad, np.asarray(seq, dtype=np.int64)])  # [max_len + n]
        windows = sliding_window_view(padded, max_len)  # [n + 1, max_len], window t ends before seq[t]
        histories.append(windows[1 : len(seq)])
        targets.append(np.asarray(seq[1:], dtype=np.int64))
    if not histories:
        return np.zeros((0, max_len), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(histories), np.concatenate(targets)
