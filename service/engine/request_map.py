"""Request mapping: a raw :class:`service.schemas.RetrieveRequest` -> dense ids of one bundle.

Per request, on the event loop and before any compute: check the limits from settings (422 naming
the field), choose the variant and bundle (the experiment's router, else the request's ``model``,
else the default), map raw history ids to dense ids (unknown ids skipped and counted), keep the
model's ``max_history`` most recent (``truncated``), collect the excluded ids, and resolve ``k`` and
the beam. This is the one place a request's ``k``, beam and constraints are resolved: everything
after reads them from :class:`Mapped` (and the compute from its :class:`RowInput`).

Live catalogue (docs/live_catalogue.md): history items added after training (dense ids past
``retriever.encoder_items``) are skipped before encode and counted
(``genret_history_skipped_total{reason="added_item"}``), so the cache key, built from the dense
ids encoded, carries what the cached state depends on; removed items still encode. ``allow`` and
``categories`` become one sorted array of live dense ids the row may return (unknown ids ignored).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from prometheus_client import Counter

from service.cache.codec import cache_key
from service.engine.compute import RowInput
from service.errors import LimitExceeded
from service.heavy_lane import pace
from service.metrics import REGISTRY
from service.registry.model_registry import LoadedModel, ModelRegistry
from service.schemas import RetrieveRequest
from service.settings import Settings

DEFAULT_VARIANT = "default"
ANONYMOUS = "anonymous"

HISTORY_SKIPPED = Counter(
    "genret_history_skipped_total",
    "Known history items not given to the encoder, by reason (added_item: added to the catalogue after "
    "training; shadow copies included).",
    ["reason"],
    registry=REGISTRY,
)


PACE_IDS = 2048
"""Ids looked up between two :func:`service.heavy_lane.pace` calls (about 1 ms at 1M items)."""


def dense_ids(lookup: Callable[[Sequence[str]], list[int | None]], raws: Sequence[str]) -> list[int]:
    """The dense ids of the known ``raws``, in order (unknown ones skipped), looked up in chunks
    between which a request in the heavy lane gives way (:func:`service.heavy_lane.pace`)."""
    found: list[int] = []
    for start in range(0, len(raws), PACE_IDS):
        found.extend(d for d in lookup(raws[start : start + PACE_IDS]) if d is not None)
        pace()
    return found


def user_key(user_id: str | None, history: Sequence[str] = ()) -> str:
    """The assignment key: ``u:<user_id>``, else ``h:<hash of the history ids>`` (anonymous users)."""
    if user_id:
        return f"u:{user_id}"
    h = hashlib.blake2b(digest_size=12)
    for item in history:
        h.update(str(item).encode())
        h.update(b"\x1f")
    return f"h:{h.hexdigest()}"


class VariantRouter(Protocol):
    """What the mapping needs from the experiment (``service.shadow.experiments.ExperimentHooks``)."""

    def assign(self, user_key: str) -> str: ...
    def bundle_of(self, variant: str) -> str: ...


@dataclass(frozen=True)
class Mapped:
    """The raw request mapped onto one bundle (before any compute)."""

    model: LoadedModel
    variant: str
    user_key: str
    history: np.ndarray  # [t] dense, oldest first, t <= max_history
    exclude: np.ndarray  # [e] dense, unique
    unknown: int  # history ids the bundle does not know (skipped)
    truncated: bool  # the known history was longer than max_history
    k: int  # items asked for (the request's, else the default)
    added: int = 0  # history items added after training (the encoder does not know them): skipped
    allow: np.ndarray | None = None  # [a] live dense ids the row may return (allow and categories), sorted
    available: int = 0  # items the row may return at all (live, allowed, not excluded)
    beam_size: int = 1  # the resolved beam (RequestMapper.beam_size)

    def row_input(self) -> RowInput:
        """The compute's payload (a usable, non-empty history): dense ids, the cache key, k and beam."""
        return RowInput(
            model=self.model,
            key=cache_key(self.model.fingerprint, self.user_key, self.history),
            history=self.history,
            exclude=self.exclude,
            k=self.k,
            beam_size=self.beam_size,
            allow=self.allow,
        )


