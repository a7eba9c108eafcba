"""Encoder-state cache: Redis (shared) behind a circuit breaker, or an in-process LRU.

One row of encoder states (``memory [T, D]``, ``memory_mask [T]``, ``query [Dr]``) is stored under
``genret:{bundle fingerprint}:{user key}:{history hash}`` as raw little-endian arrays after a small
struct header — never pickle. Redis down or slow means no cache, never a failed request: short
timeouts, no retries, one pipelined read per batch, one pipelined SET-with-TTL per batch, and a
breaker that stops calling Redis after ``breaker_failures`` consecutive failures until a half-open
probe succeeds.

One key can never open the breaker for everyone: a read asks for at most one byte more than a
valid value for that row can have (``GETRANGE key 0 size``, not ``GET``), so a huge value planted
under one user's key costs no more to read than a valid one and is refused by its length; a key
holding another Redis type answers that command alone with an error, which refuses that key only.
Only a failure of the whole call (connection, timeout) counts against the breaker. Refused values
are deleted with ``UNLINK`` (Redis frees them off its main thread).

Values are bound to the model that wrote them (:mod:`service.cache.codec`): a value the serving
model cannot use — another bundle's, wrong shapes, damaged, unsigned — is a miss, counted as
``genret_cache_results_total{result="invalid"}``, deleted, recomputed by the engine, never an error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from service.cache.codec import CacheFormatError, StateCodec, StateRow, StateSpec
from service.metrics import CACHE_BREAKER_STATE, CACHE_RESULTS

log = logging.getLogger(__name__)


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> half-open after ``reset_s`` (one probe).

    A probe that ends without an answer (cancelled: :meth:`abandon`), or that is still out after
    ``reset_s`` (lost), frees the probe slot, so the breaker can never stay half-open with no probe.
    """

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError(f"need failures >= 1 and reset_s > 0, got {failures}, {reset_s}")
        self._failures_to_open = failures
        self._reset_s = reset_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probe_started: float | None = None  # set while a half-open probe is out

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self._reset_s:
            return "half_open"
        return "open"

    @property
    def probing(self) -> bool:
        return self._probe_started is not None

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self._clock()
        if self._probe_started is None or now - self._probe_started >= self._reset_s:
            self._probe_started = now
            return True
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._probe_started = None

    def record_failure(self) -> None:
        self._consecutive += 1
        self._probe_started = None
        if self._opened_at is not None or self._consecutive >= self._failures_to_open:
            self._opened_at = self._clock()

    def abandon(self) -> None:
        """A call ended without an answer (cancelled): it says nothing about Redis, free the probe slot."""
        self._probe_started = None


BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}  # genret_cache_breaker_state


class StateCache(Protocol):
    """What the engine needs from a cache."""

    async def get_many(self, keys: Sequence[str], specs: Sequence[StateSpec]) -> list[StateRow | None]: ...
    async def set_many(self, rows: Mapping[str, tuple[StateSpec, StateRow]]) -> None: ...
    def status(self) -> dict[str, object]: ...
    async def close(self) -> None: ...


class NoCache:
    """Caching switched off."""

    async def get_many(self, keys: Sequence[str], specs: Sequence[StateSpec]) -> list[StateRow | None]:
        return [None] * len(keys)

    async def set_many(self, rows: Mapping[str, tuple[StateSpec, StateRow]]) -> None:
        return None

    def status(self) -> dict[str, object]:
        return {"kind": "none"}

    async def close(self) -> None:
        return None


