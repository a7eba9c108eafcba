"""The delta files past a model's last one, applied in order on top of it (docs/live_catalogue.md).

:func:`replay` reads every pending file of a model's :class:`~service.catalogue.store.DeltaStore`
and applies it to a :class:`Chain`; :meth:`Chain.built` is the new :class:`LoadedModel` (not yet
installed: :mod:`service.catalogue.live` swaps it in).

* A file of another bundle fingerprint belongs to another version of the bundle: passed over,
  logged once (not a fault).
* A file that cannot be read or applied is quarantined (:meth:`DeltaStore.quarantine`): passed over
  on every replica alike, counted once per process in
  ``genret_catalogue_quarantined_total{model,reason}`` (reasons:
  :data:`service.catalogue.records.REASONS`), and the files behind it still apply. Nothing a file
  holds can raise out of :func:`replay`.
* A delta its writer already applied in this process (:class:`Prepared`: the same catalogue version
  before it) is installed from that result, not applied a second time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from models.catalogue.catalogue import ApplyReport, Catalogue
from models.catalogue.delta import DeltaError
from service.catalogue.records import APPLY_FAILED, REFUSED, UNREADABLE
from service.catalogue.store import DeltaFile, DeltaLog
from service.heavy_lane import pace
from service.metrics import REGISTRY
from service.registry.loaded_model import LoadedModel

log = logging.getLogger(__name__)

CATALOGUE_DELTAS = Counter(
    "genret_catalogue_deltas_total",
    "Catalogue delta files by result: applied, or quarantined (could not be read or applied: "
    "passed over on every replica alike; genret_catalogue_quarantined_total says why).",
    ["model", "result"],
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "genret_catalogue_quarantined_total",
    "Delta files set aside because they cannot be read or applied, once per file and process, by "
    "reason (not_regular_file, too_large, unreadable, not_utf8, bad_json, bad_record, too_many_items, "
    "bad_delta, refused, apply_failed); later deltas still apply.",
    ["model", "reason"],
    registry=REGISTRY,
)
LAG = Gauge(
    "genret_catalogue_lag_versions",
    "Delta files published for a model that this replica has not taken yet (0 = caught up).",
    ["model"],
    registry=REGISTRY,
)


@dataclass(frozen=True)
class Prepared:
    """A delta applied by its writer before it was published: ``before`` -> ``after``."""

    before: Catalogue
    after: Catalogue
    report: ApplyReport


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

    def apply(self, f: DeltaFile, content: Any, prepared: Prepared | None = None) -> tuple[str, str] | None:
        """Apply file ``f``; ``(reason, detail)`` when it must be quarantined, else None."""
        self.seq = f.seq
        if f.delta is None:
            return f.reason or UNREADABLE, f.error
        before = self.catalogue = self.catalogue or self.base()
        try:
            if prepared is not None and prepared.before is before:
                after, report = prepared.after, prepared.report
            else:
                after, report = before.apply(f.delta, content=content, placement=f.placement, pause=pace)
        except DeltaError as exc:
            return REFUSED, str(exc)[:300]
        except Exception as exc:  # a record no replica can apply: never a reason to stop the log
            log.debug("applying catalogue delta %s failed", f.path, exc_info=True)
            return APPLY_FAILED, f"{type(exc).__name__}: {str(exc)[:200]}"
        self.catalogue = after
        if f.version != after.version:
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


def replay(
    model: LoadedModel,
    store: DeltaLog,
    base: Callable[[], Catalogue],
    prepared: dict[tuple[str, int], Prepared] | None = None,
) -> Chain:
    """``model`` with every pending file of ``store`` applied or quarantined (module docstring)."""
    chain = Chain(model, base, model.catalogue_seq, dict(model.retired))
    content = getattr(model.bundle, "content", None)
    for f in store.pending(model.catalogue_seq):
        if f.delta is not None and f.base_fingerprint != model.fingerprint:
            chain.seq = f.seq  # another version of the bundle: not this catalogue's
            store.report(f, f"base fingerprint {f.base_fingerprint[:12]} is not the bundle's")
            continue
        own = None if prepared is None else prepared.pop((model.name, f.seq), None)  # this process wrote it
        fault = chain.apply(f, content, own)
        if fault is None:
            CATALOGUE_DELTAS.labels(model=model.name, result="applied").inc()
        elif store.quarantine(f, *fault):
            CATALOGUE_DELTAS.labels(model=model.name, result="quarantined").inc()
            QUARANTINED.labels(model=model.name, reason=fault[0]).inc()
    return chain
