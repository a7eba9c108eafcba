"""What the engine answers, in domain terms: raw item ids with scores, the model that answered and
how (no HTTP models here; :mod:`service.http.responses` builds those for the API, and the shadow lane
reads these directly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.engine.compute import RowResult
from service.engine.request_map import Mapped

Fewer = Literal["catalogue", "beam_limit"]
Fallback = Literal["popular", "dense"]


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    method: str
    catalogue_version: int = 0


@dataclass(frozen=True)
class Retrieval:
    """One request's answer."""

    items: tuple[str, ...]  # raw item ids, best first, no padding
    scores: tuple[float, ...]  # one per item
    model: ModelIdentity
    variant: str
    unknown_history_items: int
    truncated: bool
    fallback: Fallback | None  # popular: no usable history; dense: the beam left too few, filled
    fewer: Fewer | None
    batch_size: int  # rows of the batch it was computed in (0: no compute)
    num_candidates: int  # items its answer was chosen from
    history_used: int  # known history items given to the encoder
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (what debug shows)
    latency_s: float = math.nan  # request to answer, as the engine measured it
    fallback_items: int = 0  # items the fallback gave (dense: filled by exact search)
    added_history_items: int = 0  # history items added after training: skipped before encode


def fewer_reason(returned: int, k: int, available: int) -> Fewer | None:
    """Why an answer holds fewer than ``k`` items: ``"catalogue"`` (fewer than ``k`` items are left
    once the excluded, removed and not allowed ones are out) or ``"beam_limit"`` (the beam, widened up to
    ``GENRET_MAX_BEAM_SIZE``, reached too few); ``None`` when it holds ``k``."""
    if returned >= k:
        return None
    return "catalogue" if available < k else "beam_limit"


def identity(mapped: Mapped) -> ModelIdentity:
    m = mapped.model
    return ModelIdentity(
        name=m.name, version=m.version, method=m.method, catalogue_version=m.catalogue_version
    )


def answered(mapped: Mapped, row: RowResult, timings: dict[str, float], latency_s: float) -> Retrieval:
    """The search's row in raw ids: padding and -inf scores dropped."""
    keep = (row.items > 0) & np.isfinite(row.scores)
    raw_ids = mapped.model.raw_ids
    items = tuple(raw_ids[int(d)] for d in row.items[keep])
    return Retrieval(
        items=items,
        scores=tuple(float(s) for s in row.scores[keep]),
        model=identity(mapped),
        variant=mapped.variant,
        unknown_history_items=mapped.unknown,
        truncated=mapped.truncated,
        fallback="dense" if row.filled else None,
        fewer=fewer_reason(len(items), mapped.k, mapped.available),
        batch_size=row.batch_size,
        num_candidates=row.num_candidates,
        history_used=len(mapped.history),
        timings=timings,
        latency_s=latency_s,
        fallback_items=row.filled,
        added_history_items=mapped.added,
    )


def popular(mapped: Mapped, latency_s: float = math.nan) -> Retrieval:
    """The answer to a history with no usable item: the most popular live items it may return."""
    model = mapped.model
    take = model.popular  # [n_live]
    if mapped.allow is not None:
        take = take[np.isin(take, mapped.allow)]
    take = take[: mapped.k + len(mapped.exclude)]
    if len(mapped.exclude):
        take = take[~np.isin(take, mapped.exclude)]
    take = take[: mapped.k]
    return Retrieval(
        items=tuple(model.raw_ids[int(d)] for d in take),
        scores=tuple(float(model.popularity[d]) for d in take),
        model=identity(mapped),
        variant=mapped.variant,
        unknown_history_items=mapped.unknown,
        truncated=mapped.truncated,
        fallback="popular",
        fewer=fewer_reason(len(take), mapped.k, mapped.available),
        batch_size=0,
        num_candidates=mapped.available,
        history_used=0,
        latency_s=latency_s,
        fallback_items=len(take),
        added_history_items=mapped.added,
    )
