"""Loaders for the usual interaction file formats (:data:`FORMATS`).

Every loader turns a file into per-user item sequences in time order. A malformed line raises
:class:`DatasetError` naming the file, the line number and what was wrong. With
``skip_bad_lines=True`` such lines are skipped instead, counted, logged and the count kept on
:attr:`Dataset.skipped_lines`. Blank lines carry no data and are ignored in every format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from training.data.dataset import Dataset, DatasetError, ItemVocab

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("seq", "pairs", "movielens", "recbole", "csv", "parquet")


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
        attribute_vocab=["", *raw_attrs],
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
