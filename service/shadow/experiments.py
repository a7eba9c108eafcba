"""A/B variants and shadow bundles: which bundle answers a user, which bundles get a copy.

The experiment is a YAML file (``GENRET_EXPERIMENTS_FILE``)::

    name: uri-vs-seater            # label in logs and reports
    salt: genret-ab-2026-11        # a new salt is a new random split
    variants:                      # weights are normalised to sum to 1
      - {name: control, bundle: uri-beauty-v3, weight: 0.9}
      - {name: treatment, bundle: seater-beauty-v1, weight: 0.1}
    shadows:                       # a sampled copy of requests runs here too, never returned
      - {bundle: tdr-beauty-v1, sample_rate: 0.05}

Assignment is a salted hash of the user key (``user_id``, else a hash of the history) mapped onto
the cumulative weights, so it is sticky across requests, processes and replicas, and needs no
shared state. Shadow sampling uses a second, independent salted hash per shadow bundle.

Layers, each usable alone: :class:`ExperimentConfig` (the file, validated: :mod:`service.shadow.experiment_config`),
:class:`ExperimentRouter` (pure assignment), :class:`ExperimentFile` (reload on change, keep the
last good config on a bad edit), :class:`ExperimentHooks` (what the engine calls: ``assign`` on the
request path, ``maybe_shadow`` after each primary answer; it feeds a
:class:`service.shadow.lane.ShadowLane`). :func:`router_from_settings` builds the hooks from :class:`service.settings.Settings`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from service.engine.request_map import user_key
from service.metrics import REGISTRY
from service.settings import Settings
from service.shadow.agreement import Ranked, ShadowJob
from service.shadow.experiment_config import ExperimentConfig, ExperimentConfigError, ShadowTarget, Variant
from service.shadow.lane import ShadowConfig, ShadowLane
from service.shadow.log import ShadowLog

if TYPE_CHECKING:
    from service.engine.results import Retrieval
    from service.schemas import RetrieveRequest

__all__ = [
    "ExperimentConfig",
    "ExperimentConfigError",
    "ExperimentFile",
    "ExperimentHooks",
    "ExperimentRouter",
    "ShadowTarget",
    "Variant",
    "ranked_from_result",
    "router_from_settings",
    "unit_hash",
    "user_key",
]

log = logging.getLogger(__name__)

EXPERIMENT_RELOADS = Counter(
    "genret_experiment_reloads_total",
    "Experiment file (re)loads by result (ok, error); on error the last good config stays.",
    ["result"],
    registry=REGISTRY,
)


# ---- hashing -----------------------------------------------------------------------------------


def unit_hash(salt: str, *parts: str) -> float:
    """A uniform number in [0, 1) from blake2b(salt, parts): same inputs, same number, everywhere."""
    h = hashlib.blake2b(digest_size=8, key=salt.encode()[:64])
    for part in parts:
        h.update(part.encode())
        h.update(b"\x1f")  # unit separator: ("ab", "c") and ("a", "bc") differ
    return int.from_bytes(h.digest(), "big") / 2.0**64


class ExperimentRouter:
    """Pure assignment for one :class:`ExperimentConfig` (no I/O, no clock)."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        total = sum(v.weight for v in config.variants)
        acc = 0.0
        self._cumulative: list[float] = []
        for v in config.variants:
            acc += v.weight / total
            self._cumulative.append(acc)
        self._cumulative[-1] = 1.0  # no gap from rounding
        self._bundle_of = {v.name: v.bundle for v in config.variants}

    def assign(self, user_key: str) -> str:
        """The variant name of ``user_key`` (sticky: a function of salt and key only)."""
        u = unit_hash(self.config.salt, "variant", user_key)
        for variant, edge in zip(self.config.variants, self._cumulative, strict=True):
            if u < edge:
                return variant.name
        return self.config.variants[-1].name

    def bundle_of(self, variant: str) -> str:
        """The bundle serving ``variant`` (KeyError for an unknown variant name)."""
        return self._bundle_of[variant]

    def shadow_targets(self, user_key: str) -> list[str]:
        """Shadow bundles that get a copy of this key's request (independent hash per bundle)."""
        return [
            s.bundle
            for s in self.config.shadows
            if unit_hash(self.config.salt, "shadow", s.bundle, user_key) < s.sample_rate
        ]


