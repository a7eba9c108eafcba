"""Catalogue deltas applied to serving models without a reload (docs/live_catalogue.md).

Per model, one lock-held chain: read the delta files past the model's last one
(:mod:`service.catalogue.store`), :meth:`models.catalogue.catalogue.Catalogue.apply` each in order, then one
:meth:`models.search.retriever.Retriever.with_catalogue` and one new :class:`LoadedModel`
(``dataclasses.replace``) swapped into the registry by compare-and-swap
(:meth:`ModelRegistry.replace_model`). Requests holding the old model finish on it; the new one
shares the ONNX sessions and the device item table's buffer.

* Every replica applies the same files in the same order, so all hold the same catalogue: a file
  that does not apply (damaged, or contradicting the version before it) is skipped on every
  replica alike, logged and counted (``genret_catalogue_deltas_total{result="refused"}``).
* ``POST /admin/items`` (:meth:`LiveCatalogue.add`): the delta is checked against the newest
  version before anything is written; then the next file is claimed atomically (another replica
  may take the number first: catch up, check again, retry) and applied here at once.
* A poller (:meth:`LiveCatalogue.poll`, every ``GENRET_CATALOGUE_POLL_S``) applies what other
  replicas wrote; a reload of a bundle re-applies its deltas before the new model serves
  (:meth:`LiveCatalogue.caught_up`, the registry's load hook). All of it runs off the event loop.
* Version 0 is built in that load hook, before the model serves (``GENRET_CATALOGUE_PREBUILD``):
  at start-up before the replica reports ready, at a reload before the swap, so it never competes
  with requests. It shares the bundle's item table and the model's id map (no copy until a first
  added item needs a table of its own): a few seconds and tens of MiB at 1M items
  (docs/live_catalogue.md).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from prometheus_client import Counter, Gauge

from models.catalogue.catalogue import ApplyReport, Catalogue
from models.catalogue.delta import Delta, DeltaError
from service.catalogue.store import DeltaFile, DeltaStore, SequenceTaken, delta_dir
from service.errors import CatalogueStoreFailed, LimitExceeded
from service.metrics import REGISTRY
from service.registry.model_registry import LoadedModel, ModelRegistry
from service.settings import Settings

log = logging.getLogger(__name__)

CATALOGUE_VERSION = Gauge(
    "genret_catalogue_version",
    "Catalogue version served per model: deltas applied to its bundle (0 = the bundle as trained).",
    ["model"],
    registry=REGISTRY,
)
CATALOGUE_ITEMS = Gauge(
    "genret_catalogue_items", "Live items (may be returned) per model.", ["model"], registry=REGISTRY
)
CATALOGUE_DELTAS = Counter(
    "genret_catalogue_deltas_total",
    "Catalogue delta files by result: applied, or refused (damaged, or contradicting the version "
    "before it: skipped on every replica alike).",
    ["model", "result"],
    registry=REGISTRY,
)
PREBUILT = Gauge(
    "genret_catalogue_prebuilt",
    "1 once a model's catalogue (version 0) is built (before it serves) and a delta pays only itself.",
    ["model"],
    registry=REGISTRY,
)
APPLY_SECONDS = Gauge(
    "genret_catalogue_apply_seconds",
    "Seconds the last catalogue update of a model took (apply + retriever + swap).",
    ["model"],
    registry=REGISTRY,
)


@dataclass
class Chain:
    """Deltas applied on top of one model, before its new :class:`LoadedModel` is built."""

    model: LoadedModel
    base: Callable[[], Catalogue]  # the model's catalogue, built only when a file is to apply
    seq: int
    retired: dict[str, int]
    catalogue: Catalogue | None = None
    added_attributes: list[tuple[str, ...]] = field(default_factory=list)
    reports: dict[int, ApplyReport] = field(default_factory=dict)  # file sequence -> what it did

    def apply(self, f: DeltaFile, content: Any) -> str | None:
        """Apply file ``f``; the reason it is refused, or None."""
        self.seq = f.seq
        if f.delta is None:
            return f.error
        before = self.catalogue = self.catalogue or self.base()
        try:
            self.catalogue, report = before.apply(f.delta, content=content)
        except DeltaError as exc:
            return str(exc)
        if f.version != self.catalogue.version:
            log.warning(
                "catalogue delta %s says version %d, applied as %d", f.path, f.version, report.version
            )
        for raw in f.delta.remove:
            self.retired[raw] = before.dense_of[raw]
        for item in f.delta.add:
            self.retired.pop(item.id, None)
        self.added_attributes += [item.attributes for item in f.delta.add]
        self.reports[f.seq] = report
        return None

    def built(self) -> LoadedModel:
        """The model serving the chain's catalogue (the same model when nothing applied)."""
        old, cat = self.model, self.catalogue
        if not self.reports or cat is None:
            return old if self.seq == old.catalogue_seq else replace(old, catalogue_seq=self.seq)
        retriever = old.retriever.with_catalogue(cat)
        live = cat.live
        new_ids = np.arange(len(old.raw_ids), cat.num_rows, dtype=np.int64)
        popular = np.concatenate([old.popular[live[old.popular]], new_ids[live[new_ids]]])  # [n_live]
        attrs = old.item_attributes
        if attrs is not None and self.added_attributes:
            attrs = attrs.extended(self.added_attributes)
        return replace(
            old,
            retriever=retriever,
            raw_ids=cat.item_ids,
            dense_of=cat.dense_of,
            popular=popular,
            popularity=np.asarray(cat.popularity, np.float64),
            item_emb=retriever.item_emb,
            catalogue_seq=self.seq,
            retired=self.retired,
            item_attributes=attrs,
            removed=np.flatnonzero(~live[1:]).astype(np.int64) + 1,
        )