class LocalCache:
    """In-process LRU of encoded rows (used when ``GENRET_REDIS_URL`` is unset)."""

    def __init__(self, max_entries: int, hmac_key: bytes | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max = max_entries
        self._codec = StateCodec(hmac_key)
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    async def get_many(self, keys: Sequence[str], specs: Sequence[StateSpec]) -> list[StateRow | None]:
        with self._lock:
            raw: list[object] = [self._data.get(key) for key in keys]
            for key, value in zip(keys, raw, strict=True):
                if value is not None:
                    self._data.move_to_end(key)
        out, invalid = self._codec.decode_many(keys, specs, raw)
        with self._lock:
            for key in invalid:
                self._data.pop(key, None)
        return out

    async def set_many(self, rows: Mapping[str, tuple[StateSpec, StateRow]]) -> None:
        encoded = _encode_all(self._codec, rows)
        with self._lock:
            for key, raw in encoded.items():
                self._data[key] = raw
                self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def put_raw(self, key: str, value: bytes) -> None:
        """Store ``value`` as is (tests use it to plant damaged entries)."""
        with self._lock:
            self._data[key] = value

    def __len__(self) -> int:
        return len(self._data)

    def status(self) -> dict[str, object]:
        return {"kind": "local", "entries": len(self._data), "max_entries": self._max}

    async def close(self) -> None:
        return None


def _encode_all(codec: StateCodec, rows: Mapping[str, tuple[StateSpec, StateRow]]) -> dict[str, bytes]:
    out = {}
    for key, (spec, row) in rows.items():
        try:
            out[key] = codec.encode(key, spec, row)
        except CacheFormatError as exc:  # a row that does not fit its spec (or its range) is not cached
            log.warning("not caching %s: %s", key, exc)
    return out


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
        hmac_key: bytes | None = None,
    ) -> None:
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._breaker = breaker
        self._codec = StateCodec(hmac_key)
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
        # read at each scrape: the breaker turns half-open by the clock, not by a call
        CACHE_BREAKER_STATE.set_function(lambda: BREAKER_STATES[self._breaker.state])

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def get_many(self, keys: Sequence[str], specs: Sequence[StateSpec]) -> list[StateRow | None]:
        if not keys:
            return []
        if not self._breaker.allow():
            CACHE_RESULTS.labels(result="breaker_open").inc(len(keys))
            return [None] * len(keys)
        try:
            raw = await asyncio.wait_for(self._read(keys, specs), timeout=self._timeout_s * 2)
        except Exception as exc:  # any Redis trouble is a cache miss, never a failed request
            self._on_failure(exc)
            CACHE_RESULTS.labels(result="error").inc(len(keys))
            return [None] * len(keys)
        except BaseException:  # cancelled mid-call: no verdict on Redis, but free a half-open probe
            self._breaker.abandon()
            raise
        self._breaker.record_success()
        out, invalid = self._codec.decode_many(keys, specs, raw)
        if invalid:
            await self._delete(invalid)
        return out

    async def _read(self, keys: Sequence[str], specs: Sequence[StateSpec]) -> list[object]:
        """Each key's value, at most one byte past the size a valid value for its spec has (longer
        ones are refused by length); ``None`` for a missing key; a key of another Redis type gives
        its error object (refused), without failing the others."""
        pipe = self._redis.pipeline(transaction=False)
        for key, spec in zip(keys, specs, strict=True):
            pipe.getrange(key, 0, self._codec.value_bytes(spec))  # inclusive end: size + 1 bytes
        values = await pipe.execute(raise_on_error=False)
        out: list[object] = []
        for value in values:
            if isinstance(value, ResponseError):
                out.append(value)  # e.g. WRONGTYPE: this key's problem, not Redis's
            elif isinstance(value, BaseException):
                raise value
            else:
                out.append(value or None)  # GETRANGE of a missing key is b""
        return out

    async def set_many(self, rows: Mapping[str, tuple[StateSpec, StateRow]]) -> None:
        encoded = _encode_all(self._codec, rows)
        if not encoded or not self._breaker.allow():
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key, value in encoded.items():
                pipe.set(key, value, ex=self._ttl_s)
            await asyncio.wait_for(pipe.execute(), timeout=self._timeout_s * 2)
        except Exception as exc:
            self._on_failure(exc)
            return
        except BaseException:
            self._breaker.abandon()
            raise
        self._breaker.record_success()

    async def _delete(self, keys: list[str]) -> None:
        """Drop refused values (best effort, bounded by the timeout; a failure only leaves them to expire)."""
        try:
            await asyncio.wait_for(self._redis.unlink(*keys), timeout=self._timeout_s * 2)
        except Exception as exc:
            log.warning("could not delete %d refused cache values: %s", len(keys), exc)

    def _on_failure(self, exc: BaseException) -> None:
        # /readyz is public: it shows the error's kind only; the message (which names Redis's
        # host and port) goes to the log
        self._last_error = type(exc).__name__
        was = self._breaker.state
        self._breaker.record_failure()
        if was != "open" and self._breaker.state == "open":
            log.warning("redis circuit breaker opened after: %s: %s", type(exc).__name__, exc)

    def status(self) -> dict[str, object]:
        """States for the public ``/readyz``: the breaker and the last error's kind, never an address."""
        return {"kind": "redis", "breaker": self._breaker.state, "last_error": self._last_error}

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception as exc:  # closing a dead connection must not fail shutdown
            log.debug("redis close: %s", exc)
