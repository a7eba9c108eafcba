"""One batch on the compute thread: encode the cache misses, search by (bundle, beam), and keep a
failure to the rows that cause it.

Invariant: every row of the batch ends with a result or an error of its own, and one row's fault
never fails another. A failing encode or search call is retried row by row; a row whose *cached*
state fails the search is encoded afresh and searched again (its fresh state replaces the cached
one in the cache); only a row that still fails alone gets :class:`service.errors.ComputeFailed`
(500, kind ``compute``) and is counted in ``genret_row_failures_total{stage, outcome="failed"}``.
The retries cost nothing while no call fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.search.retrieval_types import RetrievalResult
from service.cache.codec import StateRow, StateSpec
from service.engine.states import Row, device_rows, host_rows, stack_states
from service.engine.strategy import SearchStrategy
from service.errors import ComputeFailed
from service.metrics import ROW_FAILURES, STAGE_SECONDS
from service.registry.model_registry import LoadedModel

log = logging.getLogger(__name__)

# key -> (spec, row): fresh encoder states to write back to the cache
FreshRows = dict[str, tuple[StateSpec, StateRow]]
# row index -> (its group's result, the row's place in it); k of the group = the largest k of its rows
Searched = dict[int, tuple[RetrievalResult, int]]


@dataclass(frozen=True)
class RowInput:
    """One request ready for the compute: everything in dense ids of one bundle, built once by
    :meth:`service.engine.request_map.Mapped.row_input` (k and beam already resolved there)."""

    model: LoadedModel
    key: str  # cache key
    history: np.ndarray  # [t] dense ids, oldest first, 1 <= t <= max_history
    exclude: np.ndarray  # [e] dense ids never to return
    k: int
    beam_size: int
    allow: np.ndarray | None = None  # [a] dense ids the row may return (None: any)

    def work(self) -> int:
        """Its share of a batch's work budget: the ids it carries (history, exclusions, allow-list),
        which its encode, exact scoring and membership checks grow with."""
        return len(self.history) + len(self.exclude) + (0 if self.allow is None else len(self.allow))


def state_spec(p: RowInput) -> StateSpec:
    """What a cached state row of ``p`` must be: written by ``p``'s bundle, for its history length."""
    return p.model.state_spec(len(p.history))


@dataclass
class BatchOutcome:
    found: Searched = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)
    fresh: FreshRows = field(default_factory=dict)
    from_cache: set[int] = field(default_factory=set)  # rows answered from their cached states
    encode_s: float = 0.0
    search_s: float = 0.0  # the strategy's search (beam search, or brute-force top-K)
    rerank_s: float = 0.0  # leaf items scored by inner product, top-k


