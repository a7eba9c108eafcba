"""Dynamic batcher: one bounded queue, batches formed by one task, compute off the event loop,
encode of the next batch overlapping search of the current one.

Requests from many clients meet in one ``asyncio.Queue``. The batcher takes the first waiting
request, then keeps collecting until the batch has ``max_batch_size`` requests or ``max_wait_s`` has
passed, and drops those whose deadline already passed (they fail with :class:`DeadlineExceeded`
and are never computed). A batch then goes through the :class:`Stages` it was given:

* ``prepare(jobs)`` -> one value or exception per job (the service: cache lookup + encode of the
  misses), its heavy part on the *prepare* thread (:meth:`Batcher.run_prepare`);
* ``finish(jobs, prepared)`` -> one result or exception per job (the service: beam search +
  rerank), its heavy part on the *compute* thread (:meth:`Batcher.run_in_worker`).

With ``pipeline`` on, the two stages run as two tasks on two threads joined by a bounded hand-off
of prepared jobs: while the compute thread searches batch ``n``, the prepare task collects and
encodes what arrived since, and the compute task takes every prepared job (up to
``max_batch_size``, oldest first) as soon as it is free. The hand-off holds at most
``max_batch_size`` jobs, so prepare runs at most one batch ahead; a job whose deadline passes there
fails with :class:`DeadlineExceeded` before it is searched. With ``pipeline`` off (one core: the
stages would only take turns) both stages run one after the other on the compute thread, as a
plain ``process(jobs)`` function always does.

A full queue answers at once with :class:`QueueFull` (429 + Retry-After). :meth:`Batcher.stop` lets
queued, prepared and running jobs finish before the tasks end. Lower-priority work (the shadow
lane) runs on a third, background thread at OS nice 19 (:meth:`Batcher.run_low_priority`), each
stage only once :meth:`Batcher.wait_idle` says that no request is queued, prepared or computing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from service.engine.jobs import BatcherConfig, Handoff, Job, ProcessFn, Stages, deliver
from service.errors import DeadlineExceeded, QueueFull, Unavailable
from service.metrics import BATCH_SIZE, QUEUE_DEPTH, STAGE_SECONDS

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")
T = TypeVar("T")


def lower_thread_priority(nice: int = 19) -> None:
    """Lower the calling thread's OS scheduling priority (Linux: per-thread nice; no-op elsewhere)."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as exc:
            log.warning("could not lower the background thread's priority: %s", exc)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Batcher(Generic[Req, Res]):
    def __init__(self, process: ProcessFn[Req, Res] | Stages[Req, Res], config: BatcherConfig) -> None:
        if isinstance(process, Stages):
            self._stages: Stages[Req, Res] = process
        else:
            plain = process

            async def finish(
                jobs: Sequence[Job[Req, Res]], _: Sequence[Any]
            ) -> Sequence[Res | BaseException]:
                return await plain(jobs)

            self._stages = Stages(finish=finish)
        self._config = config
        self.pipelined = config.pipeline and self._stages.prepare is not None
        self._queue: asyncio.Queue[Job[Req, Res]] = asyncio.Queue(maxsize=config.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genret-compute")
        self._prepare_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="genret-prepare") if self.pipelined else None
        )
        self._background: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handoff: Handoff[tuple[Job[Req, Res], Any]] | None = None
        self._closing = False
        self._active: dict[int, Job[Req, Res]] = {}  # taken from the queue, not yet answered
        self._deferred: deque[Job[Req, Res]] = deque()  # past a batch's work budget: first in the next
        self._heavy_turn = False  # heavy jobs waited out one light batch: the next batch is theirs
        self._went_idle: asyncio.Event | None = None  # set when the last job is answered with an empty queue

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def idle(self) -> bool:
        return self._queue.empty() and not self._active

    def start(self) -> None:
        if self._tasks:
            return
        self._went_idle = asyncio.Event()
        if self.pipelined:
            self._handoff = Handoff(self._config.max_batch_size)
            self._tasks = [
                asyncio.create_task(self._run_prepare_stage(), name="genret-batcher-prepare"),
                asyncio.create_task(self._run_finish_stage(), name="genret-batcher-compute"),
            ]
        else:
            self._tasks = [asyncio.create_task(self._run(), name="genret-batcher")]

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running (:attr:`idle`); False when ``timeout_s`` passed first
        or the batcher is stopping. Woken by the batcher itself, no polling."""
        deadline = time.monotonic() + timeout_s
        while not self.idle:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing or self._went_idle is None:
                return False
            self._went_idle.clear()
            try:
                await asyncio.wait_for(self._went_idle.wait(), timeout=remaining)
            except TimeoutError:
                return False
        return not self._closing

    async def submit(self, payload: Req, deadline: float, cost: int = 1) -> Res:
        """Queue ``payload`` and wait for its result; raises QueueFull / DeadlineExceeded / Unavailable.
        ``cost``: its share of a batch's work budget (``BatcherConfig.work_budget``)."""
        if self._closing or not self._tasks:
            raise Unavailable("the batcher is not running (starting up or shutting down)")
        loop = asyncio.get_running_loop()
        job: Job[Req, Res] = Job(payload=payload, deadline=deadline, future=loop.create_future(), cost=cost)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(
                f"request queue is full ({self._config.queue_size} waiting); retry later",
                retry_after_s=self._config.retry_after_s,
            ) from None
        QUEUE_DEPTH.set(self._queue.qsize())
        try:
            # on timeout wait_for cancels the future, so the batcher skips the job if still waiting
            return await asyncio.wait_for(job.future, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline passed after {(time.monotonic() - job.enqueued_at) * 1000:.0f} ms"
            ) from None

    async def run_in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread (one at a time, off the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def run_prepare(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the prepare thread when pipelined, else on the compute thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prepare_executor or self._executor, fn, *args)

    async def run_low_priority(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the background thread (OS nice 19: the compute thread, the event loop
        and the load generator win the CPU when both are runnable)."""
        if self._background is None:
            self._background = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="genret-background", initializer=lower_thread_priority
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._background, fn, *args)

    async def stop(self, timeout_s: float) -> None:
        """Refuse new work, let queued, prepared and running jobs finish (up to ``timeout_s``), then end."""
        self._closing = True
        if self._went_idle is not None:
            self._went_idle.set()  # wake wait_idle() callers: they give up while closing
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        left = list(self._active.values())  # only left when the grace period ran out
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        for job in left:
            deliver(job, Unavailable("shutting down before this request could run"))
        self._active.clear()
        for executor in (self._executor, self._prepare_executor, self._background):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    # --- batch forming and the stages ---

    async def _collect(self) -> list[Job[Req, Res]]:
        """The next batch: jobs deferred by the last one first, then the queue, up to ``max_batch_size``
        or ``max_wait_s``; then :meth:`_by_weight` and :meth:`_within_budget`."""
        if self._deferred:
            first = self._deferred.popleft()
        else:
            first = await self._queue.get()
            self._active[id(first)] = first
        batch = [first]
        wait_until = time.monotonic() + self._config.max_wait_s
        while len(batch) < self._config.max_batch_size:
            if self._deferred:
                batch.append(self._deferred.popleft())
                continue
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout=remaining)
                except TimeoutError:
                    break
            self._active[id(job)] = job
            batch.append(job)
        QUEUE_DEPTH.set(self._queue.qsize())
        return self._within_budget(self._by_weight(batch))

    def _by_weight(self, batch: list[Job[Req, Res]]) -> list[Job[Req, Res]]:
        """Heavy jobs (``heavy_cost`` and up) and light ones never share a batch, and take turns: a
        light job waits for at most one heavy batch, and heavy jobs for at most one light batch. The
        group left out goes, in order, to the front of the next batch."""
        heavy_cost = self._config.heavy_cost
        if heavy_cost is None:
            return batch
        heavy = [job for job in batch if job.cost >= heavy_cost]
        if not heavy or len(heavy) == len(batch):
            self._heavy_turn = False
            return batch
        light = [job for job in batch if job.cost < heavy_cost]
        chosen, left = (heavy, light) if self._heavy_turn else (light, heavy)
        self._heavy_turn = not self._heavy_turn
        self._deferred.extendleft(reversed(left))
        return chosen

    def _within_budget(self, batch: list[Job[Req, Res]]) -> list[Job[Req, Res]]:
        """The jobs, in order, whose summed cost stays within the work budget (the first always goes);
        the others are deferred, in order, to the front of the next batch."""
        budget = self._config.work_budget
        if budget is None or sum(job.cost for job in batch) <= budget:
            return batch
        kept, spent = [batch[0]], batch[0].cost
        for job in batch[1:]:
            if spent + job.cost <= budget:
                kept.append(job)
                spent += job.cost
            else:
                self._deferred.append(job)
        return kept

    def _answered(self, jobs: Sequence[Job[Req, Res]]) -> None:
        for job in jobs:
            self._active.pop(id(job), None)
        if self._went_idle is not None and self.idle:
            self._went_idle.set()

    @staticmethod
    def _live(batch: Sequence[Job[Req, Res]], where: str) -> list[Job[Req, Res]]:
        """The jobs still wanted: a gone client is skipped, a passed deadline fails (never computed)."""
        now = time.monotonic()
        live = []
        for job in batch:
            if job.future.done():
                continue
            if now >= job.deadline:
                waited = (now - job.enqueued_at) * 1000
                job.future.set_exception(DeadlineExceeded(f"deadline passed after {waited:.0f} ms {where}"))
                continue
            live.append(job)
        return live

    def _admit(self, batch: Sequence[Job[Req, Res]]) -> list[Job[Req, Res]]:
        now = time.monotonic()
        for job in batch:
            job.queue_seconds = now - job.enqueued_at
            STAGE_SECONDS.labels(stage="queue").observe(job.queue_seconds)
        return self._live(batch, "in the queue")

    async def _prepare(self, jobs: list[Job[Req, Res]]) -> list[tuple[Job[Req, Res], Any]]:
        """Run ``prepare``; jobs it gave an exception are answered with it, the rest come back."""
        if self._stages.prepare is None:
            return [(job, None) for job in jobs]
        values = await self._stages.prepare(jobs)
        if len(values) != len(jobs):
            raise RuntimeError(f"prepare returned {len(values)} values for {len(jobs)} jobs")
        ready = []
        for job, value in zip(jobs, values, strict=True):
            if isinstance(value, BaseException):
                deliver(job, value)
            else:
                ready.append((job, value))
        return ready

    async def _finish(self, ready: Sequence[tuple[Job[Req, Res], Any]]) -> None:
        jobs = [job for job, _ in ready]
        BATCH_SIZE.observe(len(jobs))
        results = await self._stages.finish(jobs, [value for _, value in ready])
        if len(results) != len(jobs):
            raise RuntimeError(f"finish returned {len(results)} results for {len(jobs)} jobs")
        for job, result in zip(jobs, results, strict=True):
            deliver(job, result)

    @staticmethod
    def _fail(jobs: Sequence[Job[Req, Res]], exc: Exception) -> None:
        log.exception("batch failed")  # never let one batch kill the batcher
        for job in jobs:
            deliver(job, exc)

    async def _run(self) -> None:
        """Not pipelined: each batch goes through both stages before the next is formed."""
        while True:
            batch = await self._collect()
            try:
                live = self._admit(batch)
                if live:
                    ready = await self._prepare(live)
                    if ready:
                        await self._finish(ready)
            except Exception as exc:
                self._fail(batch, exc)
            finally:
                self._answered(batch)

    async def _run_prepare_stage(self) -> None:
        """Pipelined, first task: form a batch, prepare it, hand its jobs to the compute task."""
        assert self._handoff is not None
        while True:
            batch = await self._collect()
            ready: list[tuple[Job[Req, Res], Any]] = []
            try:
                live = self._admit(batch)
                if live:
                    ready = await self._prepare(live)
            except Exception as exc:
                self._fail(batch, exc)
            handed = {id(job) for job, _ in ready}
            self._answered([job for job in batch if id(job) not in handed])
            if ready:
                await self._handoff.put(ready)

    async def _run_finish_stage(self) -> None:
        """Pipelined, second task: every prepared job (oldest first, up to a batch) through finish."""
        assert self._handoff is not None
        while True:
            taken = await self._handoff.take(self._config.max_batch_size)
            try:
                live = {id(job) for job in self._live([job for job, _ in taken], "before the search")}
                ready = [(job, value) for job, value in taken if id(job) in live]
                if ready:
                    await self._finish(ready)
            except Exception as exc:
                self._fail([job for job, _ in taken], exc)
            finally:
                self._answered([job for job, _ in taken])
