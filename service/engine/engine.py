"""The façade the routes call: request -> (variant, bundle) -> cache -> batched retrieve -> result.

The engine returns domain results (:class:`service.engine.results.Retrieval`); the API layer alone turns
them into HTTP models (:mod:`service.http.responses`). Its parts, one module per role:

* request mapping (:mod:`service.engine.request_map`): limits, variant and bundle, dense ids, the beam;
  an empty usable history is answered with popular items (``fallback: "popular"``), the rest is
  queued in the batcher;
* the compute worker (:mod:`service.engine.compute`), in two batcher stages: *prepare* — one cache
  MGET for every row, then encode the misses (grouped by bundle; fresh states stay on the device,
  copied to the host only for a cache that stores them, written back with one pipelined SET, not
  awaited); *finish* — on the compute thread, stack cached and fresh encoder states and search
  with the strategy of ``GENRET_SEARCH_MODE`` (:mod:`service.engine.strategy`: generative beam
  search + rerank, or brute force), grouped by bundle (and beam width), each row cut to its own k.
  With ``GENRET_PIPELINE`` on (``auto``: two or more usable cores), prepare runs on its own thread,
  so the next batch is encoded while the current one is searched (:mod:`service.engine.batcher`);
* the staged shadow executor (:mod:`service.engine.shadow_executor`): shadow copies, run in stages that give
  way to primary batches, on a low-priority thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from service.cache.codec import StateRow
from service.cache.state_cache import NoCache, StateCache
from service.engine.batcher import Batcher, usable_cores
from service.engine.compute import (
    BatchCompute,
    BatchOutcome,
    Encoded,
    FreshRows,
    RowInput,
    RowResult,
    row_results,
    state_spec,
)
from service.engine.jobs import BatcherConfig, Job, Stages
from service.engine.request_map import Mapped, RequestMapper, VariantRouter
from service.engine.request_map import user_key as experiment_user_key
from service.engine.results import Retrieval, answered, popular
from service.engine.shadow_executor import ShadowExecutor, StageHook
from service.engine.states import Row
from service.engine.strategy import SearchStrategy, strategy_for
from service.errors import LimitExceeded, Unavailable
from service.heavy_lane import in_heavy_lane
from service.metrics import FALLBACKS, INFLIGHT, STAGE_SECONDS, UNKNOWN_HISTORY_ITEMS
from service.registry.model_registry import ModelRegistry
from service.schemas import RetrieveRequest
from service.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# listener(request, result): called after each primary answer (shadowing, the quality monitor)
PrimaryResultHook = Callable[[RetrieveRequest, Retrieval], object]


class Engine:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        cache: StateCache,
        *,
        router: VariantRouter | None = None,
        assignment_key: Callable[[str | None, Sequence[str]], str] = experiment_user_key,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.cache = cache
        self.mapper = RequestMapper(settings, registry, router, assignment_key)
        self._listeners: list[PrimaryResultHook] = []
        self.strategy = strategy_for(settings.search_mode)
        self.store = not isinstance(cache, NoCache)  # fresh states are copied to the host only for a cache
        self.batcher: Batcher[RowInput, RowResult] = Batcher(
            Stages(finish=self._finish_stage, prepare=self._prepare_stage),
            BatcherConfig(
                max_batch_size=settings.max_batch_size,
                max_wait_s=settings.max_wait_ms / 1000.0,
                queue_size=settings.queue_size,
                retry_after_s=settings.retry_after_s,
                pipeline=settings.pipeline == "on" or (settings.pipeline == "auto" and usable_cores() >= 2),
                work_budget=settings.batch_work_budget,
                heavy_cost=settings.heavy_request_ids,
            ),
        )
        self.shadow = ShadowExecutor(
            self.batcher,
            cache,
            self.strategy,
            device=settings.device,
            max_wait_s=settings.shadow_max_age_s,
            store=self.store,
            write_back=self._write_back,
            draining=lambda: self.draining,
        )
        self.ready = False
        self.draining = False
        self.inflight = 0
        self.light_inflight = 0  # of them, requests below heavy_request_ids (the heavy lane yields to them)
        self._writes: set[asyncio.Task[None]] = set()

    # --- lifecycle ---

    def start(self) -> None:
        """Start the batcher. First collect garbage once and ``gc.freeze()`` what is left: the
        imported libraries and loaded bundles are ~220k container objects, so every full collection
        would walk them — a pause of the event loop and the compute thread every few seconds under
        load, more often with shadow traffic (whose queued copies live long enough to be promoted);
        measured in docs/results.md. Frozen objects are never scanned."""
        gc.collect()
        gc.freeze()
        self.batcher.start()
        self.ready = True

    def begin_drain(self) -> None:
        """Stop taking new requests (503, /readyz false); queued and running ones still finish."""
        if not self.draining:
            log.info("draining: %d requests in flight", self.inflight)
        self.draining = True

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and self.batcher.idle

    async def stop(self, grace_s: float) -> None:
        self.begin_drain()
        deadline = time.monotonic() + grace_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.batcher.stop(timeout_s=max(0.0, deadline - time.monotonic()))
        if self._writes:
            await asyncio.wait(self._writes, timeout=max(0.1, deadline - time.monotonic()))
        self.ready = False

    # --- requests ---

    def on_primary_result(self, listener: PrimaryResultHook) -> None:
        """Call ``listener(request, result)`` after each primary answer, after the answer is built
        (an exception in it is logged, never the request's)."""
        self._listeners.append(listener)

    async def map(self, request: RetrieveRequest) -> Mapped:
        """``request`` checked against the settings' limits and mapped onto its bundle: variant, dense
        ids, k and beam, resolved once (:mod:`service.engine.request_map`)."""
        self.mapper.check_limits(request, ())
        return await self._map(request)

    def _heavy(self, request: RetrieveRequest) -> bool:
        ids = len(request.history) + len(request.exclude) + len(request.allow or ())
        return ids >= self.settings.heavy_request_ids

    async def _map(self, request: RetrieveRequest) -> Mapped:
        """:meth:`RequestMapper.map`, in the heavy lane for a request of ``heavy_request_ids`` ids or
        more (:mod:`service.heavy_lane`): its dictionary lookups take tens of ms at 100k ids."""
        if not self._heavy(request):
            return self.mapper.map(request)
        return await in_heavy_lane("map", lambda: self.mapper.map(request))

    async def retrieve(self, request: RetrieveRequest) -> Retrieval:
        self._check_accepting()
        self.mapper.check_limits(request, ())
        return await self._tracked(self._retrieve_one(request))

    async def retrieve_batch(self, requests: Sequence[RetrieveRequest]) -> list[Retrieval]:
        self._check_accepting()
        if len(requests) > self.settings.max_batch_requests:
            raise LimitExceeded(
                ("requests",),
                f"{len(requests)} requests exceed max_batch_requests={self.settings.max_batch_requests}",
            )
        for i, request in enumerate(requests):
            self.mapper.check_limits(request, ("requests", i))

        async def all_of() -> list[Retrieval]:
            return list(await asyncio.gather(*(self._retrieve_one(r) for r in requests)))

        return await self._tracked(all_of())

    async def run_shadow(self, request: RetrieveRequest, *, on_stage: StageHook | None = None) -> Retrieval:
        """A shadow copy (``request.model`` names the shadow bundle), run in stages that give way to
        primary batches (:meth:`run_staged`); no listener, not counted in flight. Raises
        :class:`service.engine.shadow_executor.ShadowStale` when it waited more than ``shadow_max_age_s`` for
        the primary to idle."""
        if self.draining:
            raise Unavailable("shutting down: shadow copy dropped")
        started = time.perf_counter()
        mapped = await self.map(request)
        if len(mapped.history) == 0:
            return popular(mapped, time.perf_counter() - started)
        row = await self.run_staged(mapped, on_stage=on_stage)
        total = time.perf_counter() - started
        return answered(mapped, row, {**row.timings, "total": total}, total)

    async def run_staged(
        self,
        mapped: Mapped,
        strategy: SearchStrategy | None = None,
        *,
        on_stage: StageHook | None = None,
    ) -> RowResult:
        """One mapped row (a non-empty history) off the primary path: cache, encode and each search
        stage of ``strategy`` (the engine's own when None) start only while the batcher is idle
        (:mod:`service.engine.shadow_executor`). The shadow lane and the quality monitor run through this."""
        if self.draining:
            raise Unavailable("shutting down: shadow copy dropped")
        return await self.shadow.run(mapped.row_input(), on_stage, strategy)

    async def _tracked(self, work: Awaitable[T]) -> T:
        self.inflight += 1
        INFLIGHT.inc()
        try:
            return await work
        finally:
            self.inflight -= 1
            INFLIGHT.dec()

    def _check_accepting(self) -> None:
        if self.draining:
            raise Unavailable("shutting down: not taking new requests")
        if not self.ready:
            raise Unavailable("not ready: bundles are still loading")

    async def _retrieve_one(self, request: RetrieveRequest) -> Retrieval:
        if self._heavy(request):
            return await self._answer(request)
        self.light_inflight += 1
        try:
            return await self._answer(request)
        finally:
            self.light_inflight -= 1

    async def _answer(self, request: RetrieveRequest) -> Retrieval:
        started = time.perf_counter()
        mapped = await self._map(request)
        if mapped.unknown:
            UNKNOWN_HISTORY_ITEMS.inc(mapped.unknown)
        if len(mapped.history) == 0:
            FALLBACKS.labels(reason="empty_history").inc()
            result = popular(mapped, time.perf_counter() - started)
        else:
            deadline_ms = request.deadline_ms or self.settings.default_deadline_ms
            row_input = mapped.row_input()
            row = await self.batcher.submit(
                row_input, time.monotonic() + deadline_ms / 1000.0, cost=row_input.work()
            )
            total = time.perf_counter() - started
            STAGE_SECONDS.labels(stage="total").observe(total)
            result = answered(mapped, row, {**row.timings, "total": total}, total)
        self._notify(request, result)
        return result

    def _notify(self, request: RetrieveRequest, result: Retrieval) -> None:
        for listener in self._listeners:
            try:
                listener(request, result)
            except Exception:  # a shadow/experiment listener must never fail the primary answer
                log.exception("primary-result listener failed")

    # --- batches: the compute worker's two stages ---

    def _compute(
        self,
        payloads: Sequence[RowInput],
        cached: Sequence[StateRow | None],
        rows: list[Row | None] | None = None,
    ) -> BatchCompute:
        return BatchCompute(
            payloads, cached, strategy=self.strategy, device=self.settings.device, store=self.store, rows=rows
        )

    async def _prepare_stage(self, jobs: Sequence[Job[RowInput, RowResult]]) -> list[Encoded | BaseException]:
        """The batcher's first stage: cache lookup on the event loop, then the misses encoded on the
        prepare thread (the compute thread when not pipelined); fresh states go to the cache now."""
        payloads = [job.payload for job in jobs]
        t0 = time.perf_counter()
        cached = await self.cache.get_many([p.key for p in payloads], [state_spec(p) for p in payloads])
        t_cache = time.perf_counter() - t0
        STAGE_SECONDS.labels(stage="cache").observe(t_cache)
        out, rows = await self.batcher.run_prepare(self._encode, payloads, cached)
        if out.fresh:
            self._write_back(out.fresh)
        encoded: list[Encoded | BaseException] = []
        for i, row in enumerate(rows):
            if i in out.errors or row is None:
                encoded.append(out.errors.get(i) or RuntimeError("encode left a row without states"))
            else:
                encoded.append(Encoded(cached[i], row, t_cache, out.encode_s))
        return encoded

    def _encode(
        self, payloads: list[RowInput], cached: list[StateRow | None]
    ) -> tuple[BatchOutcome, list[Row | None]]:
        compute = self._compute(payloads, cached)
        return compute.encode_misses(), compute.rows

    async def _finish_stage(
        self, jobs: Sequence[Job[RowInput, RowResult]], encoded: Sequence[Encoded]
    ) -> list[RowResult | BaseException]:
        """The batcher's second stage: search (+ rerank) on the compute thread."""
        results, fresh = await self.batcher.run_in_worker(
            self._search, [job.payload for job in jobs], list(encoded)
        )
        if fresh:  # cached states that failed the search and were encoded afresh
            self._write_back(fresh)
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, RowResult):
                result.timings["queue"] = job.queue_seconds
        return results

    def _search(
        self, payloads: list[RowInput], encoded: list[Encoded]
    ) -> tuple[list[RowResult | BaseException], FreshRows]:
        """Search every row (runs on the compute thread); a failure stays with the rows that cause it
        (:mod:`service.engine.compute`), so batch-mates are always answered."""
        out = self._compute(payloads, [e.cached for e in encoded], [e.row for e in encoded]).search_all()
        return row_results(payloads, encoded, out), out.fresh

    def _write_back(self, fresh: FreshRows) -> None:
        """Store fresh encoder states after the answer (one pipelined SET, not awaited)."""
        task = asyncio.create_task(self.cache.set_many(fresh))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
