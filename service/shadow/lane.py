"""Shadow lane: run a sampled copy of requests on another bundle, with spare capacity only.

The primary path calls :meth:`ShadowLane.offer` after it has its answer: a non-blocking
``put_nowait`` into a small bounded queue (full -> the copy is dropped and counted in
``genret_shadow_dropped_total{reason="queue_full"}``). One worker task takes copies one at a time,
waits until ``primary_idle()`` says the primary batcher has nothing to do (a copy that waits longer
than ``max_age_s`` is dropped as ``stale``), runs ``run_shadow(request)`` with a timeout, and records
how far the shadow's list agrees with the primary's — overlap@K, Jaccard, rank-biased overlap —
and both latencies, as ``genret_shadow_*`` metrics and as one JSON line in a rotating log.

Nothing on the primary path awaits the lane, and the lane only reads the primary result (it keeps
an immutable copy of the item ids), so a shadow can neither delay nor change a primary response
beyond sharing the compute thread while the primary queue is empty. The service's ``run_shadow``
(``service.engine.engine.Engine.run_shadow``) runs a copy in small stages that each wait for an idle
primary batcher, so a primary batch arriving mid-copy waits for one stage, not a whole retrieve;
a copy that gave way for too long raises :class:`ShadowStale` and is counted as dropped (``stale``).

The agreement measures and the job data are :mod:`service.shadow.agreement`; the JSONL log is
:mod:`service.shadow.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from service.engine.shadow_executor import ShadowStale
from service.metrics import LATENCY_BUCKETS, REGISTRY
from service.shadow.agreement import Agreement, Ranked, ShadowJob
from service.shadow.log import ShadowLog, make_record

log = logging.getLogger(__name__)

Req = TypeVar("Req")


@dataclass(frozen=True)
class ShadowConfig:
    queue_size: int = 64  # copies waiting for spare capacity; more are dropped ("queue_full")
    timeout_s: float = 5.0  # a shadow run taking longer is abandoned ("timeout")
    max_age_s: float = 2.0  # a copy that waited longer for spare capacity is dropped ("stale")
    idle_poll_s: float = 0.002  # how often the worker re-checks primary_idle() while it yields
    rbo_p: float = 0.9
    # request fields never written to the log (the user is logged as a hash)
    log_exclude: tuple[str, ...] = ("user_id",)

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.timeout_s <= 0 or self.max_age_s <= 0 or self.idle_poll_s <= 0:
            raise ValueError(
                f"timeout_s, max_age_s and idle_poll_s must be > 0, got {self.timeout_s}, "
                f"{self.max_age_s}, {self.idle_poll_s}"
            )
        if not 0.0 < self.rbo_p < 1.0:
            raise ValueError(f"rbo_p must be in (0, 1), got {self.rbo_p}")


# ---- metrics ---------------------------------------------------------------------------------------

_AGREEMENT_BUCKETS = tuple(i / 10 for i in range(11))

SHADOW_REQUESTS = Counter(
    "genret_shadow_requests_total",
    "Shadow runs by shadow bundle and result (ok, error, timeout).",
    ["shadow", "result"],
    registry=REGISTRY,
)
SHADOW_DROPPED = Counter(
    "genret_shadow_dropped_total",
    "Shadow copies dropped before running, by reason (queue_full, stale, shutdown, unbound).",
    ["reason"],
    registry=REGISTRY,
)
SHADOW_QUEUE_DEPTH = Gauge(
    "genret_shadow_queue_depth", "Shadow copies waiting for spare capacity.", registry=REGISTRY
)
SHADOW_OVERLAP = Histogram(
    "genret_shadow_overlap",
    "overlap@K between the primary and the shadow lists (K = primary list length).",
    ["shadow"],
    buckets=_AGREEMENT_BUCKETS,
    registry=REGISTRY,
)
SHADOW_JACCARD = Histogram(
    "genret_shadow_jaccard",
    "Jaccard similarity of the primary and shadow top-K sets.",
    ["shadow"],
    buckets=_AGREEMENT_BUCKETS,
    registry=REGISTRY,
)
SHADOW_RBO = Histogram(
    "genret_shadow_rbo",
    "Rank-biased overlap (p=0.9) of the primary and shadow rankings.",
    ["shadow"],
    buckets=_AGREEMENT_BUCKETS,
    registry=REGISTRY,
)
SHADOW_LATENCY = Histogram(
    "genret_shadow_latency_seconds",
    "Latency of shadowed requests: role=primary (the served answer) or role=shadow (the copy).",
    ["role", "shadow"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)


# ---- the lane ----------------------------------------------------------------------------------------


class ShadowLane(Generic[Req]):
    """Bounded low-priority queue + one worker that runs shadow copies when the primary is idle."""

    def __init__(
        self,
        run_shadow: Callable[[Req], Awaitable[Ranked]],
        config: ShadowConfig,
        shadow_log: ShadowLog | None = None,
        *,
        primary_idle: Callable[[], bool] = lambda: True,
    ) -> None:
        self._run_shadow = run_shadow
        self.config = config
        self.shadow_log = shadow_log
        self._primary_idle = primary_idle
        self._queue: asyncio.Queue[ShadowJob[Req]] = asyncio.Queue(maxsize=config.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.busy = False
        self.stats: Tally[str] = Tally()  # this lane's own counts (ok, error, timeout, dropped_<reason>)

    @staticmethod
    def count_drop(reason: str) -> None:
        SHADOW_DROPPED.labels(reason=reason).inc()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        """Start the worker (inside the running event loop)."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="genret-shadow")

    @property
    def full(self) -> bool:
        """True when :meth:`offer` would drop: callers skip building a copy that cannot be queued."""
        return self._queue.full()

    def offer(self, job: ShadowJob[Req]) -> bool:
        """Queue ``job`` without waiting; False (and counted) when the lane is full or not running."""
        if self._task is None or self._closing:
            self._drop("shutdown" if self._closing else "unbound")
            return False
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._drop("queue_full")
            return False
        SHADOW_QUEUE_DEPTH.set(self._queue.qsize())
        return True

    async def join(self) -> None:
        """Wait until every queued copy has been run or dropped (tests, orderly shutdown)."""
        await self._queue.join()

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Stop taking copies, finish the running one (up to ``timeout_s``), drop the rest."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self._drop("shutdown")
        SHADOW_QUEUE_DEPTH.set(0)

    def _drop(self, reason: str) -> None:
        self.stats[f"dropped_{reason}"] += 1
        self.count_drop(reason)

    async def _yield_to_primary(self, job: ShadowJob[Req]) -> bool:
        """Wait for an idle primary; False when the copy got older than ``max_age_s`` meanwhile.

        Polls every ``idle_poll_s``, backing off to 8x that while the primary stays busy (a saturated
        primary should not also pay for hundreds of lane wake-ups a second)."""
        poll_s = self.config.idle_poll_s
        while True:
            if time.monotonic() - job.enqueued_at > self.config.max_age_s:
                return False
            if self._primary_idle():
                return True
            await asyncio.sleep(poll_s)
            poll_s = min(2 * poll_s, 8 * self.config.idle_poll_s)

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            SHADOW_QUEUE_DEPTH.set(self._queue.qsize())
            try:
                if await self._yield_to_primary(job):
                    self.busy = True
                    await self._run_one(job)
                else:
                    self._drop("stale")
            except Exception:  # never let one copy kill the lane
                log.exception("shadow run failed unexpectedly")
            finally:
                self.busy = False
                self._queue.task_done()

    async def _run_one(self, job: ShadowJob[Req]) -> None:
        bundle = job.shadow_bundle
        started = time.perf_counter()
        shadow: Ranked | None = None
        error: str | None = None
        try:
            shadow = await asyncio.wait_for(self._run_shadow(job.request), timeout=self.config.timeout_s)
        except ShadowStale:
            self._drop("stale")
            return
        except TimeoutError:
            error = f"timeout after {self.config.timeout_s} s"
            result = "timeout"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            result = "error"
        else:
            result = "ok"
            if not math.isfinite(shadow.latency_s):
                shadow = dataclasses.replace(shadow, latency_s=time.perf_counter() - started)
        self.stats[result] += 1
        SHADOW_REQUESTS.labels(shadow=bundle, result=result).inc()
        agreement = None
        if shadow is not None:
            agreement = Agreement.of(job.primary.items, shadow.items, job.k, self.config.rbo_p)
            SHADOW_OVERLAP.labels(shadow=bundle).observe(agreement.overlap_at_k)
            SHADOW_JACCARD.labels(shadow=bundle).observe(agreement.jaccard)
            SHADOW_RBO.labels(shadow=bundle).observe(agreement.rbo)
            SHADOW_LATENCY.labels(role="shadow", shadow=bundle).observe(shadow.latency_s)
            if math.isfinite(job.primary.latency_s):
                SHADOW_LATENCY.labels(role="primary", shadow=bundle).observe(job.primary.latency_s)
        if self.shadow_log is not None:
            self.shadow_log.write(make_record(job, shadow, agreement, error, self.config.log_exclude))
