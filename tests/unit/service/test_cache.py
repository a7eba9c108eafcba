"""Encoder-state cache pieces without Redis: codec, key, breaker, in-process LRU."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.cache import (
    CacheFormatError,
    CircuitBreaker,
    LocalCache,
    StateRow,
    cache_key,
    decode_state,
    encode_state,
)


def make_row(t: int = 5, d: int = 8, dr: int = 4, seed: int = 0) -> StateRow:
    rng = np.random.default_rng(seed)
    mask = np.zeros(t, dtype=bool)
    mask[t // 2 :] = True
    return StateRow(
        memory=rng.standard_normal((t, d)).astype(np.float32),
        memory_mask=mask,
        query=rng.standard_normal(dr).astype(np.float32),
    )


def test_codec_round_trips_exactly() -> None:
    row = make_row()
    back = decode_state(encode_state(row))
    np.testing.assert_array_equal(back.memory, row.memory)
    np.testing.assert_array_equal(back.memory_mask, row.memory_mask)
    np.testing.assert_array_equal(back.query, row.query)
    assert back.memory.dtype == np.float32 and back.memory_mask.dtype == bool


@pytest.mark.parametrize("damage", ["truncate", "magic", "extra"])
def test_codec_refuses_damaged_values(damage: str) -> None:
    raw = encode_state(make_row())
    bad = {"truncate": raw[:-3], "magic": b"XXXX" + raw[4:], "extra": raw + b"\0"}[damage]
    with pytest.raises(CacheFormatError):
        decode_state(bad)


def test_key_depends_on_fingerprint_user_and_history() -> None:
    h = np.array([3, 1, 2])
    base = cache_key("fp", "u1", h)
    assert base.startswith("genret:fp:u1:")
    assert cache_key("fp2", "u1", h) != base
    assert cache_key("fp", "u2", h) != base
    assert cache_key("fp", "u1", np.array([1, 2, 3])) != base
    assert cache_key("fp", "u1", h.copy()) == base


def test_breaker_opens_then_probes_once_then_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_s=1.0, clock=lambda: now[0])
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 1.5
    assert breaker.state == "half_open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_failure()  # probe failed: open again
    assert breaker.state == "open"
    now[0] = 3.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()


def test_local_cache_hits_and_evicts_least_recent() -> None:
    async def main() -> None:
        cache = LocalCache(max_entries=2)
        rows = {f"k{i}": make_row(seed=i) for i in range(3)}
        await cache.set_many({"k0": rows["k0"], "k1": rows["k1"]})
        got = await cache.get_many(["k0", "missing"])
        assert got[1] is None and got[0] is not None
        np.testing.assert_array_equal(got[0].query, rows["k0"].query)
        await cache.set_many({"k2": rows["k2"]})  # evicts k1, the least recently used
        assert [r is not None for r in await cache.get_many(["k0", "k1", "k2"])] == [True, False, True]
        assert len(cache) == 2

    asyncio.run(main())
