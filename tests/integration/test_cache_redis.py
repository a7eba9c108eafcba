"""RedisCache against a real redis-server: raw-array values with TTL, one MGET, refused values deleted,
breaker on failure, and a breaker probe cancelled mid-flight that does not leave Redis shut out."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from service.cache.codec import StateRow, StateSpec, encode_state
from service.cache.state_cache import CircuitBreaker, RedisCache
from service.metrics import CACHE_RESULTS
from tests.integration.conftest import RedisServer

pytestmark = pytest.mark.integration

SPEC = StateSpec("fp", length=3, memory_dim=8, query_dim=4)


def row(seed: int, d: int = 8) -> StateRow:
    rng = np.random.default_rng(seed)
    return StateRow(
        memory=rng.standard_normal((3, d)).astype(np.float32),
        memory_mask=np.ones(3, dtype=bool),
        query=rng.standard_normal(4).astype(np.float32),
    )


def make_cache(
    server: RedisServer, ttl_s: int = 60, *, timeout_s: float = 0.05, reset_s: float = 30.0
) -> RedisCache:
    return RedisCache(
        server.url,
        ttl_s=ttl_s,
        timeout_s=timeout_s,
        pool_size=4,
        breaker=CircuitBreaker(failures=2, reset_s=reset_s),
    )


def test_rows_round_trip_with_ttl_and_no_pickle(redis_server: RedisServer) -> None:
    async def main() -> None:
        cache = make_cache(redis_server, ttl_s=123)
        rows = {"genret:fp:u:a": row(0), "genret:fp:u:b": row(1)}
        await cache.set_many({k: (SPEC, r) for k, r in rows.items()})
        got = await cache.get_many(["genret:fp:u:a", "genret:fp:u:missing", "genret:fp:u:b"], [SPEC] * 3)
        assert got[1] is None
        for key, back in (("genret:fp:u:a", got[0]), ("genret:fp:u:b", got[2])):
            assert back is not None
            np.testing.assert_array_equal(back.memory, rows[key].memory)
            np.testing.assert_array_equal(back.query, rows[key].query)
        assert cache.status()["breaker"] == "closed"
        await cache.close()

    asyncio.run(main())
    client = redis_server.client()
    assert 0 < client.ttl("genret:fp:u:a") <= 123
    raw = client.get("genret:fp:u:a")
    assert isinstance(raw, bytes) and raw[:4] == b"GRS2"  # our header, not a pickle


def test_refused_values_are_misses_counted_and_deleted(redis_server: RedisServer) -> None:
    client = redis_server.client()
    wide = row(2, d=16)
    planted = {
        "genret:fp:u:junk": b"\x80\x04not-a-state",
        "genret:fp:u:wide": encode_state(wide, StateSpec("fp", 3, 16, 4)),  # well framed, wrong width
        "genret:fp:u:other": encode_state(row(3), StateSpec("fp-other", 3, 8, 4)),  # another bundle
    }
    for key, value in planted.items():
        client.set(key, value)
    invalid = CACHE_RESULTS.labels(result="invalid")

    async def main() -> list[StateRow | None]:
        cache = make_cache(redis_server)
        try:
            return await cache.get_many(list(planted), [SPEC] * len(planted))
        finally:
            await cache.close()

    before = invalid._value.get()
    assert asyncio.run(main()) == [None, None, None]
    assert invalid._value.get() - before == 3
    assert client.exists(*planted) == 0  # deleted


def test_dead_redis_opens_the_breaker_and_every_call_still_returns(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()

    async def main() -> None:
        cache = make_cache(server)
        await cache.set_many({"k": (SPEC, row(0))})
        assert (await cache.get_many(["k"], [SPEC]))[0] is not None
        server.kill()
        for _ in range(3):
            assert await cache.get_many(["k", "j"], [SPEC, SPEC]) == [None, None]
            await cache.set_many({"k": (SPEC, row(1))})
        assert cache.status()["breaker"] == "open"
        assert cache.status()["last_error"]
        await cache.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_cancelled_probe_does_not_shut_redis_out(tmp_path: Path) -> None:
    """Redis stalls (SIGSTOP), the breaker opens; the half-open probe is cancelled mid-flight (as the
    shadow lane's timeout does); after Redis resumes the breaker probes again and closes."""
    server = RedisServer(tmp_path).start()
    assert server.proc is not None
    reset_s = 0.3

    async def main() -> None:
        cache = make_cache(server, timeout_s=0.5, reset_s=reset_s)
        await cache.set_many({"k": (SPEC, row(0))})
        os.kill(server.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            for _ in range(2):  # two timed-out calls open the breaker
                assert await cache.get_many(["k"], [SPEC]) == [None]
            assert cache.breaker.state == "open"
            await asyncio.sleep(reset_s)
            probe = asyncio.create_task(cache.get_many(["k"], [SPEC]))
            await asyncio.sleep(0.1)  # the probe's MGET is out, Redis is stopped
            assert cache.breaker.probing and not probe.done()
            probe.cancel()
            with pytest.raises(asyncio.CancelledError):
                await probe
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        assert not cache.breaker.probing  # the cancelled probe gave its slot back
        got = await cache.get_many(["k"], [SPEC])  # the next call is a fresh probe, and Redis answers
        assert got[0] is not None and cache.breaker.state == "closed"
        await cache.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_signed_values_round_trip_and_unsigned_or_moved_ones_are_refused(redis_server: RedisServer) -> None:
    key = b"k" * 16

    async def main() -> list[StateRow | None]:
        signed = RedisCache(
            redis_server.url,
            ttl_s=60,
            timeout_s=0.05,
            pool_size=2,
            breaker=CircuitBreaker(failures=2, reset_s=30.0),
            hmac_key=key,
        )
        unsigned = make_cache(redis_server)
        try:
            await signed.set_many({"genret:fp:alice:h": (SPEC, row(0))})
            await unsigned.set_many({"genret:fp:mallory:h": (SPEC, row(1))})
            raw = redis_server.client().get("genret:fp:alice:h")
            assert isinstance(raw, bytes)
            redis_server.client().set("genret:fp:bob:h", raw)  # alice's signed value under bob's key
            keys = ["genret:fp:alice:h", "genret:fp:mallory:h", "genret:fp:bob:h"]
            return await signed.get_many(keys, [SPEC] * 3)
        finally:
            await signed.close()
            await unsigned.close()

    got = asyncio.run(main())
    assert got[0] is not None and got[1:] == [None, None]
    np.testing.assert_array_equal(got[0].query, row(0).query)
