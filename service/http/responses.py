"""Response building: the engine's :class:`service.engine.results.Retrieval` -> the API's HTTP models.
Only the API layer (:mod:`service.http.routes`) calls this."""

from __future__ import annotations

from service.engine.results import Retrieval
from service.schemas import DebugInfo, ModelRef, RetrieveResponse, ScoredItem


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
    its ``user_id``): no hit/miss, and of the timings only ``queue`` (how long this request waited
    before its batch began, which is before its cache lookup). The batch's cache and compute times
    and the total are left out: a request alone in its batch computes less on a hit, and measured
    in pairs those times told a cached history from an uncached one. What stays observable is the
    response time any client measures itself (docs/deployment.md "Debug answers")."""
    timings = result.timings
    shown = {k: v for k, v in timings.items() if k == "queue"}
    return DebugInfo(
        timings_ms={k: round(v * 1000.0, 3) for k, v in shown.items()},
        batch_size=result.batch_size,
        num_candidates=result.num_candidates,
        history_used=result.history_used,
    )
