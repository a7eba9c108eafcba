"""The façade the routes call: request -> (variant, bundle) -> cache -> batched retrieve -> result.

The engine returns domain results (:class:`service.results.Retrieval`); the API layer alone turns
them into HTTP models (:mod:`service.responses`). Its parts, one module per role:

* request mapping (:mod:`service.request_map`): limits, variant and bundle, dense ids, the beam;
  an empty usable history is answered with popular items (``fallback: "popular"``), the rest is
  queued in the batcher;
* the compute worker (:mod:`service.batch_compute`), in two batcher stages: *prepare* — one cache
  MGET for every row, then encode the misses (grouped by bundle; fresh states stay on the device,
  copied to the host only for a cache that stores them, written back with one pipelined SET, not
  awaited); *finish* — on the compute thread, stack cached and fresh encoder states and search
  with the strategy of ``GENRET_SEARCH_MODE`` (:mod:`service.search_strategy`: generative beam
  search + rerank, or brute force), grouped by bundle (and beam width), each row cut to its own k.
  With ``GENRET_PIPELINE`` on (``auto``: two or more usable cores), prepare runs on its own thread,
  so the next batch is encoded while the current one is searched (:mod:`service.batcher`);
* the staged shadow executor (:mod:`service.shadow_exec`): shadow copies, run in stages that give
  way to primary batches, on a low-priority thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from service.batch_compute import (
    BatchCompute,
    BatchOutcome,
    Encoded,
    FreshRows,
    RowResult,
    row_results,
    state_spec,
)
from service.batcher import Batcher, BatcherConfig, Job, Stages, usable_cores
from service.cache import NoCache, StateCache
from service.cache_codec import StateRow
from service.errors import LimitExceeded, Unavailable
from service.experiments import user_key as experiment_user_key
from service.metrics import FALLBACKS, INFLIGHT, STAGE_SECONDS, UNKNOWN_HISTORY_ITEMS
from service.models_registry import ModelRegistry
from service.request_map import Mapped, Prepared, RequestMapper, VariantRouter
from service.results import Retrieval, answered, popular
from service.schemas import RetrieveRequest
from service.search_strategy import strategy_for
from service.settings import Settings
from service.shadow_exec import ShadowExecutor, StageHook
from service.states import Row

log = logging.getLogger(__name__)

T = TypeVar("T")

# on_primary_result(request, result): called after each primary answer (shadowing, experiments)
PrimaryResultHook = Callable[[RetrieveRequest, Retrieval], None]


class Engine:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        cache: StateCache,
        *,
        router: VariantRouter | None = None,
        on_primary_result: PrimaryResultHook | None = None,
        assignment_key: Callable[[str | None, Sequence[str]], str] = experiment_user_key,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.cache = cache
        self.mapper = RequestMapper(settings, registry, router, assignment_key)
        self.on_primary_result = on_primary_result
        self.strategy = strategy_for(settings.search_mode)
        self.store = not isinstance(cache, NoCache)  # fresh states are copied to the host only for a cache
        self.batcher: Batcher[Prepared, RowResult] = Batcher(
            Stages(finish=self._finish_stage, prepare=self._prepare_stage),
            BatcherConfig(
                max_batch_size=settings.max_batch_size,
                max_wait_s=settings.max_wait_ms / 1000.0,
                queue_size=settings.queue_size,
                retry_after_s=settings.retry_after_s,
                pipeline=settings.pipeline == "on" or (settings.pipeline == "auto" and usable_cores() >= 2),
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

    async def retrieve(self, request: RetrieveRequest) -> Retrieval:
        self._check_accepting()
        self.check_limits(request, ())
        return await self._tracked(self._retrieve_one(request))

    async def retrieve_batch(self, requests: Sequence[RetrieveRequest]) -> list[Retrieval]:
        self._check_accepting()
        if len(requests) > self.settings.max_batch_requests:
            raise LimitExceeded(
                ("requests",),
                f"{len(requests)} requests exceed max_batch_requests={self.settings.max_batch_requests}",
            )
        for i, request in enumerate(requests):
            self.check_limits(request, ("requests", i))

        async def all_of() -> list[Retrieval]:
            return list(await asyncio.gather(*(self._retrieve_one(r) for r in requests)))

        return await self._tracked(all_of())

    async def run_shadow(self, request: RetrieveRequest, *, on_stage: StageHook | None = None) -> Retrieval:
        """A shadow copy (``request.model`` names the shadow bundle), run in stages that give way to
        primary batches (:mod:`service.shadow_exec`); no hook, not counted in flight. Raises
        :class:`service.shadow.ShadowStale` when it waited more than ``shadow_max_age_s`` for the
        primary to idle."""
        if self.draining:
            raise Unavailable("shutting down: shadow copy dropped")
        self.check_limits(request, ())
        started = time.perf_counter()
        mapped = self.map_request(request)
        if len(mapped.history) == 0:
            return popular(mapped, time.perf_counter() - started)
        row = await self.shadow.run(self.prepare(request, mapped), on_stage)
        total = time.perf_counter() - started
        return answered(mapped, row, {**row.timings, "total": total}, total)

    def check_limits(self, request: RetrieveRequest, loc: tuple[str | int, ...]) -> None:
        self.mapper.check_limits(request, loc)

    def map_request(self, request: RetrieveRequest) -> Mapped:
        """Variant, bundle and dense ids for ``request`` (:meth:`RequestMapper.map`)."""
        return self.mapper.map(request)

    def prepare(self, request: RetrieveRequest, mapped: Mapped) -> Prepared:
        """The batcher's payload for ``mapped`` (:meth:`RequestMapper.prepare`)."""
        return self.mapper.prepare(request, mapped)

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
        started = time.perf_counter()
        mapped = self.map_request(request)
        if mapped.unknown:
            UNKNOWN_HISTORY_ITEMS.inc(mapped.unknown)
        if len(mapped.history) == 0:
            FALLBACKS.labels(reason="empty_history").inc()
            result = popular(mapped, time.perf_counter() - started)
        else:
            deadline_ms = request.deadline_ms or self.settings.default_deadline_ms
            row = await self.batcher.submit(
                self.prepare(request, mapped), time.monotonic() + deadline_ms / 1000.0
            )
            total = time.perf_counter() - started
            STAGE_SECONDS.labels(stage="total").observe(total)
            result = answered(mapped, row, {**row.timings, "total": total}, total)
        self._notify(request, result)
        return result

    def _notify(self, request: RetrieveRequest, result: Retrieval) -> None:
        if self.on_primary_result is None:
            return
        try:
            self.on_primary_result(request, result)
        except Exception:  # a shadow/experiment hook must never fail the primary answer
            log.exception("on_primary_result hook failed")

    # --- batches: the compute worker's two stages ---

    def _compute(
        self,
        payloads: Sequence[Prepared],
        cached: Sequence[StateRow | None],
        rows: list[Row | None] | None = None,
    ) -> BatchCompute:
        return BatchCompute(
            payloads, cached, strategy=self.strategy, device=self.settings.device, store=self.store, rows=rows
        )

    async def _prepare_stage(self, jobs: Sequence[Job[Prepared, RowResult]]) -> list[Encoded | BaseException]:
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
        self, payloads: list[Prepared], cached: list[StateRow | None]
    ) -> tuple[BatchOutcome, list[Row | None]]:
        compute = self._compute(payloads, cached)
        return compute.encode_misses(), compute.rows

    async def _finish_stage(
        self, jobs: Sequence[Job[Prepared, RowResult]], encoded: Sequence[Encoded]
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
        self, payloads: list[Prepared], encoded: list[Encoded]
    ) -> tuple[list[RowResult | BaseException], FreshRows]:
        """Search every row (runs on the compute thread); a failure stays with the rows that cause it
        (:mod:`service.batch_compute`), so batch-mates are always answered."""
        out = self._compute(payloads, [e.cached for e in encoded], [e.row for e in encoded]).search_all()
        return row_results(payloads, encoded, out), out.fresh

    def _write_back(self, fresh: FreshRows) -> None:
        """Store fresh encoder states after the answer (one pipelined SET, not awaited)."""
        task = asyncio.create_task(self.cache.set_many(fresh))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
