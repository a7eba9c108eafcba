"""The batcher with plain functions as the compute: batch forming, 429, 504, errors, draining; and
pipelined (prepare and finish on two threads): overlap, order, deadlines in the hand-off, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from service.engine.batcher import Batcher
from service.engine.jobs import BatcherConfig, Job, Stages
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


def test_a_row_past_the_work_budget_is_not_batched_with_cheap_rows() -> None:
    """Payload 1000 costs 1000 against a budget of 1000: the cheap rows queued with it go to the next
    batch (in order), and nothing is lost; without the budget all five share one batch."""

    async def run(budget: int | None) -> list[list[int]]:
        gate = threading.Event()
        batcher, rec = make(
            BatcherConfig(max_batch_size=8, max_wait_s=0.0, queue_size=100, work_budget=budget), gate
        )
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(0, far()))  # holds the compute thread at the gate
        await until(lambda: not batcher.idle and batcher.depth == 0)
        rest = [asyncio.ensure_future(batcher.submit(p, far(), cost=max(1, p))) for p in (1000, 1, 2, 3, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.gather(first, *rest) == [0, 2000, 2, 4, 6, 8]
        await batcher.stop(timeout_s=5)
        return rec.batches[1:]

    assert asyncio.run(run(None)) == [[1000, 1, 2, 3, 4]]
    assert asyncio.run(run(1000)) == [[1000], [1, 2, 3, 4]]
    assert asyncio.run(run(1002)) == [[1000, 1], [2, 3, 4]]  # what fits stays with it, in order


def test_heavy_and_light_rows_never_share_a_batch_and_take_turns() -> None:
    """Rows of cost >= 1000 are heavy: queued behind one another and among light rows, each batch
    holds one kind, and the kinds alternate, so a light row waits for at most one heavy batch."""

    async def run(heavy_cost: int | None) -> list[list[int]]:
        gate = threading.Event()
        config = BatcherConfig(max_batch_size=8, max_wait_s=0.0, queue_size=100, heavy_cost=heavy_cost)
        batcher, rec = make(config, gate)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(0, far()))  # holds the compute thread at the gate
        await until(lambda: not batcher.idle and batcher.depth == 0)
        payloads = (1000, 1, 2000, 2, 3000, 3)
        rest = [asyncio.ensure_future(batcher.submit(p, far(), cost=max(1, p))) for p in payloads]
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.gather(first, *rest) == [0, *(2 * p for p in payloads)]
        await batcher.stop(timeout_s=5)
        return rec.batches[1:]

    assert asyncio.run(run(None)) == [[1000, 1, 2000, 2, 3000, 3]]
    assert asyncio.run(run(1000)) == [[1, 2, 3], [1000, 2000, 3000]]


def test_heavy_rows_get_the_next_batch_after_a_light_one() -> None:
    """Batch forming alone (``Batcher._by_weight``): a light batch formed while heavy rows wait gives
    the next mixed batch to the heavy rows, and the one after to the light rows again."""

    async def main() -> list[list[int]]:
        batcher, _ = make(BatcherConfig(max_batch_size=8, max_wait_s=0.0, queue_size=100, heavy_cost=100))
        loop = asyncio.get_running_loop()

        def job(p: int) -> Job[int, int]:
            return Job(payload=p, deadline=far(), future=loop.create_future(), cost=p)

        formed = []
        for arrived in ([500, 1], [2], [3]):  # each time: what was deferred, then what arrived
            batch = [*batcher._deferred, *(job(p) for p in arrived)]
            batcher._deferred.clear()
            formed.append([j.payload for j in batcher._by_weight(batch)])
        return formed

    assert asyncio.run(main()) == [[1], [500], [2, 3]]


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


class TwoStage:
    """``encode`` (+1000) on the prepare thread, ``search`` (x2) on the compute thread; each stage
    records the payloads it saw and its thread, and may be held by a gate."""

    def __init__(self, config: BatcherConfig) -> None:
        self.encoded: list[list[int]] = []
        self.searched: list[list[int]] = []
        self.threads: dict[str, set[str]] = {"encode": set(), "search": set()}
        self.search_gate = threading.Event()
        self.search_gate.set()
        self.batcher: Batcher[int, int] = Batcher(Stages(finish=self.finish, prepare=self.prepare), config)

    def encode(self, payloads: list[int]) -> list[int | BaseException]:
        self.threads["encode"].add(threading.current_thread().name)
        self.encoded.append(payloads)
        return [ValueError(f"cannot encode {p}") if p == -2 else p + 1000 for p in payloads]

    def search(self, payloads: list[int], encoded: list[int]) -> list[int | BaseException]:
        self.threads["search"].add(threading.current_thread().name)
        self.search_gate.wait(timeout=10)
        self.searched.append(payloads)
        assert encoded == [p + 1000 for p in payloads]  # each job gets its own prepared value
        return [ValueError(f"bad {p}") if p < 0 else 2 * p for p in payloads]

    async def prepare(self, jobs: Sequence[Job[int, int]]) -> list[int | BaseException]:
        return await self.batcher.run_prepare(self.encode, [j.payload for j in jobs])

    async def finish(
        self, jobs: Sequence[Job[int, int]], encoded: Sequence[int]
    ) -> list[int | BaseException]:
        return await self.batcher.run_in_worker(self.search, [j.payload for j in jobs], list(encoded))


PIPELINED = BatcherConfig(max_batch_size=4, max_wait_s=0.0, queue_size=100, pipeline=True)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_pipeline_encodes_the_next_batch_while_the_current_one_is_searched() -> None:
    async def main() -> None:
        stages = TwoStage(PIPELINED)
        batcher = stages.batcher
        assert batcher.pipelined
        batcher.start()
        stages.search_gate.clear()
        first = asyncio.create_task(batcher.submit(0, far()))
        await until(lambda: stages.encoded == [[0]])
        await asyncio.sleep(0.05)  # job 0 is now held in search
        later = [asyncio.create_task(batcher.submit(i, far())) for i in (1, 2, 3)]
        await until(lambda: sorted(x for b in stages.encoded[1:] for x in b) == [1, 2, 3])
        assert stages.searched == [] and not batcher.idle  # encoded while the search was still held
        stages.search_gate.set()
        assert await first == 0 and [await t for t in later] == [2, 4, 6]
        assert stages.searched[1] == [1, 2, 3]  # every prepared job went into the next search batch
        assert len(stages.threads["encode"]) == len(stages.threads["search"]) == 1
        assert stages.threads["encode"] != stages.threads["search"]
        await batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_pipeline_keeps_arrival_order_and_each_job_its_own_result() -> None:
    async def main() -> None:
        stages = TwoStage(PIPELINED)
        stages.batcher.start()
        tasks = []
        for i in range(40):
            tasks.append(asyncio.create_task(stages.batcher.submit(i, far())))
            if i % 7 == 0:
                await asyncio.sleep(0.002)
        assert [await t for t in tasks] == [2 * i for i in range(40)]
        assert [x for b in stages.searched for x in b] == list(range(40))  # FIFO through both stages
        assert all(len(b) <= 4 for b in stages.searched)
        await stages.batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_pipeline_errors_of_either_stage_reach_only_their_request() -> None:
    async def main() -> None:
        stages = TwoStage(PIPELINED)
        stages.batcher.start()
        out = await asyncio.gather(
            *(stages.batcher.submit(p, far()) for p in (1, -2, -1, 3)), return_exceptions=True
        )
        assert out[0] == 2 and out[3] == 6
        assert isinstance(out[1], ValueError) and "encode" in str(out[1])
        assert isinstance(out[2], ValueError) and "bad -1" in str(out[2])
        assert -2 not in [x for b in stages.searched for x in b]  # a failed encode is not searched
        await stages.batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_pipeline_deadline_passing_in_the_handoff_is_never_searched() -> None:
    async def main() -> None:
        stages = TwoStage(PIPELINED)
        stages.batcher.start()
        stages.search_gate.clear()
        blocker = asyncio.create_task(stages.batcher.submit(1, far()))
        await until(lambda: stages.encoded == [[1]])
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await stages.batcher.submit(7, time.monotonic() + 0.1)  # encoded, then waits for the search
        assert [7] in stages.encoded
        stages.search_gate.set()
        assert await blocker == 2
        assert await stages.batcher.submit(5, far()) == 10
        assert 7 not in [x for b in stages.searched for x in b]
        await stages.batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_pipeline_stop_drains_queued_prepared_and_running_jobs() -> None:
    async def main() -> None:
        stages = TwoStage(PIPELINED)
        batcher = stages.batcher
        batcher.start()
        stages.search_gate.clear()
        pending = [asyncio.create_task(batcher.submit(i, far())) for i in range(10)]
        await until(lambda: len(stages.encoded) >= 2)  # some searched (held), some prepared, some queued
        stopping = asyncio.create_task(batcher.stop(timeout_s=5))
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable):
            await batcher.submit(99, far())  # draining: no new work
        stages.search_gate.set()
        await stopping
        assert [p.result() for p in pending] == [2 * i for i in range(10)]
        assert batcher.idle

    asyncio.run(main())


def test_without_pipeline_both_stages_run_in_turn_on_the_compute_thread() -> None:
    async def main() -> None:
        stages = TwoStage(BatcherConfig(max_batch_size=4, max_wait_s=0.0, queue_size=100, pipeline=False))
        assert not stages.batcher.pipelined
        stages.batcher.start()
        assert await asyncio.gather(*(stages.batcher.submit(i, far()) for i in range(6))) == [
            2 * i for i in range(6)
        ]
        assert stages.threads["encode"] == stages.threads["search"]
        assert stages.encoded == stages.searched  # each batch prepared and finished together
        await stages.batcher.stop(timeout_s=5)

    asyncio.run(main())
