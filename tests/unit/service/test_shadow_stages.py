"""The batcher pieces the staged shadow path stands on: ``wait_idle`` (woken by the batcher, gives
up on timeout or shutdown) and ``run_low_priority`` (a separate thread with OS nice 19)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Sequence

import pytest

from service.engine.batcher import Batcher
from service.engine.jobs import BatcherConfig, Job


def make_batcher(gate: threading.Event) -> Batcher[int, int]:
    ref: list[Batcher[int, int]] = []

    def compute(payloads: list[int]) -> list[int | BaseException]:
        gate.wait(timeout=10)
        return [2 * p for p in payloads]

    async def process(jobs: Sequence[Job[int, int]]) -> list[int | BaseException]:
        return await ref[0].run_in_worker(compute, [j.payload for j in jobs])

    batcher: Batcher[int, int] = Batcher(
        process, BatcherConfig(max_batch_size=4, max_wait_s=0.0, queue_size=8)
    )
    ref.append(batcher)
    return batcher


def test_wait_idle_returns_when_the_last_batch_ends() -> None:
    gate = threading.Event()

    async def scenario() -> list[str]:
        batcher = make_batcher(gate)
        batcher.start()
        events: list[str] = []
        assert await batcher.wait_idle(0.0)  # idle from the start: no wait at all
        primary = asyncio.get_running_loop().create_task(batcher.submit(21, time.monotonic() + 30))
        await asyncio.sleep(0)
        assert not batcher.idle

        async def waiter() -> None:
            assert await batcher.wait_idle(30.0)
            events.append("idle")

        waiting = asyncio.get_running_loop().create_task(waiter())
        assert not await batcher.wait_idle(0.01)  # the batch is held on `gate`: times out
        events.append("releasing")
        gate.set()
        assert await primary == 42
        events.append("primary answered")
        await waiting
        await batcher.stop(timeout_s=1.0)
        assert not await batcher.wait_idle(1.0)  # stopped: never "idle" for new background work
        return events

    events = asyncio.run(scenario())
    assert events.index("releasing") < events.index("idle")
    assert set(events) == {"releasing", "primary answered", "idle"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux-only")
def test_background_work_runs_on_a_separate_low_priority_thread() -> None:
    gate = threading.Event()
    gate.set()

    def where() -> tuple[str, int]:
        me = threading.current_thread()
        return me.name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def scenario() -> tuple[tuple[str, int], tuple[str, int]]:
        batcher = make_batcher(gate)
        batcher.start()
        try:
            return await batcher.run_in_worker(where), await batcher.run_low_priority(where)
        finally:
            await batcher.stop(timeout_s=1.0)

    (compute_name, compute_nice), (background_name, background_nice) = asyncio.run(scenario())
    assert compute_name.startswith("genret-compute") and background_name.startswith("genret-background")
    assert background_nice == 19 and compute_nice == os.getpriority(os.PRIO_PROCESS, 0)