class ExperimentFile:
    """An :class:`ExperimentRouter` for a file that may change: re-read when its mtime or size changes.

    Checks at most every ``check_interval_s`` (one ``stat``). A bad edit is logged, counted in
    ``genret_experiment_reloads_total{result="error"}``, and the last good config keeps serving.
    The first load must succeed (raises :class:`ExperimentConfigError`).
    """

    def __init__(
        self, path: str | Path, check_interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if check_interval_s < 0:
            raise ValueError(f"check_interval_s must be >= 0, got {check_interval_s}")
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._stamp = self._stat()
        self._router = ExperimentRouter(ExperimentConfig.load(self.path))
        EXPERIMENT_RELOADS.labels(result="ok").inc()
        self._next_check = clock() + check_interval_s

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def router(self) -> ExperimentRouter:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.check_interval_s
            self.reload_if_changed()
        return self._router

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; True when a new config is now serving."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            config = ExperimentConfig.load(self.path)
        except ExperimentConfigError as exc:
            EXPERIMENT_RELOADS.labels(result="error").inc()
            log.error("experiment reload refused, keeping %r: %s", self._router.config.name, exc)
            return False
        self._router = ExperimentRouter(config)
        EXPERIMENT_RELOADS.labels(result="ok").inc()
        log.info("experiment %r loaded from %s (salt %r)", config.name, self.path, config.salt)
        return True


# ---- what the engine calls ---------------------------------------------------------------------


class ExperimentHooks:
    """The engine's view of the experiment: ``assign`` + ``bundle_of`` per request, ``maybe_shadow`` after.

    ``start_lane(run_shadow, primary_idle)`` must be called once inside the running event loop, after
    the engine exists (``service.app.wire_experiment``); until then ``maybe_shadow`` drops copies
    (``reason="unbound"``). ``aclose()`` on shutdown stops the lane and flushes the log.
    ``run_shadow`` gets a request copy aimed at the shadow bundle (``model`` set) and returns the
    shadow's :class:`Ranked` result; ``primary_idle()`` says when the primary batcher has nothing to do.
    """

    def __init__(
        self, source: ExperimentFile, shadow_config: ShadowConfig, shadow_log: ShadowLog | None
    ) -> None:
        self.source = source
        self.shadow_config = shadow_config
        self.shadow_log = shadow_log
        self.lane: ShadowLane[Any] | None = None
        self._seq = 0

    # request path
    def assign(self, user_key: str) -> str:
        return self.source.router().assign(user_key)

    def bundle_of(self, variant: str) -> str:
        return self.source.router().bundle_of(variant)

    def shadow_targets(self, user_key: str) -> list[str]:
        return self.source.router().shadow_targets(user_key)

    # lifecycle
    def start_lane(
        self, run_shadow: Callable[[Any], Awaitable[Ranked]], primary_idle: Callable[[], bool]
    ) -> None:
        """Start the shadow lane: copies run through ``run_shadow`` and start only while
        ``primary_idle()`` (the service passes :meth:`service.engine.engine.Engine.run_shadow`)."""
        self.lane = ShadowLane(run_shadow, self.shadow_config, self.shadow_log, primary_idle=primary_idle)
        self.lane.start()

    async def aclose(self, timeout_s: float = 1.0) -> None:
        if self.lane is not None:
            await self.lane.stop(timeout_s)
        if self.shadow_log is not None:
            self.shadow_log.close()

    # after each primary answer (sync, cheap, never raises into the engine)
    def maybe_shadow(self, request: RetrieveRequest, result: Retrieval) -> int:
        """Offer a copy of ``request`` to each sampled shadow bundle; returns how many were queued.

        Skipped: requests that named a model themselves (explicit choice, and every shadow copy),
        and popular-item fallbacks (no model ran). ``result`` is the engine's primary answer (only
        read; the request copy is made with ``model_copy``).
        """
        if request.model is not None or result.fallback is not None:
            return 0
        key = user_key(request.user_id, request.history)
        router = self.source.router()
        targets = [b for b in router.shadow_targets(key) if b != result.model.name]
        if not targets:
            return 0
        primary = ranked_from_result(result, result.latency_s)
        queued = 0
        for bundle in targets:
            if self.lane is not None and self.lane.full:  # past capacity: shed before copying anything
                ShadowLane.count_drop("queue_full")
                continue
            self._seq += 1
            job = ShadowJob(
                request=request.model_copy(update={"model": bundle, "debug": False}),
                primary=primary,
                shadow_bundle=bundle,
                variant=result.variant,
                experiment=router.config.name,
                request_id=f"{os.getpid()}-{self._seq}",
                user_hash=user_key_hash(key),
                k=len(primary.items) or int(request.k or 0),
            )
            if self.lane is None:
                ShadowLane.count_drop("unbound")
                continue
            queued += self.lane.offer(job)
        return queued


def ranked_from_result(result: Retrieval, latency_s: float) -> Ranked:
    """An engine answer as the shadow lane compares it (item ids in rank order, model identity)."""
    return Ranked(
        items=result.items, bundle=result.model.name, version=result.model.version, latency_s=latency_s
    )


def user_key_hash(key: str) -> str:
    """A short, non-reversible id of a user key for logs (no raw user ids in the shadow log)."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def router_from_settings(settings: Settings) -> ExperimentHooks | None:
    """The experiment hooks configured by ``settings``, or None without an experiment file.

    Reads ``experiments_file`` (YAML above; None = no experiment), ``experiments_check_s`` (reload
    check period), ``shadow_log`` (JSONL path; None = metrics only) rotated at
    ``shadow_log_max_bytes`` keeping ``shadow_log_backups`` files, and the shadow lane's
    ``shadow_queue_size``, ``shadow_timeout_s`` and ``shadow_max_age_s`` (a copy waiting longer for
    spare capacity is dropped). Each is a ``GENRET_*`` variable of :class:`service.settings.Settings`.
    """
    path = settings.experiments_file
    if path is None:
        return None
    config = ShadowConfig(
        queue_size=settings.shadow_queue_size,
        timeout_s=settings.shadow_timeout_s,
        max_age_s=settings.shadow_max_age_s,
    )
    log_path = settings.shadow_log
    shadow_log = (
        ShadowLog(log_path, max_bytes=settings.shadow_log_max_bytes, backups=settings.shadow_log_backups)
        if log_path is not None
        else None
    )
    hooks = ExperimentHooks(
        ExperimentFile(path, check_interval_s=settings.experiments_check_s), config, shadow_log
    )
    cfg = hooks.source.router().config
    log.info(
        "experiment %r: variants %s, shadows %s, log %s",
        cfg.name,
        {v.name: (v.bundle, v.weight) for v in cfg.variants},
        {s.bundle: s.sample_rate for s in cfg.shadows},
        log_path or "-",
    )
    return hooks
