"""Live quality monitor: a sampled share of primary requests is compared, in the shadow lane, with
exact inner-product top-K over the same catalogue version: the staleness alarm of the live catalogue.

For a sampled request (``GENRET_QUALITY_SAMPLE``, default 0.01; 0 = off) the monitor, a listener
of the engine's primary results, queues ``(request, served answer)`` in a small bounded queue (full ->
dropped and counted; nothing on the primary path waits). One worker takes samples one at a time and
runs, through :meth:`service.engine.engine.Engine.run_staged` (:mod:`service.engine.shadow_executor`: stages that each wait for an idle
primary batcher, on the low-priority thread; a sample that gives way for longer than
``GENRET_SHADOW_MAX_AGE_S`` is dropped as ``stale``):

1. the beam search again (deterministic: the served beam's leaves), one stage per level;
2. exact top-K by inner product over the live items the request may return (its exclusions and
   allow-list), in chunks of :data:`CHUNK_ROWS` items, one stage each.

Per model it exports, as moving averages over the last :data:`WINDOW` samples:

* ``genret_quality_overlap{model}``: overlap@K between the served list and the exact list;
* ``genret_quality_beam_coverage{model}``: the share of the exact top-K whose leaf the beam reached.

The rerank scores every item of the beam's leaves by the same inner product, so without filters
and dense fill the two agree; the overlap exceeds the coverage by what the dense fill (``fallback:
"dense"``) brought in from outside the beam. ``genret_quality_samples_total{model,result}`` counts
samples (``ok``, ``queue_full``, ``stale``, ``changed``: the bundle or catalogue version moved before the
sample ran, ``budget``: skipped to keep the exact scoring within ``GENRET_QUALITY_MAX_ITEMS_PER_S``,
``error``). The alert rule on a falling overlap is in docs/deployment.md ("Quality monitor").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from prometheus_client import Counter, Gauge

from models.search.constraints import dense_fill
from models.search.retrieval_types import EncoderStates, RetrievalResult
from models.search.retriever import Retriever
from models.search.staged import StagedSearch
from service.engine.compute import RowResult
from service.engine.request_map import Mapped
from service.engine.results import Retrieval
from service.engine.shadow_executor import ShadowStale
from service.engine.strategy import Allow, Fill, SearchStrategy
from service.metrics import REGISTRY
from service.registry.model_registry import LoadedModel
from service.schemas import RetrieveRequest
from service.shadow.agreement import overlap_at_k

log = logging.getLogger(__name__)

CHUNK_ROWS = 65_536  # items scored per exact-search stage (a few ms on one core)
WINDOW = 200  # samples in each gauge's moving average
QUEUE_SIZE = 64  # samples waiting for spare capacity; more are dropped

QUALITY_OVERLAP = Gauge(
    "genret_quality_overlap",
    f"overlap@K between served lists and exact inner-product top-K, mean of the last {WINDOW} samples.",
    ["model"],
    registry=REGISTRY,
)
QUALITY_COVERAGE = Gauge(
    "genret_quality_beam_coverage",
    f"Share of the exact top-K lying in the beam's leaves, mean of the last {WINDOW} samples.",
    ["model"],
    registry=REGISTRY,
)
QUALITY_SAMPLES = Counter(
    "genret_quality_samples_total",
    "Quality-monitor samples by result: ok, queue_full, stale (no spare capacity in time), "
    "changed (the model version moved before it ran), budget (over GENRET_QUALITY_MAX_ITEMS_PER_S), error.",
    ["model", "result"],
    registry=REGISTRY,
)


class _Engine(Protocol):
    """What the monitor uses of :class:`service.engine.engine.Engine`."""

    def on_primary_result(self, listener: Callable[[RetrieveRequest, Retrieval], object]) -> None: ...
    async def map(self, request: RetrieveRequest) -> Mapped: ...
    async def run_staged(
        self, mapped: Mapped, strategy: SearchStrategy | None = None, *, on_stage: Any = None
    ) -> RowResult: ...


class ExactAndBeam:
    """A one-row staged run: the beam's levels + rerank, then the exact top-K in chunks. Its
    ``result()`` holds the exact list; ``leaves`` the beam's leaves (global node ids, -1 padded)."""

    def __init__(
        self,
        retriever: Retriever,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: np.ndarray,
        allow: np.ndarray | None,
    ) -> None:
        self.retriever = retriever
        self.k = k
        self.exclude = np.asarray(exclude, np.int64)
        self.allow = allow
        self.query = states.query[0].to(retriever.device, torch.float32)  # [Dr]
        self._beam: StagedSearch[RetrievalResult] | None = retriever.staged_search(
            states, k=k, beam_size=beam_size, exclude=[self.exclude], allow=None if allow is None else [allow]
        )
        self.leaves = np.zeros(0, np.int64)
        self._lo = 1  # next exact chunk (row 0 = padding)
        self._best: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scores, dense ids) per chunk
        self._found: RetrievalResult | None = None

    @property
    def done(self) -> bool:
        return self._found is not None

    @property
    def next_stage(self) -> str:
        if self._beam is not None:
            return self._beam.next_stage
        return "exact" if self._found is None else "done"

    def step(self) -> str:
        if self._beam is not None:
            name = self._beam.step()
            if self._beam.done:
                self.leaves = np.asarray(self._beam.result().leaves[0], np.int64)
                self._beam = None
            return name
        if self.allow is not None:  # exact over the allowed items: one stage
            items, scores = dense_fill(
                self.retriever.lookup, self.retriever.item_emb, self.query, np.zeros(0, np.int64),
                self.k, self.allow, self.exclude,
            )  # fmt: skip
            self._finish(items, scores)
        else:
            self._exact_chunk()
        return "exact"

    def _exact_chunk(self) -> None:
        emb, live = self.retriever.item_emb, self.retriever.lookup.live
        lo = self._lo
        hi = min(lo + CHUNK_ROWS, len(live))
        scores = emb[lo:hi] @ self.query  # [c]
        dead = ~live[lo:hi]
        ex = self.exclude[(self.exclude >= lo) & (self.exclude < hi)] - lo
        dead[ex] = True
        scores = scores.masked_fill(torch.from_numpy(dead).to(scores.device), float("-inf"))
        top, idx = torch.topk(scores, min(self.k, hi - lo))
        self._best.append((top, idx + lo))
        self._lo = hi
        if hi >= len(live):
            scores_all = torch.cat([s for s, _ in self._best])
            ids_all = torch.cat([i for _, i in self._best])
            top, pos = torch.topk(scores_all, min(self.k, len(scores_all)))
            vals = top.float().cpu().numpy()
            keep = np.isfinite(vals)
            self._finish(ids_all[pos].cpu().numpy()[keep], vals[keep])

    def _finish(self, items: np.ndarray, scores: np.ndarray) -> None:
        count = np.array([len(items)], np.int64)
        self._found = RetrievalResult(
            items=np.asarray(items, np.int64)[None, :],
            scores=np.asarray(scores, np.float32)[None, :],
            num_candidates=count,
            leaves=self.leaves[None, :],
            num_scored=count,
        )

    def result(self) -> RetrievalResult:
        if self._found is None:
            raise RuntimeError("the exact search has not finished")
        return self._found

    def coverage(self, exact: np.ndarray) -> float:
        """Share of ``exact`` (dense ids) whose leaf is among the beam's leaves (1.0 when empty)."""
        if len(exact) == 0:
            return 1.0
        leaf = self.retriever.lookup.item_path[exact, -1].astype(np.int64)
        return float(np.isin(leaf, self.leaves[self.leaves >= 0]).mean())