T = TypeVar("T")


CATALOGUE_SWITCH_S = 0.0005  # GIL switch interval while a catalogue job runs (CPython's default: 5 ms)


def _switching_often(fn: Callable[..., T], *args: Any) -> T:
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, CATALOGUE_SWITCH_S))
    try:
        return fn(*args)
    finally:
        sys.setswitchinterval(before)


class LiveCatalogue:
    """The catalogue side of every loaded model (module docstring)."""

    # one thread for every catalogue job (adds, the poller, the background build): they never run
    # at once. (A lower OS priority for it was measured worse: it holds the GIL while descheduled.)
    _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalogue")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the catalogue thread, with a shorter GIL switch interval while it runs
        (its Python loops would otherwise hold the GIL for up to 5 ms at a time against the
        threads serving requests)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, _switching_often, fn, *args)

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._locks: dict[str, threading.Lock] = {}
        self._stores: dict[Path, DeltaStore] = {}
        self._guard = threading.Lock()
        self._base: dict[str, Catalogue] = {}  # fingerprint -> version 0
        registry.on_load(self.caught_up)

    def store(self, model: LoadedModel) -> DeltaStore:
        path = delta_dir(model.path, self.settings.catalogue_dir)
        with self._guard:
            return self._stores.setdefault(path, DeltaStore(path))

    def catalogue_of(self, model: LoadedModel) -> Catalogue:
        """The catalogue ``model`` serves; version 0 is built from the bundle once per fingerprint
        (models no longer loaded are forgotten)."""
        if model.retriever.catalogue is not None:
            return model.retriever.catalogue
        with self._guard:
            base = self._base.get(model.fingerprint)
        if base is None:
            dense_of = model.dense_of if isinstance(model.dense_of, dict) else None
            base = Catalogue.from_bundle(model.bundle, model.raw_ids, dense_of)
            with self._guard:
                loaded = {m.fingerprint for m in self.registry.all()} | {model.fingerprint}
                self._base = {fp: c for fp, c in self._base.items() if fp in loaded}
                self._base[model.fingerprint] = base
        return base

    def prebuild(self, model: LoadedModel) -> None:
        """Build version 0 of ``model``'s catalogue ahead of any delta (from the load hook, before the
        model serves); a failure is logged and the first delta builds it."""
        try:
            self.catalogue_of(model)
            PREBUILT.labels(model=model.name).set(1)
        except Exception:
            log.exception("building the catalogue of %s failed; the first delta builds it", model.name)

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    # ------------------------------------------------------------------ applying
    def chain(self, model: LoadedModel) -> Chain:
        """``model`` with every pending delta file applied (not installed)."""
        store = self.store(model)
        chain = Chain(model, lambda: self.catalogue_of(model), model.catalogue_seq, dict(model.retired))
        content = getattr(model.bundle, "content", None)
        for f in store.pending(model.catalogue_seq):
            if f.delta is not None and f.base_fingerprint != model.fingerprint:
                chain.seq = f.seq  # another version of the bundle: not this catalogue's
                store.report(f, f"base fingerprint {f.base_fingerprint[:12]} is not the bundle's")
                continue
            reason = chain.apply(f, content)
            result = "applied" if reason is None else "refused"
            CATALOGUE_DELTAS.labels(model=model.name, result=result).inc()
            if reason is not None:
                store.report(f, reason)
        return chain

    def caught_up(self, model: LoadedModel) -> LoadedModel:
        """The registry's load hook: a (re)loaded bundle serves with its deltas applied."""
        if model.bundle is None:  # a stub model (tests of the registry rules)
            return model
        if self.settings.catalogue_prebuild:
            self.prebuild(model)
        new = self.chain(model).built()
        self._gauges(new)
        return new

    def sync(self, name: str) -> tuple[LoadedModel, dict[int, ApplyReport]]:
        """Apply the pending files to model ``name`` and install the result (under its lock)."""
        with self._lock(name):
            return self._sync_locked(name)

    def _sync_locked(self, name: str) -> tuple[LoadedModel, dict[int, ApplyReport]]:
        reports: dict[int, ApplyReport] = {}
        while True:
            model = self.registry.get(name)
            started = time.perf_counter()
            chain = self.chain(model)
            new = chain.built()
            if new is model:
                return model, reports
            if self.registry.replace_model(model, new):  # else a reload swapped it: again, on the new one
                reports.update(chain.reports)
                self._gauges(new)
                APPLY_SECONDS.labels(model=name).set(time.perf_counter() - started)
                if chain.reports:
                    log.info(
                        "catalogue of %s now version %d (%d live items)",
                        name,
                        new.catalogue_version,
                        new.num_live,
                    )
                return new, reports

    def sync_all(self) -> None:
        for name in self.registry.names():
            try:
                self.sync(name)
            except Exception:
                log.exception("catalogue update of %s failed; it serves its version as it was", name)

    async def poll(self, period_s: float) -> None:
        """Apply other replicas' deltas every ``period_s`` (runs until cancelled), off the event loop."""
        while True:
            await asyncio.sleep(period_s)
            await self.run(self.sync_all)

    def _gauges(self, model: LoadedModel) -> None:
        CATALOGUE_VERSION.labels(model=model.name).set(model.catalogue_version)
        CATALOGUE_ITEMS.labels(model=model.name).set(model.num_live)

    # ------------------------------------------------------------------ writing
    def add(self, name: str | None, body: Any) -> dict[str, Any]:
        """``POST /admin/items``: check ``body`` (a delta), write it as the next file, apply it here.
        :class:`DeltaError` (422 naming the field) before anything is written."""
        delta = Delta.from_json(body)
        self._check_size(delta)
        key = self.registry.get(name).name
        with self._lock(key):
            while True:
                model, _ = self._sync_locked(key)
                cat = self.catalogue_of(model)
                cat.check(delta, getattr(model.bundle, "content", None))
                store = self.store(model)
                if store.sequences(model.catalogue_seq):
                    continue  # a file arrived since the catch-up: apply it, check again
                seq = model.catalogue_seq + 1
                try:
                    store.claim(seq, model.fingerprint, cat.version + 1, delta)
                except SequenceTaken:
                    continue
                except OSError as exc:
                    raise CatalogueStoreFailed(
                        f"cannot write to the delta directory {store.directory}: {exc.strerror or exc} "
                        "(GENRET_CATALOGUE_DIR: a writable volume every replica mounts)"
                    ) from None
                model, reports = self._sync_locked(key)
                report = reports.get(seq)
                if report is None:  # refused on apply although checked: every replica skips it alike
                    raise DeltaError("body", f"the delta was written as file {seq} but did not apply")
                return {
                    "model": key,
                    "version": report.version,
                    "added": report.added,
                    "removed": report.removed,
                    "new_leaves": report.new_leaves,
                    "joined_copies": report.joined_copies,
                    "over_capacity": report.over_capacity,
                }

    def _check_size(self, delta: Delta) -> None:
        most = self.settings.max_delta_items
        if len(delta) > most:
            loc = "add" if len(delta.add) >= len(delta.remove) else "remove"
            raise LimitExceeded(
                (loc,),
                f"{len(delta.add)} added + {len(delta.remove)} removed items exceed max_delta_items={most}",
            )
