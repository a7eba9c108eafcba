"""Encoder-state cache: Redis (shared) behind a circuit breaker, or an in-process LRU.

One row of encoder states (``memory [T, D]``, ``memory_mask [T]``, ``query [Dr]``) is stored under
``genret:{bundle fingerprint}:{user key}:{history hash}`` as raw little-endian arrays after a small
struct header — never pickle. Redis down or slow means no cache, never a failed request: short
timeouts, no retries, one MGET per batch, one pipelined SET-with-TTL per batch, and a breaker that
stops calling Redis after ``breaker_failures`` consecutive failures until a half-open probe succeeds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.metrics import CACHE_RESULTS

log = logging.getLogger(__name__)

_MAGIC = b"GRS1"
_VERSION = 1
_DTYPE_F32 = 1
# magic, version, dtype code, T, D, Dr
_HEADER = struct.Struct("<4sBBIII")


class CacheFormatError(ValueError):
    """A cached value does not have the expected header or length."""


@dataclass(frozen=True)
class StateRow:
    """The encoder states of one request row."""

    memory: np.ndarray  # [T, D] float32
    memory_mask: np.ndarray  # [T] bool
    query: np.ndarray  # [Dr] float32


def encode_state(row: StateRow) -> bytes:
    """Header + memory (f32 LE) + mask (u8) + query (f32 LE)."""
    t, d = row.memory.shape
    (dr,) = row.query.shape
    if row.memory_mask.shape != (t,):
        raise ValueError(f"memory_mask shape {row.memory_mask.shape} does not match memory [{t}, {d}]")
    return b"".join(
        (
            _HEADER.pack(_MAGIC, _VERSION, _DTYPE_F32, t, d, dr),
            np.ascontiguousarray(row.memory, dtype="<f4").tobytes(),
            np.ascontiguousarray(row.memory_mask, dtype=np.uint8).tobytes(),
            np.ascontiguousarray(row.query, dtype="<f4").tobytes(),
        )
    )


def decode_state(data: bytes) -> StateRow:
    """Inverse of :func:`encode_state`; raises :class:`CacheFormatError` on anything unexpected."""
    if len(data) < _HEADER.size:
        raise CacheFormatError(f"cached value of {len(data)} bytes is shorter than the header")
    magic, version, dtype, t, d, dr = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION or dtype != _DTYPE_F32:
        raise CacheFormatError(f"bad header magic={magic!r} version={version} dtype={dtype}")
    expected = _HEADER.size + 4 * t * d + t + 4 * dr
    if len(data) != expected:
        raise CacheFormatError(f"cached value has {len(data)} bytes, header says {expected}")
    off = _HEADER.size
    memory = np.frombuffer(data, dtype="<f4", count=t * d, offset=off).reshape(t, d)  # [T, D]
    off += 4 * t * d
    mask = np.frombuffer(data, dtype=np.uint8, count=t, offset=off).astype(bool)  # [T]
    off += t
    query = np.frombuffer(data, dtype="<f4", count=dr, offset=off)  # [Dr]
    return StateRow(memory=memory.astype(np.float32), memory_mask=mask, query=query.astype(np.float32))


def history_hash(dense_history: np.ndarray) -> str:
    """A short stable digest of the (already truncated) dense history."""
    return hashlib.blake2b(
        np.ascontiguousarray(dense_history, dtype="<i8").tobytes(), digest_size=16
    ).hexdigest()


def cache_key(fingerprint: str, user_key: str, dense_history: np.ndarray) -> str:
    return f"genret:{fingerprint}:{user_key}:{history_hash(dense_history)}"


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> half-open after ``reset_s`` (one probe)."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError(f"need failures >= 1 and reset_s > 0, got {failures}, {reset_s}")
        self._failures_to_open = failures
        self._reset_s = reset_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self._reset_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._consecutive += 1
        self._probing = False
        if self._opened_at is not None or self._consecutive >= self._failures_to_open:
            self._opened_at = self._clock()


class StateCache(Protocol):
    """What the engine needs from a cache."""

    async def get_many(self, keys: Sequence[str]) -> list[StateRow | None]: ...
    async def set_many(self, rows: dict[str, StateRow]) -> None: ...
    def status(self) -> dict[str, object]: ...
    async def close(self) -> None: ...


class NoCache:
    """Caching switched off."""

    async def get_many(self, keys: Sequence[str]) -> list[StateRow | None]:
        return [None] * len(keys)

    async def set_many(self, rows: dict[str, StateRow]) -> None:
        return None

    def status(self) -> dict[str, object]:
        return {"kind": "none"}

    async def close(self) -> None:
        return None


class LocalCache:
    """In-process LRU of encoded rows (used when ``GENRET_REDIS_URL`` is unset)."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max = max_entries
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    async def get_many(self, keys: Sequence[str]) -> list[StateRow | None]:
        out: list[StateRow | None] = []
        with self._lock:
            for key in keys:
                raw = self._data.get(key)
                if raw is not None:
                    self._data.move_to_end(key)
                out.append(None if raw is None else decode_state(raw))
        for row in out:
            CACHE_RESULTS.labels(result="miss" if row is None else "hit").inc()
        return out

    async def set_many(self, rows: dict[str, StateRow]) -> None:
        encoded = {key: encode_state(row) for key, row in rows.items()}
        with self._lock:
            for key, raw in encoded.items():
                self._data[key] = raw
                self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def status(self) -> dict[str, object]:
        return {"kind": "local", "entries": len(self._data), "max_entries": self._max}

    async def close(self) -> None:
        return None


