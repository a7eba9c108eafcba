"""Encoder-state cache pieces without Redis: codec bound to the model, key, breaker, in-process LRU."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.cache.codec import (
    CacheFormatError,
    StateRow,
    StateSpec,
    cache_key,
    decode_state,
    encode_state,
)
from service.cache.state_cache import CircuitBreaker, LocalCache
from service.metrics import CACHE_RESULTS

SPEC = StateSpec(fingerprint="fp-a", length=5, memory_dim=8, query_dim=4)


def make_row(t: int = 5, d: int = 8, dr: int = 4, seed: int = 0) -> StateRow:
    rng = np.random.default_rng(seed)
    mask = np.zeros(t, dtype=bool)
    mask[t // 2 :] = True
    return StateRow(
        memory=rng.standard_normal((t, d)).astype(np.float32),
        memory_mask=mask,
        query=rng.standard_normal(dr).astype(np.float32),
    )


def spec_of(row: StateRow, fingerprint: str = "fp-a") -> StateSpec:
    t, d = row.memory.shape
    return StateSpec(fingerprint, t, d, row.query.shape[0])


def invalid_count() -> float:
    return CACHE_RESULTS.labels(result="invalid")._value.get()


def test_codec_round_trips_exactly() -> None:
    row = make_row()
    back = decode_state(encode_state(row, SPEC), SPEC)
    np.testing.assert_array_equal(back.memory, row.memory)
    np.testing.assert_array_equal(back.memory_mask, row.memory_mask)
    np.testing.assert_array_equal(back.query, row.query)
    assert back.memory.dtype == np.float32 and back.memory_mask.dtype == bool


@pytest.mark.parametrize("damage", ["truncate", "magic", "extra", "old_format", "header_only"])
def test_codec_refuses_damaged_values(damage: str) -> None:
    raw = encode_state(make_row(), SPEC)
    bad = {
        "truncate": raw[:-3],
        "magic": b"XXXX" + raw[4:],
        "extra": raw + b"\0",
        "old_format": b"GRS1" + raw[4:],
        "header_only": raw[:20],
    }[damage]
    with pytest.raises(CacheFormatError):
        decode_state(bad, SPEC)


@pytest.mark.parametrize(
    "written",
    [
        StateSpec("fp-other", 5, 8, 4),  # another bundle
        StateSpec("fp-a", 5, 16, 4),  # wrong width (the poisoned entry)
        StateSpec("fp-a", 4, 8, 4),  # another history length
        StateSpec("fp-a", 5, 8, 6),  # another query width
    ],
)
def test_a_well_framed_value_for_another_model_or_shape_is_refused(written: StateSpec) -> None:
    row = make_row(written.length, written.memory_dim, written.query_dim)
    raw = encode_state(row, written)
    assert decode_state(raw, written).memory.shape == (written.length, written.memory_dim)  # well framed
    with pytest.raises(CacheFormatError):
        decode_state(raw, SPEC)


def test_non_finite_and_bad_masks_are_refused() -> None:
    row = make_row()
    nan = StateRow(memory=row.memory.copy(), memory_mask=row.memory_mask, query=row.query)
    nan.memory[0, 0] = np.nan
    empty = StateRow(memory=row.memory, memory_mask=np.zeros(5, dtype=bool), query=row.query)
    for bad in (nan, empty):
        with pytest.raises(CacheFormatError):
            decode_state(encode_state(bad, SPEC), SPEC)


def test_encode_refuses_a_row_that_does_not_fit_its_spec() -> None:
    with pytest.raises(CacheFormatError):
        encode_state(make_row(d=16), SPEC)


def test_hmac_binds_the_value_to_its_key_and_the_signing_key() -> None:
    row, key = make_row(), "genret:fp-a:alice:h1"
    signed = encode_state(row, SPEC, key=key, hmac_key=b"k" * 16)
    np.testing.assert_array_equal(decode_state(signed, SPEC, key=key, hmac_key=b"k" * 16).query, row.query)
    for bad_key, hmac_key, value in (
        ("genret:fp-a:bob:h1", b"k" * 16, signed),  # copied under another user's key
        (key, b"j" * 16, signed),  # another signing key
        (key, b"k" * 16, encode_state(row, SPEC, key=key)),  # unsigned value where signing is on
        (key, None, signed),  # signed value where signing is off
    ):
        with pytest.raises(CacheFormatError):
            decode_state(value, SPEC, key=bad_key, hmac_key=hmac_key)
    flipped = bytearray(signed)
    flipped[40] ^= 1  # one bit of the memory array
    with pytest.raises(CacheFormatError, match="HMAC"):
        decode_state(bytes(flipped), SPEC, key=key, hmac_key=b"k" * 16)


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


def test_an_abandoned_or_lost_probe_frees_the_probe_slot() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset_s=1.0, clock=lambda: now[0])
    breaker.record_failure()
    now[0] = 1.0
    assert breaker.allow() and breaker.probing
    breaker.abandon()  # the probe was cancelled: no verdict, but the slot is free again
    assert breaker.state == "half_open" and not breaker.probing
    assert breaker.allow()  # a new probe
    assert not breaker.allow()
    now[0] = 2.5  # that probe never reported back (lost): after reset_s another may go
    assert breaker.allow()


def test_local_cache_hits_and_evicts_least_recent() -> None:
    async def main() -> None:
        cache = LocalCache(max_entries=2)
        rows = {f"k{i}": make_row(seed=i) for i in range(3)}
        await cache.set_many({"k0": (SPEC, rows["k0"]), "k1": (SPEC, rows["k1"])})
        got = await cache.get_many(["k0", "missing"], [SPEC, SPEC])
        assert got[1] is None and got[0] is not None
        np.testing.assert_array_equal(got[0].query, rows["k0"].query)
        await cache.set_many({"k2": (SPEC, rows["k2"])})  # evicts k1, the least recently used
        hits = await cache.get_many(["k0", "k1", "k2"], [SPEC] * 3)
        assert [r is not None for r in hits] == [True, False, True]
        assert len(cache) == 2

    asyncio.run(main())


def test_local_cache_refused_values_are_misses_counted_and_deleted() -> None:
    async def main() -> None:
        cache = LocalCache(max_entries=10)
        wide = make_row(d=16)
        cache.put_raw("poisoned", encode_state(wide, spec_of(wide)))
        cache.put_raw("junk", b"\x80\x04not-a-state")
        before = invalid_count()
        assert await cache.get_many(["poisoned", "junk"], [SPEC, SPEC]) == [None, None]
        assert invalid_count() - before == 2
        assert len(cache) == 0  # both deleted
        await cache.set_many({"bad": (SPEC, wide)})  # a row that does not fit its spec is not stored
        assert len(cache) == 0

    asyncio.run(main())


@pytest.mark.parametrize("value", [3e38, -20.0, float("nan"), float("inf")])
@pytest.mark.parametrize("field", ["memory", "query"])
def test_values_beyond_the_models_range_are_refused_and_not_cached(value: float, field: str) -> None:
    spec = StateSpec("fp-a", 5, 8, 4, max_abs=16.0)
    row = make_row()
    assert decode_state(encode_state(row, spec), spec).memory.shape == (5, 8)  # within range: served
    memory = np.full((5, 8), value, np.float32) if field == "memory" else row.memory
    query = np.full(4, value, np.float32) if field == "query" else row.query
    bad = StateRow(memory=memory, memory_mask=row.memory_mask, query=query)
    unbounded = StateSpec("fp-a", 5, 8, 4, max_abs=float("inf"))
    if np.isfinite(value):  # a well-formed value of finite extremes, as a writer without the bound makes
        with pytest.raises(CacheFormatError, match="range"):
            decode_state(encode_state(bad, unbounded), spec)
    with pytest.raises(CacheFormatError):
        encode_state(bad, spec)  # a row outside the range is never written either


def test_value_bytes_is_the_size_of_a_valid_value() -> None:
    row = make_row()
    assert SPEC.value_bytes(signed=False) == len(encode_state(row, SPEC))
    key = cache_key("fp-a", "u", np.array([1, 2]))
    assert SPEC.value_bytes(signed=True) == len(encode_state(row, SPEC, key=key, hmac_key=b"k" * 16))


def test_the_bound_comes_from_the_manifest_or_a_safe_default() -> None:
    from service.cache.codec import DEFAULT_STATE_BOUND
    from service.registry.loaded_model import state_bound

    assert state_bound({"max_abs": 12.5, "margin": 4.0}) == 12.5
    for missing in (
        None,
        {},
        {"max_abs": "x"},
        {"max_abs": -1},
        {"max_abs": float("inf")},
        {"max_abs": True},
    ):
        assert state_bound(missing) == DEFAULT_STATE_BOUND
    assert 1e3 <= DEFAULT_STATE_BOUND <= 1e6
