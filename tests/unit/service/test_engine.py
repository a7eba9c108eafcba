"""The engine in process (no uvicorn): a synthetic bundle loaded by the real registry, real torch
sessions, a real LocalCache. Every answer is held to the retriever's own one-shot ``retrieve``
(the reference), whether the states were fresh on the device, came from the cache, or both in one
batch; fresh states reach the host only for a cache that stores them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from benchmarks.synthetic_bundle import make_synthetic_bundle, synthetic_item_ids
from service.cache.codec import StateRow, StateSpec
from service.cache.state_cache import LocalCache, NoCache, StateCache
from service.engine.compute import BatchCompute
from service.engine.engine import Engine
from service.engine.results import Retrieval
from service.engine.states import DeviceRow
from service.engine.strategy import strategy_for
from service.errors import LimitExceeded
from service.http.responses import to_response
from service.registry.model_registry import ModelRegistry
from service.schemas import RetrieveRequest
from service.settings import Settings

T = TypeVar("T")
NUM_ITEMS = 300
IDS = [str(i) for i in synthetic_item_ids(NUM_ITEMS)]  # IDS[d] = raw id of dense id d (IDS[0] = "")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "syn"
    return make_synthetic_bundle(out, NUM_ITEMS, 4, 3, dim=16, max_history=8, backends=("torch",))


def settings_for(bundle: Path, **overrides: Any) -> Settings:
    return Settings(bundle_path=bundle, decoder_backend="torch", device="cpu", max_wait_ms=20.0, **overrides)


def run(settings: Settings, cache: StateCache, work: Callable[[Engine], Awaitable[T]]) -> T:
    registry = ModelRegistry(settings)
    registry.load_all()

    async def main() -> T:
        engine = Engine(settings, registry, cache)
        engine.start()
        try:
            return await work(engine)
        finally:
            await engine.stop(5.0)

    return asyncio.run(main())


def requests(n: int, *, user: str = "u") -> list[RetrieveRequest]:
    """Histories of different lengths (some longer than max_history = 8), so rows are padded."""
    rng = np.random.default_rng(7)
    return [
        RetrieveRequest(
            user_id=f"{user}{i}",
            history=[IDS[j] for j in rng.integers(1, NUM_ITEMS + 1, size=1 + (3 * i) % 11)],
            exclude=[IDS[j] for j in rng.integers(1, NUM_ITEMS + 1, size=i % 3)],
            k=5 + i % 4,
            beam_size=6,
        )
        for i in range(n)
    ]


def reference(engine: Engine, request: RetrieveRequest) -> tuple[list[str], np.ndarray]:
    """The retriever's one-shot answer for the engine's mapping of ``request``."""
    mapped = engine.mapper.map(request)
    p = mapped.row_input()
    model = mapped.model
    result = model.retriever.retrieve([p.history], k=p.k, beam_size=p.beam_size, exclude=[p.exclude])
    keep = (result.items[0] > 0) & np.isfinite(result.scores[0])
    return [model.raw_ids[int(d)] for d in result.items[0][keep]], result.scores[0][keep]


def assert_same(engine: Engine, request: RetrieveRequest, got: Retrieval) -> None:
    items, scores = reference(engine, request)
    assert list(got.items) == items
    # batched rows are left-padded to the batch's longest history; padding changes float sums only
    np.testing.assert_allclose(got.scores, scores, rtol=1e-5, atol=1e-5)


def test_fresh_cached_and_mixed_batches_answer_like_the_retriever(bundle: Path) -> None:
    cache = LocalCache(max_entries=100)
    reqs = requests(8)

    async def work(engine: Engine) -> None:
        fresh = await engine.retrieve_batch(reqs)  # every row a miss: states fresh on the device
        assert len(cache) == len(reqs)
        cached = await engine.retrieve_batch(reqs)  # every row a hit: states from the cache
        mixed_reqs = reqs[:4] + requests(4, user="new")  # hits and misses in one batch
        mixed = await engine.retrieve_batch(mixed_reqs)
        for request, a, b in zip(reqs, fresh, cached, strict=True):
            assert_same(engine, request, a)
            assert a.items == b.items
        for request, got in zip(mixed_reqs, mixed, strict=True):
            assert_same(engine, request, got)
        assert max(r.batch_size for r in fresh) > 1  # really batched
        assert all(r.fallback is None and r.history_used >= 1 for r in fresh)

    run(settings_for(bundle), cache, work)


class CountingNoCache(NoCache):
    """Caching off, counting the writes the engine attempts."""

    def __init__(self) -> None:
        self.writes = 0

    async def set_many(self, rows: Mapping[str, tuple[StateSpec, StateRow]]) -> None:
        self.writes += 1


def test_with_the_cache_off_fresh_states_stay_on_the_device(bundle: Path) -> None:
    cache = CountingNoCache()

    async def work(engine: Engine) -> None:
        assert not engine.store
        reqs = requests(6)
        for request, got in zip(reqs, await engine.retrieve_batch(reqs), strict=True):
            assert_same(engine, request, got)
        payloads = [(await engine.map(r)).row_input() for r in reqs]
        for store in (False, True):
            compute = BatchCompute(
                payloads, [None] * len(payloads), strategy=engine.strategy, device="cpu", store=store
            )
            out = compute.encode_misses()
            assert all(isinstance(row, DeviceRow) for row in compute.rows)  # the search reads these
            assert len(out.fresh) == (len(payloads) if store else 0)  # host copies: for a cache only
            assert all(isinstance(row, StateRow) for _, row in out.fresh.values())

    run(settings_for(bundle), cache, work)
    assert cache.writes == 0


def test_bruteforce_strategy_is_the_exact_top_k(bundle: Path) -> None:
    reqs = requests(5)

    async def work(engine: Engine) -> None:
        assert engine.strategy.name == "bruteforce"
        for request, got in zip(reqs, await engine.retrieve_batch(reqs), strict=True):
            mapped = await engine.map(request)
            model = mapped.model
            query = model.retriever.encode([mapped.history]).query[0].numpy()  # [Dr]
            scores = model.item_emb.numpy() @ query  # [N+1]
            scores[0] = -np.inf
            scores[mapped.exclude] = -np.inf
            expected = np.argsort(-scores, kind="stable")[: mapped.k]
            assert list(got.items) == [model.raw_ids[int(d)] for d in expected]
            np.testing.assert_allclose(got.scores, scores[expected], rtol=1e-5, atol=1e-5)
            assert got.num_candidates == NUM_ITEMS - len(mapped.exclude)

    run(settings_for(bundle, search_mode="bruteforce"), NoCache(), work)
    assert strategy_for("generative").name == "generative"
    with pytest.raises(ValueError, match="unknown search mode"):
        strategy_for("exhaustive")


def test_unknown_history_gets_popular_items_and_limits_name_the_field(bundle: Path) -> None:
    async def work(engine: Engine) -> tuple[Retrieval, Retrieval]:
        with pytest.raises(LimitExceeded) as err:
            await engine.retrieve(RetrieveRequest(history=[IDS[1]], k=engine.settings.max_k + 1))
        assert err.value.loc == ("k",)
        with pytest.raises(LimitExceeded) as err:
            await engine.retrieve_batch([RetrieveRequest(history=[IDS[1]], beam_size=10**6)])
        assert err.value.loc == ("requests", 0, "beam_size")
        unknown = RetrieveRequest(history=["nope", "never"], exclude=[IDS[1]], k=4, debug=True)
        return await engine.retrieve(unknown), await engine.retrieve(
            RetrieveRequest(history=[IDS[2]], k=4, debug=True)
        )

    popular, answered = run(settings_for(bundle), NoCache(), work)
    assert popular.fallback == "popular" and popular.unknown_history_items == 2
    assert len(popular.items) == 4 and IDS[1] not in popular.items
    assert list(popular.scores) == sorted(popular.scores, reverse=True)
    body = to_response(popular, debug=True)  # the API's response, built from the domain result
    assert body.fallback == "popular" and body.debug is not None and body.debug.batch_size == 0
    assert [i.id for i in body.items] == list(popular.items)
    assert to_response(answered, debug=False).debug is None
    shown = to_response(answered, debug=True).debug
    assert shown is not None and set(shown.timings_ms) == {"queue"}  # nothing timed after the cache lookup
