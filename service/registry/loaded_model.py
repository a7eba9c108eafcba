"""One loaded bundle version and what a request needs from it (:class:`LoadedModel`), and how it is
built: load + verify + warm (:func:`load_model`). The registry (:mod:`service.registry.model_registry`)
holds these by name; a catalogue version (:mod:`service.catalogue.live`) is a new ``LoadedModel``
made with ``dataclasses.replace`` beside the old one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.bundle.item_ids import DenseIds, RawIds, dense_many
from service.cache.codec import DEFAULT_STATE_BOUND
from service.cache.state_cache import StateSpec
from service.errors import BadBundle
from service.settings import Settings

if TYPE_CHECKING:  # imported at load time only: the registry is usable without models in tests
    from models.bundle.attributes import ItemAttributes
    from models.bundle.bundle import Bundle
    from models.search.retriever import Retriever


def manifest_field(manifest: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from a manifest that may be a dataclass, a mapping or both."""
    if isinstance(manifest, dict):
        return manifest.get(name, default)
    value = getattr(manifest, name, None)
    if value is not None:
        return value
    try:
        return manifest[name]
    except (KeyError, TypeError):
        return default


@dataclass(frozen=True)
class LoadedModel:
    """One verified, warmed bundle version and everything a request needs from it."""

    name: str
    version: str
    method: str
    fingerprint: str
    path: Path
    bundle: Bundle
    retriever: Retriever
    raw_ids: Sequence[str]  # [N+1], raw_ids[0] == "" (removed items keep theirs)
    dense_of: Mapping[str, int]  # live raw id -> dense id
    popular: np.ndarray  # [n_live] live dense ids, most popular first
    popularity: np.ndarray  # [N+1]
    item_emb: torch.Tensor  # [N+1, Dr] float32 on the serving device (brute-force baseline)
    max_history: int
    memory_dim: int  # D of the encoder's memory [T, D]
    query_dim: int  # Dr of the encoder's query [Dr]
    loaded_at: float
    # the live catalogue (service/catalogue/live.py); version 0 = the bundle as trained
    catalogue_seq: int = 0  # the last delta file applied (or skipped)
    retired: Mapping[str, int] = field(default_factory=dict)  # removed raw id -> its dense id (histories)
    item_attributes: ItemAttributes | None = None  # of every dense id, added items included
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [r] removed dense ids
    state_bound: float = DEFAULT_STATE_BOUND  # largest |encoder output| (manifest state_bounds.max_abs)

    @property
    def num_items(self) -> int:
        """Dense ids 1..N, removed items included."""
        return len(self.raw_ids) - 1

    @property
    def num_live(self) -> int:
        """Items that may be returned."""
        return self.num_items - len(self.removed)

    @property
    def catalogue_version(self) -> int:
        return int(getattr(self.retriever, "catalogue_version", 0))

    @property
    def encoder_items(self) -> int:
        """Dense ids the encoder knows (1..encoder_items); items added later are not among them."""
        return int(getattr(self.retriever, "encoder_items", self.num_items))

    def live_dense(self, raws: Sequence[str]) -> list[int | None]:
        """The dense id of each of ``raws`` among the live items (``None`` where unknown or removed)."""
        return dense_many(self.dense_of, raws)

    def history_dense(self, raws: Sequence[str]) -> list[int | None]:
        """The dense id of each history item: live, or removed (its row stays, so it still encodes)."""
        found = dense_many(self.dense_of, raws)
        if not self.retired:
            return found
        return [self.retired.get(raw) if d is None else d for raw, d in zip(raws, found, strict=True)]

    def state_spec(self, length: int) -> StateSpec:
        """What a cached encoder-state row of a ``length``-item history must be for this model."""
        return StateSpec(self.fingerprint, length, self.memory_dim, self.query_dim, self.state_bound)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "method": self.method,
            "fingerprint": self.fingerprint,
            "num_items": self.num_items,
            "num_live": self.num_live,
            "catalogue_version": self.catalogue_version,
            "max_history": self.max_history,
            "path": str(self.path),
            "loaded_at": self.loaded_at,
        }


def load_model(name: str, path: Path, settings: Settings) -> LoadedModel:
    """Load + verify a bundle, build its Retriever and warm it with a dummy batch."""
    from models.bundle.bundle import (
        load_bundle,  # imported here: the registry is usable without models in tests
    )
    from models.search.retriever import Retriever

    bundle = load_bundle(path)
    retriever = Retriever(
        bundle,
        device=settings.device,
        backend=settings.decoder_backend,
        intra_op_threads=settings.intra_op_threads,
    )
    raw_ids = RawIds(bundle.item_ids)  # the bundle's array itself: no str per item
    if len(raw_ids) >= 1 and raw_ids[0] != "":
        raise BadBundle(f"bundle {path}: item_ids[0] must be the padding id '', got {raw_ids[0]!r}")
    popularity = np.asarray(bundle.popularity, dtype=np.float64)
    popular = np.argsort(-popularity[1:], kind="stable").astype(np.int64) + 1  # [N]
    item_emb = retriever.item_emb  # [N+1, Dr], already on the device
    fingerprint = str(manifest_field(bundle.manifest, "fingerprint", ""))
    version = str(manifest_field(bundle.manifest, "version", "") or fingerprint[:12])
    dims = manifest_field(bundle.manifest, "dims", {})
    model = LoadedModel(
        name=name,
        version=version,
        method=str(manifest_field(bundle.manifest, "method", "unknown")),
        fingerprint=fingerprint,
        path=path,
        bundle=bundle,
        retriever=retriever,
        raw_ids=raw_ids,
        dense_of=DenseIds(bundle.item_ids),
        popular=popular,
        popularity=popularity,
        item_emb=item_emb,
        max_history=int(retriever.max_history),
        memory_dim=int(dims["memory"]),
        query_dim=int(dims["query"]),
        loaded_at=time.time(),
        item_attributes=bundle.item_attributes,
        state_bound=state_bound(manifest_field(bundle.manifest, "state_bounds", None)),
    )
    warm(model, settings)
    return model


def state_bound(recorded: Any) -> float:
    """The manifest's ``state_bounds.max_abs`` (training/state_bounds.py) when it is a positive finite
    number, else :data:`DEFAULT_STATE_BOUND` (bundles exported before the bound was recorded)."""
    value = recorded.get("max_abs") if isinstance(recorded, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf"):
        return float(value)
    return DEFAULT_STATE_BOUND


def warm(model: LoadedModel, settings: Settings) -> None:
    """One dummy batch through encode + search (and the brute-force path), so the first request is not slow."""
    history = [np.array([1], dtype=np.int64), np.array([1, min(2, model.num_items)], dtype=np.int64)]
    beam = min(settings.default_beam_size or model.retriever.default_beam_size, settings.max_beam_size)
    result = model.retriever.retrieve(history, k=min(settings.default_k, model.num_items), beam_size=beam)
    if np.asarray(result.items).shape[0] != len(history):
        raise BadBundle(f"warm-up of {model.name} returned {np.asarray(result.items).shape} items")
    if settings.search_mode == "bruteforce":
        from models.search.bruteforce import bruteforce_topk

        states = model.retriever.encode(history)
        bruteforce_topk(states.query, model.item_emb, settings.default_k)