class _OneRun:
    """The search strategy the shadow executor steps for one sample: it hands out one ExactAndBeam."""

    name = "quality"

    def __init__(self, allow: np.ndarray | None) -> None:
        self.allow = allow
        self.run: ExactAndBeam | None = None

    def group_beam(self, beam_size: int) -> int:
        return beam_size

    def staged(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
        fill: Fill = False,
    ) -> ExactAndBeam:
        """The sample's one run (its allow-list was given at construction; no fill: exact search)."""
        self.run = ExactAndBeam(model.retriever, states, k, beam_size, exclude[0], self.allow)
        return self.run


class MovingAverage:
    def __init__(self, window: int = WINDOW) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> float:
        self.values.append(value)
        return sum(self.values) / len(self.values)


class QualityMonitor:
    """The sampler, the bounded queue and the worker (module docstring)."""

    def __init__(
        self, engine: _Engine, sample: float, *, max_items_per_s: float = 0.0, seed: int | None = None
    ) -> None:
        """Listens to ``engine``'s primary results when ``sample`` > 0; :meth:`start` runs the worker.
        ``max_items_per_s`` > 0 bounds the exact scoring: a sample whose live items would take the
        monitor past that many items scored per second (on average) is skipped (``budget``)."""
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"quality sample share must be in [0, 1], got {sample}")
        if max_items_per_s < 0:
            raise ValueError(f"max_items_per_s must be >= 0, got {max_items_per_s}")
        self.sample = sample
        self.max_items_per_s = max_items_per_s
        self._budget = 0.0  # items the monitor may still score (a bucket refilled at max_items_per_s)
        self._budget_at = time.monotonic()
        self._engine = engine
        self._rng = random.Random(seed)
        self._queue: asyncio.Queue[tuple[RetrieveRequest, Retrieval]] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None
        self.overlap: dict[str, MovingAverage] = {}
        self.coverage: dict[str, MovingAverage] = {}
        if sample > 0:
            engine.on_primary_result(self.observe)

    def start(self) -> None:
        """Start the worker (inside the running loop); nothing to do when sampling is off."""
        if self.sample > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="genret-quality")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def observe(self, request: RetrieveRequest, result: Retrieval) -> None:
        if result.fallback == "popular" or self._rng.random() >= self.sample:
            return
        try:
            self._queue.put_nowait((request, result))
        except asyncio.QueueFull:
            QUALITY_SAMPLES.labels(model=result.model.name, result="queue_full").inc()

    async def join(self) -> None:
        """Wait until every queued sample has run (tests)."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            request, served = await self._queue.get()
            outcome = "error"
            try:
                outcome = await self.measure(request, served)
            except ShadowStale:
                outcome = "stale"
            except Exception:  # never let one sample kill the monitor
                log.exception("quality sample failed")
            finally:
                QUALITY_SAMPLES.labels(model=served.model.name, result=outcome).inc()
                self._queue.task_done()

    def _spend(self, items: int) -> bool:
        """Whether ``items`` more exact scores fit the budget (always, without one); spends them if so.
        The bucket holds at most one second of budget, or one sample's worth if that is more."""
        if self.max_items_per_s <= 0:
            return True
        now = time.monotonic()
        cap = max(self.max_items_per_s, float(items))
        self._budget = min(cap, self._budget + (now - self._budget_at) * self.max_items_per_s)
        self._budget_at = now
        if self._budget < items:
            return False
        self._budget -= items
        return True

    async def measure(self, request: RetrieveRequest, served: Retrieval) -> str:
        """Run one sample and update the gauges; its outcome (``ok``, ``changed``)."""
        mapped = await self._engine.map(request)
        model: LoadedModel = mapped.model
        same = (model.version, model.catalogue_version) == (
            served.model.version,
            served.model.catalogue_version,
        )
        if not same or len(mapped.history) == 0:
            return "changed"  # a reload or a catalogue delta since the answer: not the same lists
        if not self._spend(model.num_live if mapped.allow is None else len(mapped.allow)):
            return "budget"
        strategy = _OneRun(mapped.allow)
        row = await self._engine.run_staged(mapped, strategy)
        assert strategy.run is not None
        exact = np.asarray(row.items[row.items > 0], np.int64)
        names = model.retriever.catalogue.item_ids if model.retriever.catalogue is not None else model.raw_ids
        exact_ids = [names[int(d)] for d in exact]
        overlap = overlap_at_k(served.items, exact_ids, mapped.k)
        coverage = strategy.run.coverage(exact)
        name = model.name
        QUALITY_OVERLAP.labels(model=name).set(self.overlap.setdefault(name, MovingAverage()).add(overlap))
        QUALITY_COVERAGE.labels(model=name).set(self.coverage.setdefault(name, MovingAverage()).add(coverage))
        return "ok"
