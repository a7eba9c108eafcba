"""The façade the routes call: request -> (variant, bundle) -> cache -> batched retrieve -> response.

Per request (on the event loop): check the limits from settings, choose the variant and bundle, map
raw history ids to dense ids (unknown ids skipped and counted), keep the model's ``max_history``
most recent (``truncated``), answer an empty usable history with popular items
(``fallback: "popular"``), and queue the rest in the batcher.

Per batch, in two batcher stages: *prepare* — one cache MGET for every row, then encode the misses
(grouped by bundle), fresh states written back with one pipelined SET, not awaited; *finish* — on
the compute thread, stack cached and fresh encoder states, search (grouped by bundle and beam
width) — beam search, then rerank, or the brute-force baseline — and cut each row to its own k.
With ``GENRET_PIPELINE`` on (``auto``: two or more usable cores), prepare runs on its own thread,
so the next batch is encoded while the current one is searched (:mod:`service.batcher`).

Shadow copies (:meth:`Engine.run_shadow`, called by the shadow lane) never enter the batcher, and
two mechanisms keep them off the primary's path:

1. Give-way points. A copy runs in stages — encode, each beam-search level
   (:class:`models.retriever.StagedSearch`, same result as the one-shot search), rerank — and
   before every stage it waits for :meth:`Batcher.wait_idle` (nothing queued, forming or
   computing). A primary batch that arrives mid-copy overlaps with at most the one stage already
   running (about a millisecond for one row), never with a whole shadow retrieve; the copy goes
   on when the primary work is done. A copy that spends more than ``shadow_max_age_s`` giving way
   is abandoned with :class:`service.shadow.ShadowStale` (counted as dropped, ``stale``).
2. A low-priority thread. The stages run on the batcher's background thread
   (:meth:`Batcher.run_low_priority`, OS nice 19), not on the compute thread: a primary batch is
   never queued behind a shadow stage, and when both are runnable the scheduler prefers the
   compute thread, the event loop and everything else on the machine. Intra-op threads stay at
   the settings' value (the ONNX Runtime sessions run in the calling thread). The GIL is shared,
   but a stage holds it only between torch / ORT calls (which release it), and the give-way
   points keep at most one stage overlapping a primary batch, so a descheduled low-priority
   holder cannot stall the primary for long.

Measured with ``genret bench serve --items 100000 --levels 3 --concurrency 8,32 --shadow 0,0.5,1``
(4 interleaved rounds of 6 s, medians): with (1) alone, one run still showed 11-15 % lower primary
QPS at c=8 with shadowing on (the stages competed for the CPU with the event loop and the load
generator); with (1) + (2) primary QPS and p50 stayed within 6 % of rate 0 and p99 within 12 %, the
size of the run-to-run noise. Batching several copies into one stage (more work per interruption)
was not needed for that and is not done. The largest tail effect of shadow traffic was not its
compute but more frequent full garbage collections, ~140 ms each: see :meth:`Engine.start`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from models.bruteforce import bruteforce_topk
from service.batch_compute import BatchCompute, BatchOutcome, FreshRows, split_rows, stack_rows, state_spec
from service.batcher import Batcher, BatcherConfig, Job, Stages, usable_cores
from service.cache import StateCache
from service.cache_codec import StateRow, cache_key
from service.errors import LimitExceeded, Unavailable
from service.experiments import user_key as experiment_user_key
from service.metrics import FALLBACKS, INFLIGHT, STAGE_SECONDS, UNKNOWN_HISTORY_ITEMS
from service.models_registry import LoadedModel, ModelRegistry
from service.schemas import DebugInfo, ModelRef, RetrieveRequest, RetrieveResponse, ScoredItem
from service.settings import Settings
from service.shadow import SHADOW_YIELDS, ShadowStale

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_VARIANT = "default"
ANONYMOUS = "anonymous"


class VariantRouter(Protocol):
    """What the engine needs from the experiment (``service.experiments.ExperimentHooks``)."""

    def assign(self, user_key: str) -> str: ...
    def bundle_of(self, variant: str) -> str: ...


# on_primary_result(request, response, timings in seconds): called after each primary answer (shadowing)
PrimaryResultHook = Callable[[RetrieveRequest, RetrieveResponse, dict[str, float]], None]
# on_stage(stage name): called on the event loop just before each shadow stage runs (tracing, tests)
StageHook = Callable[[str], None]


@dataclass(frozen=True)
class Prepared:
    """A request ready for the batcher: everything in dense ids of one bundle."""

    model: LoadedModel
    key: str  # cache key
    history: np.ndarray  # [t] dense ids, oldest first, t <= max_history, t >= 1
    exclude: np.ndarray  # [e] dense ids never to return
    k: int
    beam_size: int


@dataclass(frozen=True)
class RowResult:
    items: np.ndarray  # [k] dense ids, 0 where fewer exist
    scores: np.ndarray  # [k] float32, -inf where padded
    num_candidates: int
    cache: str  # "hit" | "miss"
    batch_size: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per batch stage


@dataclass(frozen=True)
class Encoded:
    """One job after the prepare stage: the states to search with and where they came from."""

    cached: StateRow | None  # the cache's row (None on a miss)
    row: StateRow  # the cached row itself, or freshly encoded states
    cache_s: float  # the prepare batch's cache lookup
    encode_s: float  # the prepare batch's encode (0.0 when every row hit)


@dataclass(frozen=True)
class Mapped:
    """The raw request mapped onto one bundle (before any compute)."""

    model: LoadedModel
    variant: str
    user_key: str
    history: np.ndarray  # [t] dense
    exclude: np.ndarray  # [e] dense
    unknown: int
    truncated: bool


def fewer_reason(returned: int, k: int, available: int) -> Literal["catalogue", "beam_limit"] | None:
    """Why a response holds fewer than ``k`` items: ``"catalogue"`` (fewer than ``k`` items are left
    once the excluded ones are removed) or ``"beam_limit"`` (the beam, widened up to
    ``GENRET_MAX_BEAM_SIZE``, reached too few); ``None`` when it holds ``k``."""
    if returned >= k:
        return None
    return "catalogue" if available < k else "beam_limit"


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
        self.router = router
        self.on_primary_result = on_primary_result
        self.assignment_key = assignment_key
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
        self.ready = False
        self.draining = False
        self.inflight = 0
        self._writes: set[asyncio.Task[None]] = set()

    # --- lifecycle ---

    def start(self) -> None:
        """Start the batcher. First collect garbage once and ``gc.freeze()`` what is left: the
        imported libraries and loaded bundles are ~220k container objects, so every full collection
        would walk them — a 120-170 ms pause of the event loop and the compute thread measured under
        ``genret bench serve``, one every few seconds under load, and more often with shadow traffic
        (whose queued copies live long enough to be promoted). Frozen objects are never scanned."""
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

    async def retrieve(self, request: RetrieveRequest) -> RetrieveResponse:
        self._check_accepting()
        self.check_limits(request, ())
        return await self._tracked(self._retrieve_one(request))

    async def retrieve_batch(self, requests: Sequence[RetrieveRequest]) -> list[RetrieveResponse]:
        self._check_accepting()
        if len(requests) > self.settings.max_batch_requests:
            raise LimitExceeded(
                ("requests",),
                f"{len(requests)} requests exceed max_batch_requests={self.settings.max_batch_requests}",
            )
        for i, request in enumerate(requests):
            self.check_limits(request, ("requests", i))

        async def all_of() -> list[RetrieveResponse]:
            return list(await asyncio.gather(*(self._retrieve_one(r) for r in requests)))

        return await self._tracked(all_of())

    async def run_shadow(
        self, request: RetrieveRequest, *, on_stage: StageHook | None = None
    ) -> RetrieveResponse:
        """A shadow copy (``request.model`` names the shadow bundle), run in stages that give way to
        primary batches (module docstring); no hook, not counted in flight. Raises
        :class:`ShadowStale` when it waited more than ``shadow_max_age_s`` for the primary to idle."""
        if self.draining:
            raise Unavailable("shutting down: shadow copy dropped")
        self.check_limits(request, ())
        started = time.perf_counter()
        mapped = self.map_request(request)
        k = request.k or self.settings.default_k
        if len(mapped.history) == 0:
            return self._popular(request, mapped, k)
        prepared = self._prepare(request, mapped, k)
        row = await self._compute_staged(prepared, on_stage)
        return self._respond(request, mapped, row, {**row.timings, "total": time.perf_counter() - started})

    def check_limits(self, request: RetrieveRequest, loc: tuple[str | int, ...]) -> None:
        s = self.settings
        if request.k is not None and request.k > s.max_k:
            raise LimitExceeded((*loc, "k"), f"k={request.k} exceeds max_k={s.max_k}")
        if request.beam_size is not None and not s.min_beam_size <= request.beam_size <= s.max_beam_size:
            raise LimitExceeded(
                (*loc, "beam_size"),
                f"beam_size={request.beam_size} outside [{s.min_beam_size}, {s.max_beam_size}]",
            )
        if len(request.history) > s.max_history_items:
            raise LimitExceeded(
                (*loc, "history"),
                f"{len(request.history)} history items exceed max_history_items={s.max_history_items}",
            )
        if len(request.exclude) > s.max_exclude_items:
            raise LimitExceeded(
                (*loc, "exclude"),
                f"{len(request.exclude)} exclude ids exceed max_exclude_items={s.max_exclude_items}",
            )
        if request.deadline_ms is not None and request.deadline_ms > s.max_deadline_ms:
            raise LimitExceeded(
                (*loc, "deadline_ms"),
                f"deadline_ms={request.deadline_ms} exceeds max_deadline_ms={s.max_deadline_ms}",
            )

    def map_request(self, request: RetrieveRequest) -> Mapped:
        """Variant, bundle and dense ids for ``request`` (unknown ids skipped, history truncated)."""
        user_key = request.user_id or ANONYMOUS
        variant = DEFAULT_VARIANT
        model_name = request.model
        if model_name is None and self.router is not None:
            variant = self.router.assign(self.assignment_key(request.user_id, request.history))
            model_name = self.router.bundle_of(variant)
        model = self.registry.get(model_name)
        known = [model.dense_of.get(raw) for raw in request.history]
        full = np.array([d for d in known if d is not None], dtype=np.int64)  # [t_all]
        unknown = len(known) - len(full)
        truncated = len(full) > model.max_history
        dense = full[-model.max_history :]  # [t]
        excluded = [d for d in (model.dense_of.get(raw) for raw in request.exclude) if d is not None]
        if request.exclude_history:
            excluded.extend(int(d) for d in full)  # the whole history, not only the encoded window
        exclude = np.unique(np.array(excluded, dtype=np.int64))  # [e]
        return Mapped(model, variant, user_key, dense, exclude, unknown, truncated)

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

    async def _retrieve_one(self, request: RetrieveRequest, *, notify: bool = True) -> RetrieveResponse:
        started = time.perf_counter()
        mapped = self.map_request(request)
        if mapped.unknown:
            UNKNOWN_HISTORY_ITEMS.inc(mapped.unknown)
        k = request.k or self.settings.default_k
        if len(mapped.history) == 0:
            FALLBACKS.labels(reason="empty_history").inc()
            response = self._popular(request, mapped, k)
            if notify:
                self._notify(request, response, {"total": time.perf_counter() - started})
            return response
        prepared = self._prepare(request, mapped, k)
        deadline_ms = request.deadline_ms or self.settings.default_deadline_ms
        row = await self.batcher.submit(prepared, time.monotonic() + deadline_ms / 1000.0)
        timings = {**row.timings, "total": time.perf_counter() - started}
        STAGE_SECONDS.labels(stage="total").observe(timings["total"])
        response = self._respond(request, mapped, row, timings)
        if notify:
            self._notify(request, response, timings)
        return response

    def _prepare(self, request: RetrieveRequest, mapped: Mapped, k: int) -> Prepared:
        return Prepared(
            model=mapped.model,
            key=cache_key(mapped.model.fingerprint, mapped.user_key, mapped.history),
            history=mapped.history,
            exclude=mapped.exclude,
            k=k,
            beam_size=self.beam_size(request, mapped, k),
        )

    def beam_size(self, request: RetrieveRequest, mapped: Mapped, k: int) -> int:
        """The request's beam, else ``GENRET_DEFAULT_BEAM_SIZE`` when set, else the bundle's own default
        (manifest ``config.beam_size``, clamped to the beam bounds); then widened so that the beam's
        leaves hold ``k`` items besides the excluded ones, within ``max_beam_size``
        (:meth:`models.retriever.Retriever.beam_for`, the same widening as the offline evaluation)."""
        s = self.settings
        retriever = mapped.model.retriever
        beam = request.beam_size or s.default_beam_size
        if beam is None:
            beam = min(max(retriever.default_beam_size, s.min_beam_size), s.max_beam_size)
        return int(retriever.beam_for(k, beam, len(mapped.exclude), s.max_beam_size))

    def _respond(
        self, request: RetrieveRequest, mapped: Mapped, row: RowResult, timings: dict[str, float]
    ) -> RetrieveResponse:
        keep = (row.items > 0) & np.isfinite(row.scores)
        items = [
            ScoredItem(id=mapped.model.raw_ids[int(d)], score=float(s))
            for d, s in zip(row.items[keep], row.scores[keep], strict=True)
        ]
        k = request.k or self.settings.default_k
        return RetrieveResponse(
            items=items,
            model=self._model_ref(mapped.model),
            variant=mapped.variant,
            unknown_history_items=mapped.unknown,
            truncated=mapped.truncated,
            fewer=fewer_reason(len(items), k, mapped.model.num_items - len(mapped.exclude)),
            debug=self._debug(request, timings, row.batch_size, row.num_candidates, len(mapped.history)),
        )

    def _popular(self, request: RetrieveRequest, mapped: Mapped, k: int) -> RetrieveResponse:
        model = mapped.model
        take = model.popular[: k + len(mapped.exclude)]
        if len(mapped.exclude):
            take = take[~np.isin(take, mapped.exclude)]
        take = take[:k]
        return RetrieveResponse(
            items=[ScoredItem(id=model.raw_ids[int(d)], score=float(model.popularity[d])) for d in take],
            model=self._model_ref(model),
            variant=mapped.variant,
            unknown_history_items=mapped.unknown,
            truncated=mapped.truncated,
            fallback="popular",
            fewer=fewer_reason(len(take), k, model.num_items - len(mapped.exclude)),
            debug=self._debug(request, {}, 0, model.num_items - len(mapped.exclude), 0),
        )

    @staticmethod
    def _model_ref(model: LoadedModel) -> ModelRef:
        return ModelRef(name=model.name, version=model.version, method=model.method)

    @staticmethod
    def _debug(
        request: RetrieveRequest, timings: dict[str, float], batch: int, candidates: int, used: int
    ) -> DebugInfo | None:
        """Debug details that say nothing about the cache entry of ``request``'s key (the caller chose
        its ``user_id``): no hit/miss, and only batch-level stage times — ``compute`` is the batch's
        encode + search, the same for every row whether its states were cached or not. (A request
        alone in its batch still takes a little longer on a miss; that shows in any client's
        stopwatch too, and hiding it would mean encoding on every hit.)"""
        if not request.debug:
            return None
        shown = {k: v for k, v in timings.items() if k in ("queue", "cache", "total")}
        if "encode" in timings or "search" in timings:
            shown["compute"] = sum(timings.get(stage, 0.0) for stage in ("encode", "search", "rerank"))
        return DebugInfo(
            timings_ms={k: round(v * 1000.0, 3) for k, v in shown.items()},
            batch_size=batch,
            num_candidates=candidates,
            history_used=used,
        )

    def _notify(
        self, request: RetrieveRequest, response: RetrieveResponse, timings: dict[str, float]
    ) -> None:
        if self.on_primary_result is None:
            return
        try:
            self.on_primary_result(request, response, timings)
        except Exception:  # a shadow/experiment hook must never fail the primary answer
            log.exception("on_primary_result hook failed")

    # --- batches ---

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
    ) -> tuple[BatchOutcome, list[StateRow | None]]:
        compute = BatchCompute(
            payloads, cached, search_mode=self.settings.search_mode, device=self.settings.device
        )
        return compute.encode_misses(), compute.rows

    async def _finish_stage(
        self, jobs: Sequence[Job[Prepared, RowResult]], encoded: Sequence[Encoded]
    ) -> list[RowResult | BaseException]:
        """The batcher's second stage: search + rerank on the compute thread."""
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
        out = BatchCompute(
            payloads,
            [e.cached for e in encoded],
            search_mode=self.settings.search_mode,
            device=self.settings.device,
            rows=[e.row for e in encoded],
        ).search_all()
        results: list[RowResult | BaseException] = []
        for i, (p, e) in enumerate(zip(payloads, encoded, strict=True)):
            if i in out.errors:
                results.append(out.errors[i])
                continue
            items, scores, candidates = out.found[i]
            timings = {
                "cache": e.cache_s,
                "encode": e.encode_s,
                "search": out.search_s,
                "rerank": out.rerank_s,
            }
            results.append(
                RowResult(
                    items=items[: p.k],
                    scores=scores[: p.k],
                    num_candidates=candidates,
                    cache="hit" if i in out.from_cache else "miss",
                    batch_size=len(payloads),
                    timings=timings,  # the batches', for every row
                )
            )
        return results, out.fresh

    # --- shadow copies: staged, giving way to primary batches ---

    async def _compute_staged(self, p: Prepared, on_stage: StageHook | None) -> RowResult:
        """One shadow row: cache lookup, then encode (on a miss), each beam-search level and the
        rerank as separate compute-thread stages, each started only while the batcher is idle."""
        max_wait_s = self.settings.shadow_max_age_s
        give_up_at = time.monotonic() + max_wait_s
        timings = {"yield": 0.0, "encode": 0.0, "search": 0.0}

        async def stage(name: str, timing: str, fn: Callable[..., T], *args: Any) -> T:
            if not self.batcher.idle:
                SHADOW_YIELDS.labels(shadow=p.model.name).inc()
                t_wait = time.perf_counter()
                idle = await self.batcher.wait_idle(give_up_at - time.monotonic())
                timings["yield"] += time.perf_counter() - t_wait
                if self.draining:
                    raise Unavailable("shutting down: shadow copy dropped")
                if not idle:
                    raise ShadowStale(
                        f"shadow copy for {p.model.name} gave way to primary batches for more than "
                        f"{max_wait_s} s (before stage {name})"
                    )
            if on_stage is not None:
                on_stage(name)
            t_run = time.perf_counter()
            try:
                return await self.batcher.run_low_priority(fn, *args)
            finally:
                timings[timing] += time.perf_counter() - t_run

        t0 = time.perf_counter()
        cached = (await self.cache.get_many([p.key], [state_spec(p)]))[0]
        timings["cache"] = time.perf_counter() - t0
        if cached is None:
            states = await stage("encode", "encode", p.model.retriever.encode, [p.history])
            self._write_back({p.key: (state_spec(p), split_rows(states)[0])})
        else:
            states = stack_rows([cached], self.settings.device)
        if self.settings.search_mode == "bruteforce":
            top_items, top_scores = await stage(
                "bruteforce", "search", bruteforce_topk, states.query, p.model.item_emb, p.k, [p.exclude]
            )
            items, scores = np.asarray(top_items)[0], np.asarray(top_scores, dtype=np.float32)[0]
            candidates = p.model.num_items - len(p.exclude)
        else:
            search = p.model.retriever.staged_search(
                states, k=p.k, beam_size=p.beam_size, exclude=[p.exclude]
            )
            while not search.done:
                await stage(search.next_stage, "search", search.step)
            result = search.result()
            items, scores = result.items[0], result.scores[0].astype(np.float32)
            candidates = int(result.num_candidates[0])
        return RowResult(
            items=items[: p.k],
            scores=scores[: p.k],
            num_candidates=candidates,
            cache="hit" if cached is not None else "miss",
            batch_size=1,
            timings=timings,
        )

    def _write_back(self, fresh: FreshRows) -> None:
        """Store fresh encoder states after the answer (one pipelined SET, not awaited)."""
        task = asyncio.create_task(self.cache.set_many(fresh))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
