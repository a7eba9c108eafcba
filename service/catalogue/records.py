"""One delta record read and parsed without trusting it (docs/live_catalogue.md "A bad record").

A record is the bytes of one delta file (:mod:`service.catalogue.store`). Whatever they hold, reading
and parsing them either returns a :class:`Record` or raises :class:`Fault`
with a *reason* from :data:`REASONS` (the ``reason`` label of
``genret_catalogue_quarantined_total``) and a one-line detail; no other exception leaves this
module, so one hostile record can never stop the log behind it.

* Only a regular file is opened: ``lstat`` first (a FIFO, socket, device, directory or symlink is
  refused unopened), then ``open(O_NONBLOCK | O_NOFOLLOW)`` and ``fstat`` again on the descriptor,
  so a file swapped for a FIFO between the two calls cannot block the reader either.
* At most ``max_bytes`` are read (a larger file is refused before it is read).
* The text must be UTF-8; the JSON may not nest deeper than the interpreter allows (the parser's
  ``RecursionError`` is a fault like any other), and every field has its type checked: ``version``
  a non-negative integer (``1e999`` parses as an infinite float: refused, never ``int()``-ed).
* A delta of more than ``max_items`` ids is refused before its items are parsed (the writers'
  limit, ``GENRET_MAX_DELTA_ITEMS``).

Every reason depends only on the record's bytes, its file type and the limits, so every replica
with the same settings decides alike (the catalogue stays one function of the log).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.catalogue import carried
from models.catalogue.delta import Delta, DeltaError
from models.catalogue.placement import Placement
from service.heavy_lane import pace

NOT_REGULAR = "not_regular_file"  # a FIFO, socket, device, directory or symlink under a delta name
TOO_LARGE = "too_large"  # more bytes than GENRET_CATALOGUE_MAX_FILE_BYTES
UNREADABLE = "unreadable"  # the file could not be read (permissions, I/O error, gone)
NOT_UTF8 = "not_utf8"  # bytes that are not UTF-8 text
BAD_JSON = "bad_json"  # not JSON, or nested deeper than the parser allows
BAD_RECORD = "bad_record"  # JSON, but not {"base_fingerprint": str, "version": int, "delta": ...}
TOO_MANY_ITEMS = "too_many_items"  # more ids than GENRET_MAX_DELTA_ITEMS
BAD_DELTA = "bad_delta"  # the delta's own fields are malformed (Delta.from_json)
REFUSED = "refused"  # well formed, but contradicts the version before it (Catalogue.check)
APPLY_FAILED = "apply_failed"  # applying it raised anything else

REASONS = (
    NOT_REGULAR,
    TOO_LARGE,
    UNREADABLE,
    NOT_UTF8,
    BAD_JSON,
    BAD_RECORD,
    TOO_MANY_ITEMS,
    BAD_DELTA,
    REFUSED,
    APPLY_FAILED,
)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Record:
    """A parsed record: the delta, the bundle it is for, the version its writer meant, and where its
    writer placed the added items (None: not carried, or malformed: the replica places them)."""

    base_fingerprint: str
    version: int
    delta: Delta
    placement: list[Placement] | None = None


class Fault(Exception):
    """A record that cannot be used: ``reason`` (one of :data:`REASONS`) and a one-line ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (module docstring); :class:`Fault` otherwise."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise Fault(NOT_REGULAR, _kind(st.st_mode))
        if st.st_size > max_bytes:
            raise Fault(TOO_LARGE, f"{st.st_size} bytes > {max_bytes} (GENRET_CATALOGUE_MAX_FILE_BYTES)")
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        raise Fault(UNREADABLE, f"{type(exc).__name__}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped after the lstat
            raise Fault(NOT_REGULAR, _kind(os.fstat(fd).st_mode))
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, _CHUNK):
            total += len(chunk)
            if total > max_bytes:  # grew after the lstat
                raise Fault(TOO_LARGE, f"more than {max_bytes} bytes (GENRET_CATALOGUE_MAX_FILE_BYTES)")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise Fault(UNREADABLE, f"{type(exc).__name__}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def parse(data: bytes, max_items: int) -> Record:
    """The :class:`Record` of a file's bytes; :class:`Fault` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Fault(NOT_UTF8, f"byte {exc.start} is not UTF-8") from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise Fault(BAD_JSON, "nested deeper than the JSON parser allows") from None
    except ValueError as exc:  # JSONDecodeError, an integer of more digits than int() takes
        raise Fault(BAD_JSON, str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise Fault(BAD_RECORD, f"a record is a JSON object, got {type(obj).__name__}")
    fingerprint = obj.get("base_fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise Fault(BAD_RECORD, "base_fingerprint: a non-empty string is required")
    version = obj.get("version", 0)
    if type(version) is not int or not 0 <= version < 2**63:  # bools, floats (1e999: inf) refused
        raise Fault(BAD_RECORD, f"version: a non-negative integer is required, got {_short(version)}")
    body = obj.get("delta")
    count = _count(body)
    if count > max_items:
        raise Fault(TOO_MANY_ITEMS, f"{count} ids > {max_items} (GENRET_MAX_DELTA_ITEMS)")
    try:
        delta = Delta.from_json(body, pause=pace)
    except DeltaError as exc:
        raise Fault(BAD_DELTA, str(exc)[:300]) from None
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:  # never expected: still a fault
        raise Fault(BAD_DELTA, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return Record(fingerprint, version, delta, carried.from_json(obj.get("placement"), len(delta.add)))


def _count(body: Any) -> int:
    """Ids a delta body lists (0 when it is not a delta: ``Delta.from_json`` says why)."""
    if not isinstance(body, dict):
        return 0
    return sum(len(v) for key in ("add", "remove") if isinstance(v := body.get(key), list))


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text[:40]
