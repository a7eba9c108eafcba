"""RedisCache against a real redis-server: raw-array values with TTL, one MGET, breaker on failure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.cache import CircuitBreaker, RedisCache, StateRow
from tests.integration.conftest import RedisServer

pytestmark = pytest.mark.integration


def row(seed: int) -> StateRow:
    rng = np.random.default_rng(seed)
    return StateRow(
        memory=rng.standard_normal((3, 8)).astype(np.float32),
        memory_mask=np.ones(3, dtype=bool),
        query=rng.standard_normal(4).astype(np.float32),
    )


def make_cache(server: RedisServer, ttl_s: int = 60) -> RedisCache:
    return RedisCache(
        server.url, ttl_s=ttl_s, timeout_s=0.05, pool_size=4, breaker=CircuitBreaker(failures=2, reset_s=30.0)
    )


def test_rows_round_trip_with_ttl_and_no_pickle(redis_server: RedisServer) -> None:
    async def main() -> None:
        cache = make_cache(redis_server, ttl_s=123)
        rows = {"genret:fp:u:a": row(0), "genret:fp:u:b": row(1)}
        await cache.set_many(rows)
        got = await cache.get_many(["genret:fp:u:a", "genret:fp:u:missing", "genret:fp:u:b"])
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
    assert isinstance(raw, bytes) and raw[:4] == b"GRS1"  # our header, not a pickle


def test_garbage_values_are_misses_not_errors(redis_server: RedisServer) -> None:
    redis_server.client().set("genret:fp:u:junk", b"\x80\x04not-a-state")

    async def main() -> list[StateRow | None]:
        cache = make_cache(redis_server)
        try:
            return await cache.get_many(["genret:fp:u:junk"])
        finally:
            await cache.close()

    assert asyncio.run(main()) == [None]


def test_dead_redis_opens_the_breaker_and_every_call_still_returns(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()

    async def main() -> None:
        cache = make_cache(server)
        await cache.set_many({"k": row(0)})
        assert (await cache.get_many(["k"]))[0] is not None
        server.kill()
        for _ in range(3):
            assert await cache.get_many(["k", "j"]) == [None, None]
            await cache.set_many({"k": row(1)})
        assert cache.status()["breaker"] == "open"
        assert cache.status()["last_error"]
        await cache.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
