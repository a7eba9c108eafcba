"""The batcher with a plain function as the compute: batch forming, 429, 504, errors, draining."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from service.batcher import Batcher, BatcherConfig, Job
from service.errors import DeadlineExceeded, QueueFull, Unavailable


class Recorder:
    """Doubles each payload on the worker thread and remembers the batches it saw."""

    def __init__(self, batcher_ref: list[Batcher[int, int]], gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self._ref = batcher_ref
        self._gate = gate

    def compute(self, payloads: list[int]) -> list[int | BaseException]:
        self.threads.add(threading.current_thread().name)
        if self._gate is not None:
            self._gate.wait(timeout=10)
        self.batches.append(payloads)
        return [ValueError(f"bad {p}") if p < 0 else 2 * p for p in payloads]

    async def process(self, jobs: Sequence[Job[int, int]]) -> list[int | BaseException]:
        return await self._ref[0].run_in_worker(self.compute, [j.payload for j in jobs])


def make(config: BatcherConfig, gate: threading.Event | None = None) -> tuple[Batcher[int, int], Recorder]:
    ref: list[Batcher[int, int]] = []
    rec = Recorder(ref, gate)
    batcher: Batcher[int, int] = Batcher(rec.process, config)
    ref.append(batcher)
    return batcher, rec


def far() -> float:
    return time.monotonic() + 30.0


def test_results_come_back_in_batches_off_the_event_loop() -> None:
    async def main() -> None:
        batcher, rec = make(BatcherConfig(max_batch_size=4, max_wait_s=0.05, queue_size=100))
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i, far()) for i in range(10)))
        assert results == [2 * i for i in range(10)]
        assert all(len(b) <= 4 for b in rec.batches)
        assert sorted(x for b in rec.batches for x in b) == list(range(10))
        assert len(rec.batches) < 10  # requests were grouped
        assert rec.threads and threading.current_thread().name not in rec.threads
        await batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_per_item_errors_reach_only_their_request() -> None:
    async def main() -> None:
        batcher, _ = make(BatcherConfig(max_batch_size=8, max_wait_s=0.01, queue_size=100))
        batcher.start()
        out = await asyncio.gather(*(batcher.submit(p, far()) for p in (1, -1, 3)), return_exceptions=True)
        assert out[0] == 2 and out[2] == 6
        assert isinstance(out[1], ValueError)
        await batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_full_queue_answers_at_once_with_queue_full() -> None:
    async def main() -> None:
        gate = threading.Event()
        batcher, _ = make(
            BatcherConfig(max_batch_size=1, max_wait_s=0.0, queue_size=2, retry_after_s=3), gate
        )
        batcher.start()
        first = asyncio.create_task(batcher.submit(0, far()))
        await asyncio.sleep(0.05)  # the batcher holds job 0 in compute, blocked on the gate
        queued = [asyncio.create_task(batcher.submit(i, far())) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await batcher.submit(99, far())
        assert info.value.headers["Retry-After"] == "3"
        gate.set()
        assert await first == 0
        assert [await q for q in queued] == [2, 4]
        await batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_expired_requests_get_deadline_exceeded_and_are_never_computed() -> None:
    async def main() -> None:
        gate = threading.Event()
        batcher, rec = make(BatcherConfig(max_batch_size=1, max_wait_s=0.0, queue_size=10), gate)
        batcher.start()
        blocker = asyncio.create_task(batcher.submit(1, far()))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(7, time.monotonic() + 0.05)  # expires while job 1 blocks the worker
        gate.set()
        assert await blocker == 2
        assert await batcher.submit(5, far()) == 10
        assert 7 not in [x for b in rec.batches for x in b]
        await batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_stop_finishes_queued_work_and_then_refuses() -> None:
    async def main() -> None:
        batcher, _ = make(BatcherConfig(max_batch_size=2, max_wait_s=0.01, queue_size=100))
        batcher.start()
        pending = [asyncio.create_task(batcher.submit(i, far())) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.stop(timeout_s=5)
        assert [p.result() for p in pending] == [0, 2, 4, 6, 8, 10]
        with pytest.raises(Unavailable):
            await batcher.submit(1, far())

    asyncio.run(main())


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError):
        BatcherConfig(max_batch_size=0, max_wait_s=0.0, queue_size=1)
