"""Dynamic batcher: one bounded queue, one task forming batches, compute off the event loop.

Requests from many clients meet in one ``asyncio.Queue``. One batcher task takes the first waiting
request, then keeps collecting until the batch has ``max_batch_size`` requests or ``max_wait_s`` has
passed, drops those whose deadline already passed (they fail with :class:`DeadlineExceeded` and are
never computed), and hands the batch to ``process`` — an async function that does its heavy part with
:meth:`Batcher.run_in_worker` (a single worker thread, so the event loop keeps serving).

A full queue answers at once with :class:`QueueFull` (429 + Retry-After). :meth:`Batcher.stop` lets
queued and running batches finish before the task ends.

Lower-priority work (the shadow lane, ``service.engine``) runs small stages on a second,
background thread with a lowered OS priority (:meth:`Batcher.run_low_priority`), each only after
:meth:`Batcher.wait_idle` says that no batch is queued, being formed or computing, so a primary batch
overlaps with at most one such stage and wins the CPU while it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.errors import DeadlineExceeded, QueueFull, Unavailable
from service.metrics import BATCH_SIZE, QUEUE_DEPTH, STAGE_SECONDS

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")
T = TypeVar("T")


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int
    max_wait_s: float
    queue_size: int
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.queue_size < 1 or self.max_wait_s < 0:
            raise ValueError(f"invalid batcher config {self}")


@dataclass
class Job(Generic[Req, Res]):
    """One queued request: its payload, when it must be answered, and where the answer goes."""

    payload: Req
    deadline: float  # time.monotonic() seconds
    future: asyncio.Future[Res]
    enqueued_at: float = field(default_factory=time.monotonic)
    queue_seconds: float = 0.0


# process(batch) -> one result or exception per job, in order
ProcessFn = Callable[[Sequence[Job[Req, Res]]], Awaitable[Sequence[Res | BaseException]]]


def lower_thread_priority(nice: int = 19) -> None:
    """Lower the calling thread's OS scheduling priority (Linux: per-thread nice; no-op elsewhere)."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as exc:
            log.warning("could not lower the background thread's priority: %s", exc)


class Batcher(Generic[Req, Res]):
    def __init__(self, process: ProcessFn[Req, Res], config: BatcherConfig) -> None:
        self._process = process
        self._config = config
        self._queue: asyncio.Queue[Job[Req, Res]] = asyncio.Queue(maxsize=config.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genret-compute")
        self._background: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._busy = False
        self._went_idle: asyncio.Event | None = None  # set when the last batch ends with an empty queue

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def idle(self) -> bool:
        return self._queue.empty() and not self._busy

    def start(self) -> None:
        if self._task is None:
            self._went_idle = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="genret-batcher")

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

    async def submit(self, payload: Req, deadline: float) -> Res:
        """Queue ``payload`` and wait for its result; raises QueueFull / DeadlineExceeded / Unavailable."""
        if self._closing or self._task is None:
            raise Unavailable("the batcher is not running (starting up or shutting down)")
        loop = asyncio.get_running_loop()
        job: Job[Req, Res] = Job(payload=payload, deadline=deadline, future=loop.create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(
                f"request queue is full ({self._config.queue_size} waiting); retry later",
                retry_after_s=self._config.retry_after_s,
            ) from None
        QUEUE_DEPTH.set(self._queue.qsize())
        try:
            # on timeout wait_for cancels the future, so the batcher skips the job if still queued
            return await asyncio.wait_for(job.future, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline passed after {(time.monotonic() - job.enqueued_at) * 1000:.0f} ms"
            ) from None

    async def run_in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread (one at a time, off the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

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
        """Refuse new work, let queued and running batches finish (up to ``timeout_s``), then end."""
        self._closing = True
        if self._went_idle is not None:
            self._went_idle.set()  # wake wait_idle() callers: they give up while closing
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():  # only left when the grace period ran out
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Unavailable("shutting down before this request could run"))
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._background is not None:
            self._background.shutdown(wait=False, cancel_futures=True)

    async def _collect(self) -> list[Job[Req, Res]]:
        first = await self._queue.get()
        self._busy = True
        batch = [first]
        wait_until = time.monotonic() + self._config.max_wait_s
        while len(batch) < self._config.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout=remaining))
            except TimeoutError:
                break
        QUEUE_DEPTH.set(self._queue.qsize())
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._run_batch(batch)
            except Exception as exc:  # never let one batch kill the batcher
                log.exception("batch failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                self._busy = False
                if self._went_idle is not None and self._queue.empty():
                    self._went_idle.set()

    async def _run_batch(self, batch: list[Job[Req, Res]]) -> None:
        now = time.monotonic()
        live: list[Job[Req, Res]] = []
        for job in batch:
            job.queue_seconds = now - job.enqueued_at
            STAGE_SECONDS.labels(stage="queue").observe(job.queue_seconds)
            if job.future.done():  # the client went away
                continue
            if now >= job.deadline:
                job.future.set_exception(
                    DeadlineExceeded(f"deadline passed after {job.queue_seconds * 1000:.0f} ms in the queue")
                )
                continue
            live.append(job)
        if not live:
            return
        BATCH_SIZE.observe(len(live))
        results = await self._process(live)
        if len(results) != len(live):
            raise RuntimeError(f"process returned {len(results)} results for {len(live)} jobs")
        for job, result in zip(live, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