class RedisCache:
    """Redis through ``redis.asyncio`` with a blocking pool, short timeouts, no retries and a breaker."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        timeout_s: float,
        pool_size: int,
        breaker: CircuitBreaker,
    ) -> None:
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._breaker = breaker
        self._url = url
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=timeout_s,  # waiting for a free pooled connection
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._redis = Redis(connection_pool=pool)
        self._last_error: str | None = None

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def get_many(self, keys: Sequence[str]) -> list[StateRow | None]:
        if not keys:
            return []
        if not self._breaker.allow():
            CACHE_RESULTS.labels(result="breaker_open").inc(len(keys))
            return [None] * len(keys)
        try:
            raw = await asyncio.wait_for(self._redis.mget(list(keys)), timeout=self._timeout_s * 2)
        except Exception as exc:  # any Redis trouble is a cache miss, never a failed request
            self._on_failure(exc)
            CACHE_RESULTS.labels(result="error").inc(len(keys))
            return [None] * len(keys)
        self._breaker.record_success()
        out: list[StateRow | None] = []
        for value in raw:
            if value is None:
                CACHE_RESULTS.labels(result="miss").inc()
                out.append(None)
                continue
            try:
                if not isinstance(value, bytes):  # the pool never decodes responses
                    raise CacheFormatError(f"expected bytes from Redis, got {type(value).__name__}")
                out.append(decode_state(value))
                CACHE_RESULTS.labels(result="hit").inc()
            except CacheFormatError as exc:
                log.warning("ignoring malformed cache value: %s", exc)
                CACHE_RESULTS.labels(result="error").inc()
                out.append(None)
        return out

    async def set_many(self, rows: dict[str, StateRow]) -> None:
        if not rows or not self._breaker.allow():
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key, row in rows.items():
                pipe.set(key, encode_state(row), ex=self._ttl_s)
            await asyncio.wait_for(pipe.execute(), timeout=self._timeout_s * 2)
        except Exception as exc:
            self._on_failure(exc)
            return
        self._breaker.record_success()

    def _on_failure(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        was = self._breaker.state
        self._breaker.record_failure()
        if was != "open" and self._breaker.state == "open":
            log.warning("redis circuit breaker opened after: %s", self._last_error)

    def status(self) -> dict[str, object]:
        return {"kind": "redis", "breaker": self._breaker.state, "last_error": self._last_error}

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception as exc:  # closing a dead connection must not fail shutdown
            log.debug("redis close: %s", exc)
