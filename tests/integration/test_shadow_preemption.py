"""Shadow copies give way to primary batches: a real Engine (real bundle, ONNX Runtime, batcher)
in-process, the shadow run in stages through ``Engine.run_shadow``.

No timed assertions: the tests check the order of events (which stage started while which primary
request was pending), results, and counters.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from service.cache.state_cache import NoCache
from service.engine.engine import Engine
from service.engine.shadow_executor import ShadowStale
from service.registry.model_registry import ModelRegistry
from service.schemas import RetrieveRequest
from service.settings import Settings
from service.shadow.agreement import Ranked, ShadowJob
from service.shadow.lane import REGISTRY, ShadowConfig, ShadowLane

from .conftest import BUNDLE_LEVELS


def item_ids(bundle: Path, n: int, seed: int) -> list[str]:
    with np.load(bundle / "items.npz", allow_pickle=False) as data:
        ids = [str(i) for i in data["item_ids"][1:]]
    rng = np.random.default_rng(seed)
    return [ids[i] for i in rng.choice(len(ids), size=n, replace=False)]


def model_name(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["name"])


async def running_engine(bundle: Path, **overrides: object) -> Engine:
    settings = Settings(bundle_path=bundle, local_cache_entries=0, **overrides)  # type: ignore[arg-type]
    registry = ModelRegistry(settings)
    await asyncio.to_thread(registry.load_all)
    engine = Engine(settings, registry, NoCache())
    engine.start()
    return engine


def test_primary_batch_overtakes_a_running_shadow_copy(bundle_dir: Path) -> None:
    """The primary request is submitted while a shadow copy is between its stages: the primary
    answers before the copy finishes, and no shadow stage ever starts while primary work waits."""
    events: list[tuple[str, str, bool]] = []
    name = model_name(bundle_dir)

    async def scenario() -> tuple[list[str], list[str]]:
        # a long batch-forming window, so that a shadow stage that ignored the batcher would start
        # while the primary request is queued or being collected
        engine = await running_engine(bundle_dir, max_wait_ms=50.0, max_beam_size=256)
        primary_request = RetrieveRequest(history=item_ids(bundle_dir, 5, seed=1), k=10, beam_size=20)
        shadow_request = RetrieveRequest(
            history=item_ids(bundle_dir, 30, seed=2), k=50, beam_size=200, model=name
        )
        primary_task: list[asyncio.Task[list[str]]] = []

        async def primary() -> list[str]:
            events.append(("primary", "submitted", engine.batcher.idle))
            response = await engine.retrieve(primary_request)
            events.append(("primary", "done", engine.batcher.idle))
            return list(response.items)

        def on_stage(stage: str) -> None:
            events.append(("shadow", stage, engine.batcher.idle))
            if not primary_task:  # the first stage is about to run: the primary arrives now
                primary_task.append(asyncio.get_running_loop().create_task(primary()))

        try:
            shadow = await engine.run_shadow(shadow_request, on_stage=on_stage)
            events.append(("shadow", "done", engine.batcher.idle))
            primary_items = await primary_task[0]
            # the same requests, one at a time: a shadow copy never changes an answer
            alone_shadow = await engine.run_shadow(shadow_request)
            alone_primary = await engine.retrieve(primary_request)
            assert alone_shadow.items == shadow.items
            assert list(alone_primary.items) == primary_items
            return primary_items, list(shadow.items)
        finally:
            await engine.stop(grace_s=5.0)

    primary_items, shadow_items = asyncio.run(scenario())
    assert len(primary_items) == 10 and len(shadow_items) == 50
    order = [(who, what) for who, what, _ in events]
    stages = [what for who, what in order if who == "shadow" and what != "done"]
    assert stages == ["encode", *[f"level{i + 1}" for i in range(BUNDLE_LEVELS)], "rerank"]
    assert order.index(("primary", "submitted")) < order.index(("shadow", "level1"))
    assert order.index(("primary", "done")) < order.index(("shadow", "done"))
    # every shadow stage started while the batcher had nothing queued, forming or computing
    assert all(idle for who, what, idle in events if who == "shadow" and what != "done"), events


def test_a_copy_that_cannot_find_spare_capacity_is_dropped_as_stale(bundle_dir: Path) -> None:
    """While the primary batcher stays busy (a 500 ms batch-forming window), a shadow copy with a
    50 ms budget gives up with ShadowStale, which the lane counts as dropped, not as an error."""
    name = model_name(bundle_dir)

    def dropped(reason: str) -> float:
        return REGISTRY.get_sample_value("genret_shadow_dropped_total", {"reason": reason}) or 0.0

    async def scenario() -> tuple[ShadowLane[RetrieveRequest], float]:
        engine = await running_engine(bundle_dir, max_wait_ms=500.0, shadow_max_age_s=0.05)
        stale_before = dropped("stale")

        async def run_shadow(request: RetrieveRequest) -> Ranked:
            response = await engine.run_shadow(request)
            return Ranked(response.items, name, "v", float("nan"))

        # the lane's own idle check passes; the engine's per-stage check is what must shed the copy
        lane: ShadowLane[RetrieveRequest] = ShadowLane(
            run_shadow, ShadowConfig(max_age_s=60.0), primary_idle=lambda: True
        )
        lane.start()
        try:
            primary = asyncio.get_running_loop().create_task(
                engine.retrieve(RetrieveRequest(history=item_ids(bundle_dir, 4, seed=3), k=5))
            )
            await asyncio.sleep(0)  # the primary request is queued: the batcher is busy for 500 ms
            assert not engine.batcher.idle
            with pytest.raises(ShadowStale, match="gave way to primary batches"):
                await engine.run_shadow(RetrieveRequest(history=item_ids(bundle_dir, 4, seed=4), model=name))
            request = RetrieveRequest(history=item_ids(bundle_dir, 4, seed=5), model=name)
            job = ShadowJob(request, Ranked(("x",), "p", "v", 0.001), name, "default", "e", "1", "h", 5)
            assert lane.offer(job)
            await lane.join()
            assert len((await primary).items) == 5  # the primary itself was never held up
            return lane, dropped("stale") - stale_before
        finally:
            await lane.stop()
            await engine.stop(grace_s=5.0)

    lane, stale = asyncio.run(scenario())
    assert stale == 1
    assert lane.stats["dropped_stale"] == 1 and lane.stats["error"] == 0 and lane.stats["ok"] == 0


@pytest.mark.parametrize("search_mode", ["generative", "bruteforce"])
def test_a_staged_shadow_copy_answers_like_the_primary_path(bundle_dir: Path, search_mode: str) -> None:
    """Same request through ``run_shadow`` (staged, background thread) and ``retrieve`` (batched,
    one-shot search): the same items with the same scores, in both search modes."""
    name = model_name(bundle_dir)

    async def scenario() -> list[tuple[list[str], list[float], list[str], list[float]]]:
        engine = await running_engine(bundle_dir, search_mode=search_mode)
        try:
            out = []
            for seed in range(3):
                request = RetrieveRequest(
                    history=item_ids(bundle_dir, 3 + 4 * seed, seed=10 + seed),
                    exclude=item_ids(bundle_dir, 5, seed=20 + seed),
                    k=10,
                    beam_size=20,
                    model=name,
                )
                primary, shadow = await engine.retrieve(request), await engine.run_shadow(request)
                out.append(
                    (
                        list(primary.items),
                        list(primary.scores),
                        list(shadow.items),
                        list(shadow.scores),
                    )
                )
            return out
        finally:
            await engine.stop(grace_s=5.0)

    for primary_ids, primary_scores, shadow_ids, shadow_scores in asyncio.run(scenario()):
        assert len(primary_ids) == 10  # 20 single-item leaves, at most 5 of them excluded
        assert shadow_ids == primary_ids
        np.testing.assert_allclose(shadow_scores, primary_scores, rtol=1e-6, atol=1e-6)