class RequestMapper:
    """Limits, variant, bundle and dense ids for each request (module docstring)."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        router: VariantRouter | None,
        assignment_key: Callable[[str | None, Sequence[str]], str],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.router = router
        self.assignment_key = assignment_key

    def check_limits(self, request: RetrieveRequest, loc: tuple[str | int, ...]) -> None:
        """The settings' bounds on ``request`` (:class:`LimitExceeded` at ``loc`` + the field)."""
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
        if request.allow is not None and len(request.allow) > s.max_allow_items:
            raise LimitExceeded(
                (*loc, "allow"),
                f"{len(request.allow)} allow ids exceed max_allow_items={s.max_allow_items}",
            )
        if request.deadline_ms is not None and request.deadline_ms > s.max_deadline_ms:
            raise LimitExceeded(
                (*loc, "deadline_ms"),
                f"deadline_ms={request.deadline_ms} exceeds max_deadline_ms={s.max_deadline_ms}",
            )

    def map(self, request: RetrieveRequest) -> Mapped:
        """Variant, bundle and dense ids for ``request`` (unknown ids skipped, history truncated)."""
        user_key = request.user_id or ANONYMOUS
        variant = DEFAULT_VARIANT
        model_name = request.model
        if model_name is None and self.router is not None:
            variant = self.router.assign(self.assignment_key(request.user_id, request.history))
            model_name = self.router.bundle_of(variant)
        model = self.registry.get(model_name)
        full = np.array(dense_ids(model.history_dense, request.history), dtype=np.int64)  # [t_all]
        unknown = len(request.history) - len(full)
        encodable = full[full <= model.encoder_items]  # items added after training: skipped
        added = len(full) - len(encodable)
        if added:
            HISTORY_SKIPPED.labels(reason="added_item").inc(added)
        truncated = len(encodable) > model.max_history
        dense = encodable[-model.max_history :]  # [t]
        excluded = dense_ids(model.live_dense, request.exclude)
        if request.exclude_history:
            excluded.extend(int(d) for d in full)  # the whole history, not only the encoded window
        exclude = np.unique(np.array(excluded, dtype=np.int64))  # [e]
        allow = self.allowed(request, model)
        if allow is None:
            available = model.num_live - len(exclude) + int(np.isin(exclude, model.removed).sum())
        else:
            available = len(np.setdiff1d(allow, exclude, assume_unique=True))
        k = request.k or self.settings.default_k
        beam = self.beam_size(request.beam_size, model, k, len(exclude))
        return Mapped(
            model, variant, user_key, dense, exclude, unknown, truncated, k, added, allow, available, beam
        )

    @staticmethod
    def allowed(request: RetrieveRequest, model: LoadedModel) -> np.ndarray | None:
        """``[a]`` sorted live dense ids of ``allow`` and ``categories`` (both when both are given)."""
        allow = None
        if request.allow is not None:
            allow = np.unique(np.array(dense_ids(model.live_dense, request.allow), dtype=np.int64))
        if request.categories is not None:
            if model.item_attributes is None:
                raise LimitExceeded(
                    ("categories",), f"model {model.name!r} has no item attributes: categories cannot filter"
                )
            holding = model.item_attributes.items_with(request.categories)  # [c] sorted unique
            holding = holding[~np.isin(holding, model.removed)]
            allow = holding if allow is None else np.intersect1d(allow, holding, assume_unique=True)
        return allow

    def beam_size(self, asked: int | None, model: LoadedModel, k: int, num_excluded: int) -> int:
        """The request's beam, else ``GENRET_DEFAULT_BEAM_SIZE`` when set, else the bundle's own default
        (manifest ``config.beam_size``, clamped to the beam bounds); then widened so that the beam's
        leaves hold ``k`` items besides the excluded ones, within ``max_beam_size``
        (:meth:`models.search.retriever.Retriever.beam_for`, the same widening as the offline evaluation)."""
        s = self.settings
        retriever = model.retriever
        beam = asked or s.default_beam_size
        if beam is None:
            beam = min(max(retriever.default_beam_size, s.min_beam_size), s.max_beam_size)
        return int(retriever.beam_for(k, beam, num_excluded, s.max_beam_size))
