"""What flows through the batcher (:mod:`service.engine.batcher`): its config, a queued job, a batch's
two stages, and the bounded hand-off of prepared jobs between them."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")
T = TypeVar("T")


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int
    max_wait_s: float
    queue_size: int
    retry_after_s: int = 1
    pipeline: bool = False  # prepare and finish on two threads, overlapping (needs >= 2 cores to pay)
    work_budget: int | None = None  # most summed job costs in one batch (None: no bound)
    heavy_cost: int | None = None  # jobs of this cost or more never share a batch with lighter ones

    def __post_init__(self) -> None:
        if (
            self.max_batch_size < 1
            or self.queue_size < 1
            or self.max_wait_s < 0
            or (self.work_budget or 1) < 1
            or (self.heavy_cost or 1) < 1
        ):
            raise ValueError(f"invalid batcher config {self}")


@dataclass
class Job(Generic[Req, Res]):
    """One queued request: its payload, when it must be answered, and where the answer goes."""

    payload: Req
    deadline: float  # time.monotonic() seconds
    future: asyncio.Future[Res]
    enqueued_at: float = field(default_factory=time.monotonic)
    queue_seconds: float = 0.0
    cost: int = 1  # its share of a batch's work budget (the service: ids the row carries)


# process(batch) -> one result or exception per job, in order
ProcessFn = Callable[[Sequence[Job[Req, Res]]], Awaitable[Sequence[Res | BaseException]]]
# prepare(batch) -> one prepared value or exception per job, in order
PrepareFn = Callable[[Sequence[Job[Req, Res]]], Awaitable[Sequence[Any]]]
# finish(batch, prepared values) -> one result or exception per job, in order
FinishFn = Callable[[Sequence[Job[Req, Res]], Sequence[Any]], Awaitable[Sequence[Res | BaseException]]]


@dataclass(frozen=True)
class Stages(Generic[Req, Res]):
    """A batch's two stages (module docstring); ``prepare=None``: ``finish`` gets ``None`` per job."""

    finish: FinishFn[Req, Res]
    prepare: PrepareFn[Req, Res] | None = None


def deliver(job: Job[Req, Res], result: Res | BaseException) -> None:
    if job.future.done():  # the client went away, or its deadline passed while waiting
        return
    if isinstance(result, BaseException):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)


class Handoff(Generic[T]):
    """Prepared jobs waiting for the compute stage: at most ``capacity``, taken oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._changed = asyncio.Condition()

    async def put(self, items: Sequence[T]) -> None:
        """Add ``items`` (at most ``capacity`` of them) once there is room for all."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._items) + len(items) <= self.capacity)
            self._items.extend(items)
            self._changed.notify_all()

    async def take(self, most: int) -> list[T]:
        """Wait for at least one item; take up to ``most``."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items))
            out = [self._items.popleft() for _ in range(min(most, len(self._items)))]
            self._changed.notify_all()
            return out
