"""Response building: the engine's :class:`service.engine.results.Retrieval` -> the API's HTTP models.
Only the API layer (:mod:`service.http.routes`) calls this."""

from __future__ import annotations

from service.engine.results import Retrieval
from service.http.schemas import DebugInfo, ModelRef, RetrieveResponse, ScoredItem


def to_response(result: Retrieval, *, debug: bool) -> RetrieveResponse:
    """``result`` as the API answers it; ``debug`` adds :func:`debug_info` (the request asked)."""
    return RetrieveResponse(
        items=[ScoredItem(id=i, score=s) for i, s in zip(result.items, result.scores, strict=True)],
        model=ModelRef(
            name=result.model.name,
            version=result.model.version,
            method=result.model.method,
            catalogue_version=result.model.catalogue_version,
        ),
        variant=result.variant,
        unknown_history_items=result.unknown_history_items,
        added_history_items=result.added_history_items,
        truncated=result.truncated,
        fallback=result.fallback,
        fallback_items=result.fallback_items if result.fallback == "dense" else None,
        fewer=result.fewer,
        debug=debug_info(result) if debug else None,
    )


def debug_info(result: Retrieval) -> DebugInfo:
    """Debug details that say nothing about the cache entry of the request's key (the caller chose
    its ``user_id``): no hit/miss, and only batch-level stage times — ``compute`` is the batch's
    encode + search, the same for every row whether its states were cached or not. (A request
    alone in its batch still takes a little longer on a miss; that shows in any client's
    stopwatch too, and hiding it would mean encoding on every hit.)"""
    timings = result.timings
    shown = {k: v for k, v in timings.items() if k in ("queue", "cache", "total")}
    if "encode" in timings or "search" in timings:
        shown["compute"] = sum(timings.get(stage, 0.0) for stage in ("encode", "search", "rerank"))
    return DebugInfo(
        timings_ms={k: round(v * 1000.0, 3) for k, v in shown.items()},
        batch_size=result.batch_size,
        num_candidates=result.num_candidates,
        history_used=result.history_used,
    )
