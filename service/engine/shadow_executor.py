"""The staged shadow executor: one shadow copy, run in stages that give way to primary batches.

Shadow copies (:meth:`service.engine.engine.Engine.run_shadow`, called by the shadow lane) never enter
the batcher, and two mechanisms keep them off the primary's path:

1. Give-way points. A copy runs in stages — encode, each beam-search level
   (:class:`models.search.staged.StagedSearch`, the same stages as the one-shot search), rerank; or the one
   brute-force stage — and before every stage it waits for :meth:`Batcher.wait_idle` (nothing
   queued, forming or computing). A primary batch that arrives mid-copy overlaps with at most the
   one stage already running (about a millisecond for one row), never with a whole shadow
   retrieve; the copy goes on when the primary work is done. A copy that spends more than
   ``shadow_max_age_s`` giving way is abandoned with :class:`ShadowStale` (counted
   as dropped, ``stale``).
2. A low-priority thread. The stages run on the batcher's background thread
   (:meth:`Batcher.run_low_priority`, OS nice 19), not on the compute thread: a primary batch is
   never queued behind a shadow stage, and when both are runnable the scheduler prefers the
   compute thread, the event loop and everything else on the machine. Intra-op threads stay at
   the settings' value (the ONNX Runtime sessions run in the calling thread). The GIL is shared,
   but a stage holds it only between torch / ORT calls (which release it), and the give-way
   points keep at most one stage overlapping a primary batch, so a descheduled low-priority
   holder cannot stall the primary for long.

Batching several copies into one stage (more work per interruption) is not done; the measured
effect of shadow traffic on the primary is in docs/results.md (shadow lane).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import Counter

from models.search.retriever import EncoderStates
from service.cache.codec import StateRow
from service.cache.state_cache import StateCache
from service.engine.batcher import Batcher
from service.engine.compute import FreshRows, RowInput, RowResult, state_spec
from service.engine.states import host_rows, stack_states
from service.engine.strategy import SearchStrategy
from service.errors import Unavailable
from service.metrics import REGISTRY

T = TypeVar("T")

SHADOW_YIELDS = Counter(
    "genret_shadow_yields_total",
    "Times a running shadow copy paused between two stages because primary work was waiting.",
    ["shadow"],
    registry=REGISTRY,
)


class ShadowStale(Exception):
    """Raised by ``run_shadow`` when a copy waited too long for spare capacity between its stages;
    the lane counts it as ``genret_shadow_dropped_total{reason="stale"}`` (not as an error)."""


# on_stage(stage name): called on the event loop just before each shadow stage runs (tracing, tests)
StageHook = Callable[[str], None]


class ShadowExecutor:
    """Runs one shadow row at a time per call (module docstring); shares the engine's batcher and cache."""

    def __init__(
        self,
        batcher: Batcher[Any, Any],
        cache: StateCache,
        strategy: SearchStrategy,
        *,
        device: str,
        max_wait_s: float,
        store: bool,
        write_back: Callable[[FreshRows], None],
        draining: Callable[[], bool],
    ) -> None:
        self.batcher = batcher
        self.cache = cache
        self.strategy = strategy
        self.device = device
        self.max_wait_s = max_wait_s
        self.store = store
        self.write_back = write_back
        self.draining = draining

    async def run(
        self, p: RowInput, on_stage: StageHook | None = None, strategy: SearchStrategy | None = None
    ) -> RowResult:
        """Cache lookup, then encode (on a miss), each search stage of ``strategy`` (this executor's
        when None), each started only while the batcher is idle; the row's result in dense ids."""
        give_up_at = time.monotonic() + self.max_wait_s
        timings = {"yield": 0.0, "encode": 0.0, "search": 0.0}

        async def stage(name: str, timing: str, fn: Callable[..., T], *args: Any) -> T:
            if not self.batcher.idle:
                await self._give_way(p, name, give_up_at, timings)
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

            def encode() -> tuple[EncoderStates, StateRow | None]:
                states = p.model.retriever.encode([p.history])  # stays on the device for the search
                return states, host_rows(states)[0] if self.store else None  # the host copy: for the cache

            states, fresh = await stage("encode", "encode", encode)
            if fresh is not None:
                self.write_back({p.key: (state_spec(p), fresh)})
        else:
            states = stack_states([cached], self.device)
        run = (strategy or self.strategy).staged(p.model, states, p.k, p.beam_size, [p.exclude])
        while not run.done:
            await stage(run.next_stage, "search", run.step)
        result = run.result()
        return RowResult(
            items=result.items[0][: p.k],
            scores=result.scores[0][: p.k],
            num_candidates=int(result.num_candidates[0]),
            cache="hit" if cached is not None else "miss",
            batch_size=1,
            timings=timings,
        )

    async def _give_way(self, p: RowInput, name: str, give_up_at: float, timings: dict[str, float]) -> None:
        """Wait for an idle batcher before stage ``name``; :class:`ShadowStale` past ``give_up_at``."""
        SHADOW_YIELDS.labels(shadow=p.model.name).inc()
        t_wait = time.perf_counter()
        idle = await self.batcher.wait_idle(give_up_at - time.monotonic())
        timings["yield"] += time.perf_counter() - t_wait
        if self.draining():
            raise Unavailable("shutting down: shadow copy dropped")
        if not idle:
            raise ShadowStale(
                f"shadow copy for {p.model.name} gave way to primary batches for more than "
                f"{self.max_wait_s} s (before stage {name})"
            )
