"""The delta log on a Redis Stream, for replicas that share a Redis and no RWX volume
(docs/live_catalogue.md "The log on Redis Streams").

One stream per bundle directory name, ``genret:catalogue:{name}``; entry ``{seq}-0`` holds one
record (field ``record``: the same JSON bytes a delta file holds, :mod:`service.catalogue.store`).

* **Publish** = ``XADD key {seq}-0``: Redis refuses an id not above the stream's last, so a writer
  that was not caught up gets :class:`~service.catalogue.store.SequenceTaken`, catches up and tries
  the next number, exactly as with the directory's ``os.link``; two writers never share a number.
* **Read** = ``XRANGE key ({after}-0 +``, in order from the replica's last version; each record is
  parsed without trusting it (:mod:`service.catalogue.records`) and a fault is quarantined in this
  process as for files (never deleted from the stream: others may be reading it).
* The stream has no TTL and is never trimmed, so a Redis that may evict keys regardless of TTL
  (``maxmemory-policy`` ``allkeys-*``) could drop it: :func:`check_policy` refuses it at start-up.
  Its connection settings (``GENRET_CATALOGUE_REDIS_URL``) are its own, apart from the encoder-state
  cache's, which may use an evicting Redis.
* Redis unreachable: reads find nothing new (the replica keeps its version, logged once), a publish
  fails as an unwritable directory does (503 ``catalogue_store``), start-up goes on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from models.catalogue import carried
from models.catalogue.delta import Delta
from models.catalogue.placement import Placement
from service.catalogue.records import Fault, parse
from service.catalogue.store import DeltaFile, SequenceTaken

log = logging.getLogger(__name__)

KEY_PREFIX = "genret:catalogue:"
SAFE_POLICIES = ("noeviction", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl")
_BATCH = 64  # entries per XRANGE


class UnsafeRedis(Exception):
    """A Redis whose eviction policy could drop the stream (refused at start-up)."""


def connect(url: str, timeout_s: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def check_policy(client: redis.Redis) -> None:
    """:class:`UnsafeRedis` unless keys without a TTL are never evicted (``INFO memory``)."""
    policy = str(client.info("memory").get("maxmemory_policy", ""))
    if policy not in SAFE_POLICIES:
        raise UnsafeRedis(
            f"GENRET_CATALOGUE_REDIS_URL: maxmemory-policy {policy!r} may evict the catalogue stream; "
            f"use one of {', '.join(SAFE_POLICIES)} (the stream has no TTL)"
        )


class StreamLog:
    """The delta log of one bundle on a Redis Stream; the same interface as ``DeltaStore``."""

    def __init__(self, client: redis.Redis, name: str, max_bytes: int, max_items: int) -> None:
        self.client = client
        self.key = f"{KEY_PREFIX}{name}"
        self.where = f"redis stream {self.key}"
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._reported: set[tuple[int, str]] = set()
        self._written: dict[int, DeltaFile] = {}
        self._quarantined: dict[int, DeltaFile] = {}

    def _last(self) -> int:
        top = self.client.xrevrange(self.key, "+", "-", count=1)
        return _seq(top[0][0]) if top else 0

    def sequences(self, after: int = 0) -> list[int]:
        """Sequence numbers past ``after`` (from the last id: ids are claimed one after another)."""
        try:
            return list(range(after + 1, self._last() + 1))
        except redis.RedisError as exc:
            self._warn_once(-1, f"cannot read {self.where}: {exc}")
            return []

    def lag(self, after: int) -> int:
        """Entries past ``after``; a stream that ends before ``after`` was reset or lost (a Redis
        without persistence restarted): logged once, as nothing published since can be trusted to
        follow this replica's version (docs/live_catalogue.md)."""
        try:
            last = self._last()
        except redis.RedisError as exc:
            self._warn_once(-1, f"cannot read {self.where}: {exc}")
            return 0
        if last < after:
            self._warn_once(
                -2, f"{self.where} ends at entry {last}, before this replica's {after}: reset or lost?"
            )
        return max(0, last - after)

    def pending(self, after: int) -> list[DeltaFile]:
        """The records past ``after``, in order, parsed (a fault: ``delta=None`` with its reason)."""
        out: list[DeltaFile] = []
        start = f"({after}-0"
        try:
            while batch := self.client.xrange(self.key, start, "+", count=_BATCH):
                for entry_id, fields in batch:
                    out.append(self._entry(_seq(entry_id), fields))
                start = f"({_text(batch[-1][0])}"
        except redis.RedisError as exc:
            self._warn_once(-1, f"cannot read {self.where}: {exc}")
        return out

    def _entry(self, seq: int, fields: Any) -> DeltaFile:
        own = self._written.pop(seq, None)
        if own is not None:
            return own
        known = self._quarantined.get(seq)
        if known is not None:
            return known
        where = f"{self.key}/{seq}"
        data = fields.get(b"record", b"") if isinstance(fields, dict) else b""
        try:
            if not isinstance(data, bytes) or len(data) > self.max_bytes:
                raise Fault(
                    "too_large", f"{len(data)} bytes > {self.max_bytes} (GENRET_CATALOGUE_MAX_FILE_BYTES)"
                )
            got = parse(data, self.max_items)
        except Fault as fault:
            return DeltaFile(seq, Path(where), "", 0, None, error=fault.detail, reason=fault.reason)
        return DeltaFile(
            seq, Path(where), got.base_fingerprint, got.version, got.delta, placement=got.placement
        )

    def report(self, f: DeltaFile, reason: str) -> None:
        self._warn_once(f.seq, f"catalogue delta {f.path} skipped: {reason}")

    def quarantine(self, f: DeltaFile, reason: str, detail: str) -> bool:
        if f.seq in self._quarantined:
            return False
        self._quarantined[f.seq] = replace(f, delta=None, error=detail, reason=reason)
        version = f"version {f.version}" if f.delta is not None else "version unknown"
        log.warning("catalogue delta %s (%s) quarantined: %s: %s", f.path, version, reason, detail)
        return True

    def claim(
        self,
        seq: int,
        fingerprint: str,
        version: int,
        delta: Delta,
        placement: Sequence[Placement] | None = None,
    ) -> str:
        """``XADD`` ``delta`` as entry ``seq``; :class:`SequenceTaken` when the stream is past it,
        :class:`ConnectionError` (an ``OSError``) when Redis cannot be written."""
        body: dict[str, Any] = {
            "base_fingerprint": fingerprint,
            "version": version,
            "created_at": time.time(),
            "delta": delta.to_json(compact=True),
        }
        if placement:
            body["placement"] = carried.to_json(placement)
        try:
            self.client.xadd(self.key, {"record": json.dumps(body).encode()}, id=f"{seq}-0")
        except redis.ResponseError as exc:
            if "equal or smaller" in str(exc):
                raise SequenceTaken(f"{self.where} entry {seq}") from None
            raise ConnectionError(f"{self.where}: {exc}") from None
        except redis.RedisError as exc:
            raise ConnectionError(f"{self.where}: {exc}") from None
        where = f"{self.key}/{seq}"
        self._written[seq] = DeltaFile(
            seq,
            Path(where),
            fingerprint,
            version,
            delta,
            placement=None if not placement else list(placement),
        )
        return where

    def _warn_once(self, seq: int, message: str) -> None:
        if (seq, message) not in self._reported:
            self._reported.add((seq, message))
            log.warning("%s", message)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _seq(entry_id: Any) -> int:
    return int(_text(entry_id).split("-", 1)[0])