class BatchCompute:
    """The compute of one batch (module docstring); one instance per batch."""

    def __init__(
        self,
        payloads: Sequence[RowInput],
        cached: Sequence[StateRow | None],
        *,
        strategy: SearchStrategy,
        device: str,
        store: bool,  # a cache will keep fresh states: copy them to the host for it
        rows: Sequence[Row | None] | None = None,  # states encoded earlier (pipelined batcher)
    ) -> None:
        self.payloads = payloads
        self.cached = cached
        self.rows: list[Row | None] = list(cached if rows is None else rows)
        self.strategy = strategy
        self.device = device
        self.store = store
        self.out = BatchOutcome()

    def run(self) -> BatchOutcome:
        """Encode the misses, then search: both halves in turn."""
        self.encode_misses()
        return self.search_all()

    def encode_misses(self) -> BatchOutcome:
        """First half (the batcher's prepare stage when pipelined): encode the rows with no state."""
        t0 = time.perf_counter()
        misses = [i for i, row in enumerate(self.rows) if row is None]
        self._encode(misses)
        self.out.encode_s = time.perf_counter() - t0
        if misses:
            STAGE_SECONDS.labels(stage="encode").observe(self.out.encode_s)
        return self.out

    def search_all(self) -> BatchOutcome:
        """Second half: search every row with a state, by (bundle, beam); the rerank timed apart."""
        t1 = time.perf_counter()
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(self.payloads):
            if i not in self.out.errors:
                beam = self.strategy.group_beam(p.beam_size)
                groups.setdefault((id(p.model), beam), []).append(i)
        for (_, beam), idxs in groups.items():
            self.out.found.update(self._search_narrowed(idxs, beam))
        self.out.search_s = time.perf_counter() - t1 - self.out.rerank_s
        STAGE_SECONDS.labels(stage="search").observe(self.out.search_s)
        if self.out.rerank_s:
            STAGE_SECONDS.labels(stage="rerank").observe(self.out.rerank_s)
        self.out.from_cache = {
            i for i, row in enumerate(self.cached) if row is not None and self.rows[i] is row
        }
        return self.out

    def _encode(self, idxs: list[int]) -> None:
        """Encode rows ``idxs`` (one call per bundle); a failing call is retried row by row."""
        by_model: dict[int, list[int]] = {}
        for i in idxs:
            by_model.setdefault(id(self.payloads[i].model), []).append(i)
        for group in by_model.values():
            model = self.payloads[group[0]].model
            try:
                states = model.retriever.encode([self.payloads[i].history for i in group])
            except Exception as exc:
                if len(group) == 1:
                    self._fail(group[0], "encode", exc)
                    continue
                log.warning("encode of %d rows for %s failed (%r): row by row", len(group), model.name, exc)
                for i in group:
                    self._encode([i])
                continue
            for i, fresh in zip(group, device_rows(states), strict=True):
                self.rows[i] = fresh  # stays on the device for the search
            if self.store:  # the only host copy of fresh states: for the cache
                for i, row in zip(group, host_rows(states), strict=True):
                    self.out.fresh[self.payloads[i].key] = (state_spec(self.payloads[i]), row)

    def _search_narrowed(self, idxs: list[int], beam: int) -> Searched:
        """Search one (bundle, beam) group; on failure row by row, then a cached row afresh."""
        try:
            return self._search(idxs, beam)
        except Exception as exc:
            failure: Exception = exc
        if len(idxs) > 1:
            log.warning("search of %d rows failed (%r): row by row", len(idxs), failure)
            found: Searched = {}
            for i in idxs:
                found.update(self._search_narrowed([i], beam))
            return found
        i = idxs[0]
        cached = self.cached[i]
        if cached is not None and self.rows[i] is cached:  # the state came from the cache
            self._encode([i])
            if i in self.out.errors:
                return {}
            try:
                found = self._search([i], beam)
            except Exception as exc:
                failure = exc
            else:
                log.warning("a cached state failed the search (%r): recomputed", failure)
                ROW_FAILURES.labels(stage="search", outcome="recomputed").inc()
                return found
        self._fail(i, "search", failure)
        return {}

    def _search(self, idxs: list[int], beam: int) -> Searched:
        payloads = self.payloads
        model = payloads[idxs[0]].model
        group_rows = [self.rows[i] for i in idxs]
        if any(r is None for r in group_rows):
            raise RuntimeError("search reached a row without encoder states")
        states = stack_states([r for r in group_rows if r is not None], self.device)
        k = max(payloads[i].k for i in idxs)
        exclude = [payloads[i].exclude for i in idxs]
        allow = [payloads[i].allow for i in idxs]
        run = self.strategy.staged(
            model,
            states,
            k,
            beam,
            exclude,
            allow if any(a is not None for a in allow) else None,
            fill=[payloads[i].k for i in idxs],  # each row filled up to its own k
        )
        while not run.done:
            t_stage = time.perf_counter()
            if run.step() == "rerank":
                self.out.rerank_s += time.perf_counter() - t_stage
        result = run.result()
        return {i: (result, j) for j, i in enumerate(idxs)}

    def _fail(self, i: int, stage: str, exc: Exception) -> None:
        p = self.payloads[i]
        log.error(
            "%s failed for one row of %s (%d history items): %r", stage, p.model.name, len(p.history), exc
        )
        ROW_FAILURES.labels(stage=stage, outcome="failed").inc()
        self.out.errors[i] = ComputeFailed(
            f"model {p.model.name!r} failed on this request's history ({stage}: {type(exc).__name__})"
        )


@dataclass(frozen=True)
class Encoded:
    """One job after the prepare stage: the states to search with and where they came from."""

    cached: StateRow | None  # the cache's row (None on a miss)
    row: Row  # the cached row itself, or fresh states still on the device
    cache_s: float  # the prepare batch's cache lookup
    encode_s: float  # the prepare batch's encode (0.0 when every row hit)


@dataclass(frozen=True)
class RowResult:
    """One row's search answer, in dense ids of its bundle."""

    items: np.ndarray  # [k] dense ids, 0 where fewer exist
    scores: np.ndarray  # [k] float32, -inf where padded
    num_candidates: int
    cache: str  # "hit" | "miss"
    batch_size: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per batch stage
    filled: int = 0  # of the k items, how many the dense fill gave (the beam left too few)


def row_results(
    payloads: Sequence[RowInput], encoded: Sequence[Encoded], out: BatchOutcome
) -> list[RowResult | BaseException]:
    """Each row's result (cut to its own k) or its own error; the timings are the batch's."""
    results: list[RowResult | BaseException] = []
    for i, (p, e) in enumerate(zip(payloads, encoded, strict=True)):
        if i in out.errors:
            results.append(out.errors[i])
            continue
        result, j = out.found[i]
        items = result.items[j]  # [k'] k' = the largest k of the row's group
        filled = 0 if result.dense_filled is None else int(result.dense_filled[j])
        results.append(
            RowResult(
                items=items[: p.k],
                scores=result.scores[j][: p.k],
                filled=filled_within(items, filled, p.k),
                num_candidates=int(result.num_candidates[j]),
                cache="hit" if i in out.from_cache else "miss",
                batch_size=len(payloads),
                timings={
                    "cache": e.cache_s,
                    "encode": e.encode_s,
                    "search": out.search_s,
                    "rerank": out.rerank_s,
                },
            )
        )
    return results


def filled_within(items: np.ndarray, filled: int, k: int) -> int:
    """Of a row's ``filled`` dense-fill items (after the beam's, at the end of ``items [k']``), those
    left when the row is cut to its own ``k``."""
    total = int((items > 0).sum())
    return max(0, min(total, k) - (total - filled))
