"""Catalogue deltas applied to serving models without a reload (docs/live_catalogue.md).

Per model, one lock-held chain: read the delta files past the model's last one
(:mod:`service.catalogue.store`), :meth:`models.catalogue.catalogue.Catalogue.apply` each in order, then one
:meth:`models.search.retriever.Retriever.with_catalogue` and one new :class:`LoadedModel`
(``dataclasses.replace``) swapped into the registry by compare-and-swap
(:meth:`ModelRegistry.replace_model`). Requests holding the old model finish on it; the new one
shares the ONNX sessions and the device item table's buffer.

* Every replica applies the same files in the same order, so all hold the same catalogue: a file
  that cannot be read or applied is quarantined on every replica alike, logged once and counted
  (``genret_catalogue_quarantined_total{model,reason}``; :mod:`service.catalogue.chain`), and the
  files behind it still apply.
* ``POST /admin/items`` (:meth:`LiveCatalogue.add`): the delta is applied to the newest version
  before anything is written (so replicas never meet a delta they cannot apply); then the next
  file is claimed atomically (another replica may take the number first: catch up, apply again,
  retry) and that result installed here at once, without a second apply.
* Start-up never fails because of the log: a model whose deltas cannot be installed serves the last
  version it could build, and ``genret_catalogue_lag_versions{model}`` (and ``/readyz``) say how many
  published files it has not taken.
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
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import redis
from prometheus_client import Gauge

from models.catalogue.catalogue import ApplyReport, Catalogue
from models.catalogue.delta import Delta, DeltaError
from service.catalogue.chain import LAG, Chain, Prepared, replay
from service.catalogue.jobs import Job, Jobs
from service.catalogue.store import DeltaLog, DeltaStore, SequenceTaken, delta_dir
from service.catalogue.stream import StreamLog, check_policy, connect
from service.errors import CatalogueStoreFailed, LimitExceeded, ServiceError
from service.heavy_lane import pace, paced
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
        threads serving requests), paced to ``GENRET_CATALOGUE_SHARE`` of the time while requests
        are being answered (:func:`service.heavy_lane.paced`: reading a record, placing and
        applying stop between chunks)."""
        work = partial(paced, partial(fn, *args), self.settings.catalogue_share)
        return await asyncio.get_running_loop().run_in_executor(self._executor, _switching_often, work)

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._locks: dict[str, threading.Lock] = {}
        self._stores: dict[Path, DeltaStore] = {}
        self._guard = threading.Lock()
        self._base: dict[str, Catalogue] = {}  # fingerprint -> version 0
        self._prepared: dict[tuple[str, int], Prepared] = {}  # (model, sequence) -> what its add applied
        self._failing: dict[str, str] = {}  # model -> the update failure logged last (logged once)
        self.lags: dict[str, int] = {}  # model -> published files not taken yet (/readyz)
        self.jobs = Jobs()  # large deltas accepted with 202 (service/catalogue/jobs.py)
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams: dict[str, StreamLog] = {}
        self._redis = None if settings.catalogue_log != "redis" else _stream_client(settings)
        registry.on_load(self.caught_up)

    def store(self, model: LoadedModel) -> DeltaLog:
        """The log of ``model``'s bundle: its delta directory, or its Redis Stream (GENRET_CATALOGUE_LOG)."""
        s = self.settings
        with self._guard:
            if self._redis is not None:
                name = Path(model.path).name
                if name not in self._streams:
                    self._streams[name] = StreamLog(
                        self._redis, name, s.catalogue_max_file_bytes, s.max_delta_items
                    )
                return self._streams[name]
            path = delta_dir(model.path, s.catalogue_dir)
            if path not in self._stores:
                self._stores[path] = DeltaStore(path, s.catalogue_max_file_bytes, s.max_delta_items)
            return self._stores[path]

    def catalogue_of(self, model: LoadedModel) -> Catalogue:
        """The catalogue ``model`` serves; version 0 is built from the bundle once per fingerprint
        (models no longer loaded are forgotten)."""
        if model.retriever.catalogue is not None:
            return model.retriever.catalogue
        with self._guard:
            base = self._base.get(model.fingerprint)
        if base is None:
            base = Catalogue.from_bundle(model.bundle, model.raw_ids, model.dense_of)
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
        """``model`` with every pending delta file applied or quarantined (not installed)."""
        return replay(model, self.store(model), lambda: self.catalogue_of(model), self._prepared)

    def caught_up(self, model: LoadedModel) -> LoadedModel:
        """The registry's load hook: a (re)loaded bundle serves with its deltas applied. Never fails
        because of the log: when they cannot be installed it serves as it is (the poller tries again)."""
        if model.bundle is None:  # a stub model (tests of the registry rules)
            return model
        if self.settings.catalogue_prebuild:
            self.prebuild(model)
        try:
            new = self.chain(model).built()
        except Exception as exc:
            self._failed(model.name, exc)
            new = model
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
                self._failing.pop(name, None)
            except Exception as exc:
                self._failed(name, exc)
            try:
                self._gauges(self.registry.get(name))
            except Exception:  # unloaded meanwhile
                continue

    def _failed(self, name: str, exc: BaseException) -> None:
        """Log a failed catalogue update once while it keeps failing the same way."""
        what = f"{type(exc).__name__}: {exc}"
        if self._failing.get(name) != what:
            self._failing[name] = what
            log.error("catalogue update of %s failed; it serves its version as it was", name, exc_info=exc)

    async def poll(self, period_s: float) -> None:
        """Apply other replicas' deltas every ``period_s`` (runs until cancelled), off the event loop."""
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.run(self.sync_all)
            except Exception:  # never ends the poller
                log.exception("catalogue poll failed")

    def _gauges(self, model: LoadedModel) -> None:
        CATALOGUE_VERSION.labels(model=model.name).set(model.catalogue_version)
        CATALOGUE_ITEMS.labels(model=model.name).set(model.num_live)
        lag = self.store(model).lag(model.catalogue_seq)
        self.lags[model.name] = lag
        LAG.labels(model=model.name).set(lag)

    # ------------------------------------------------------------------ writing
    def add(self, name: str | None, body: Any) -> dict[str, Any]:
        """``POST /admin/items``: apply ``body`` (a delta) to the newest version, write it as the next
        file, install that result here. :class:`DeltaError` (422 naming the field) before anything
        is written."""
        delta = Delta.from_json(body)
        self._check_size(delta)
        return self._publish(self.registry.get(name).name, delta)

    def deferred(self, body: Any) -> bool:
        """Whether ``body`` lists more ids than ``GENRET_CATALOGUE_ASYNC_ITEMS`` (answered 202)."""
        if not isinstance(body, dict):
            return False
        count = sum(len(v) for key in ("add", "remove") if isinstance(v := body.get(key), list))
        return count > self.settings.catalogue_async_items

    def accept(self, name: str | None, body: Any) -> tuple[Job, Delta]:
        """A large delta parsed and checked against the newest version (422 naming the field), not
        applied: a queued :class:`Job` (service/catalogue/jobs.py)."""
        delta = Delta.from_json(body)
        self._check_size(delta)
        model = self.registry.get(name)
        self.catalogue_of(model).check(delta, getattr(model.bundle, "content", None))
        return self.jobs.new(model.name, len(delta), model.catalogue_version), delta

    def start(self, job: Job, delta: Delta) -> None:
        """Run ``job`` on the catalogue thread after the jobs before it (from the event loop)."""
        task = asyncio.get_running_loop().create_task(self.run(self.complete, job, delta))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def complete(self, job: Job, delta: Delta) -> None:
        """Apply, publish and install an accepted delta; its job says how it ended."""
        job.state = "running"
        try:
            out = self._publish(job.model, delta)
        except DeltaError as exc:
            self.jobs.finish(job, "refused", error={"field": exc.field, "msg": exc.message})
        except ServiceError as exc:
            self.jobs.finish(job, "failed", error={"field": "body", "msg": str(exc)})
        except Exception as exc:
            log.exception("catalogue job %s failed", job.id)
            self.jobs.finish(job, "failed", error={"field": "body", "msg": f"{type(exc).__name__}: {exc}"})
        else:
            self.jobs.finish(job, "live", result=out)

    def _publish(self, key: str, delta: Delta) -> dict[str, Any]:
        """Apply ``delta`` to model ``key``'s newest version, write it as the next file, install it."""
        with self._lock(key):
            while True:
                model, _ = self._sync_locked(key)
                store = self.store(model)
                if store.sequences(model.catalogue_seq):
                    continue  # a file arrived since the catch-up (one not taken): take it, again
                cat = self.catalogue_of(model)
                after, report = _trial(cat, delta, getattr(model.bundle, "content", None))
                seq = model.catalogue_seq + 1
                published = delta.with_vectors(after.item_emb[list(report.dense_ids)])  # no tower on replicas
                try:
                    store.claim(seq, model.fingerprint, after.version, published, report.placement)
                except SequenceTaken:
                    continue
                except OSError as exc:
                    raise CatalogueStoreFailed(
                        f"cannot write to {store.where}: {exc.strerror or exc} "
                        "(GENRET_CATALOGUE_DIR: a writable volume every replica mounts; or GENRET_CATALOGUE_REDIS_URL)"
                    ) from None
                self._prepared[key, seq] = Prepared(cat, after, report)
                try:
                    model, reports = self._sync_locked(key)
                finally:
                    self._prepared.pop((key, seq), None)
                done = reports.get(seq)
                if done is None:  # quarantined although applied before: every replica skips it alike
                    raise DeltaError("body", f"the delta was written as file {seq} but did not apply")
                return {
                    "model": key,
                    "version": done.version,
                    "added": done.added,
                    "removed": done.removed,
                    "new_leaves": done.new_leaves,
                    "joined_copies": done.joined_copies,
                    "over_capacity": done.over_capacity,
                }

    def _check_size(self, delta: Delta) -> None:
        most = self.settings.max_delta_items
        if len(delta) > most:
            loc = "add" if len(delta.add) >= len(delta.remove) else "remove"
            raise LimitExceeded(
                (loc,),
                f"{len(delta.add)} added + {len(delta.remove)} removed items exceed max_delta_items={most}",
            )


def _trial(cat: Catalogue, delta: Delta, content: Any) -> tuple[Catalogue, ApplyReport]:
    """``delta`` applied to ``cat`` before it is published: anything it raises is a 422, not a file."""
    try:
        return cat.apply(delta, content=content, pause=pace)
    except DeltaError:
        raise
    except Exception as exc:
        raise DeltaError(
            "body", f"does not apply to version {cat.version}: {type(exc).__name__}: {exc}"
        ) from None


def _stream_client(settings: Settings) -> redis.Redis:
    """The catalogue stream's own Redis connection; a Redis that could evict the stream is refused
    (:class:`service.catalogue.stream.UnsafeRedis`: start-up fails with one line). An unreachable one is
    not a reason to stop starting: the replica serves its version and reads the stream once it answers."""
    assert settings.catalogue_redis_url is not None  # the settings refuse catalogue_log=redis without it
    client = connect(
        settings.catalogue_redis_url.get_secret_value(), settings.catalogue_redis_timeout_ms / 1000
    )
    try:
        check_policy(client)
    except redis.RedisError as exc:
        log.error(
            "the catalogue stream's Redis does not answer (%s); its eviction policy is not checked", exc
        )
    return client
