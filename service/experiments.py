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

Layers, each usable alone: :class:`ExperimentConfig` (parsed, validated file),
:class:`ExperimentRouter` (pure assignment), :class:`ExperimentFile` (reload on change, keep the
last good config on a bad edit), :class:`ExperimentHooks` (what the engine calls: ``assign`` on the
request path, ``maybe_shadow`` after each primary answer; it feeds a
:class:`service.shadow.ShadowLane`). :func:`router_from_settings` builds the hooks from :class:`service.settings.Settings`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Counter

from service.metrics import REGISTRY
from service.settings import Settings
from service.shadow import Ranked, ShadowConfig, ShadowJob, ShadowLane, ShadowLog

log = logging.getLogger(__name__)

EXPERIMENT_RELOADS = Counter(
    "genret_experiment_reloads_total",
    "Experiment file (re)loads by result (ok, error); on error the last good config stays.",
    ["result"],
    registry=REGISTRY,
)


class ExperimentConfigError(ValueError):
    """The experiment file is missing, unreadable or inconsistent; the message names the file and field."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source


@dataclass(frozen=True)
class Variant:
    name: str  # label (response `variant`, metrics, logs)
    bundle: str  # model name in the registry
    weight: float  # > 0; normalised over all variants


@dataclass(frozen=True)
class ShadowTarget:
    bundle: str  # model name in the registry
    sample_rate: float  # in (0, 1]: share of user keys whose requests are copied here


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    salt: str
    variants: tuple[Variant, ...]
    shadows: tuple[ShadowTarget, ...] = ()

    def __post_init__(self) -> None:
        src = f"experiment {self.name!r}"
        if not self.salt:
            raise ExperimentConfigError(src, "salt must be a non-empty string")
        if not self.variants:
            raise ExperimentConfigError(src, "needs at least one variant")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ExperimentConfigError(src, f"variant names must be unique, got {names}")
        for v in self.variants:
            if not (v.weight > 0 and math.isfinite(v.weight)):
                raise ExperimentConfigError(src, f"variant {v.name!r}: weight must be > 0, got {v.weight}")
        bundles = [s.bundle for s in self.shadows]
        if len(set(bundles)) != len(bundles):
            raise ExperimentConfigError(src, f"shadow bundles must be unique, got {bundles}")
        for s in self.shadows:
            if not 0.0 < s.sample_rate <= 1.0:
                raise ExperimentConfigError(
                    src, f"shadow {s.bundle!r}: sample_rate must be in (0, 1], got {s.sample_rate}"
                )

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ExperimentConfigError(str(path), f"cannot read: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ExperimentConfigError(str(path), f"not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<experiment>") -> ExperimentConfig:
        if not isinstance(data, Mapping):
            raise ExperimentConfigError(source, f"expected a mapping at the top, got {type(data).__name__}")
        unknown = set(data) - {"name", "salt", "variants", "shadows"}
        if unknown:
            raise ExperimentConfigError(
                source, f"unknown keys {sorted(unknown)} (name, salt, variants, shadows)"
            )
        variants_raw = data.get("variants")
        if not isinstance(variants_raw, list) or not variants_raw:
            raise ExperimentConfigError(source, "'variants' must be a non-empty list")
        shadows_raw = data.get("shadows") or []
        if not isinstance(shadows_raw, list):
            raise ExperimentConfigError(source, "'shadows' must be a list")
        variants = tuple(_variant(v, i, source) for i, v in enumerate(variants_raw))
        shadows = tuple(_shadow(s, i, source) for i, s in enumerate(shadows_raw))
        name = str(data.get("name") or Path(source).stem)
        salt = data.get("salt")
        if not isinstance(salt, str) or not salt:
            raise ExperimentConfigError(source, "'salt' must be a non-empty string")
        try:
            return cls(name=name, salt=salt, variants=variants, shadows=shadows)
        except ExperimentConfigError as exc:
            raise ExperimentConfigError(source, str(exc)) from None

    @classmethod
    def single(cls, bundle: str) -> ExperimentConfig:
        """No experiment: everyone on ``bundle``."""
        return cls(name="default", salt="default", variants=(Variant(bundle, bundle, 1.0),))

    @property
    def bundles(self) -> list[str]:
        """Every bundle the experiment needs loaded (variants, then shadows)."""
        out = [v.bundle for v in self.variants]
        return out + [s.bundle for s in self.shadows if s.bundle not in out]


def _variant(raw: Any, i: int, source: str) -> Variant:
    if not isinstance(raw, Mapping) or "bundle" not in raw:
        raise ExperimentConfigError(source, f"variants[{i}] must be a mapping with a 'bundle'")
    unknown = set(raw) - {"name", "bundle", "weight"}
    if unknown:
        raise ExperimentConfigError(source, f"variants[{i}]: unknown keys {sorted(unknown)}")
    try:
        weight = float(raw.get("weight", 1.0))
    except (TypeError, ValueError):
        raise ExperimentConfigError(
            source, f"variants[{i}].weight must be a number, got {raw['weight']!r}"
        ) from None
    bundle = str(raw["bundle"])
    return Variant(name=str(raw.get("name") or bundle), bundle=bundle, weight=weight)


def _shadow(raw: Any, i: int, source: str) -> ShadowTarget:
    if not isinstance(raw, Mapping) or "bundle" not in raw:
        raise ExperimentConfigError(source, f"shadows[{i}] must be a mapping with a 'bundle'")
    unknown = set(raw) - {"bundle", "sample_rate"}
    if unknown:
        raise ExperimentConfigError(source, f"shadows[{i}]: unknown keys {sorted(unknown)}")
    try:
        rate = float(raw.get("sample_rate", 1.0))
    except (TypeError, ValueError):
        raise ExperimentConfigError(
            source, f"shadows[{i}].sample_rate must be a number, got {raw['sample_rate']!r}"
        ) from None
    return ShadowTarget(bundle=str(raw["bundle"]), sample_rate=rate)


# ---- hashing -----------------------------------------------------------------------------------


def unit_hash(salt: str, *parts: str) -> float:
    """A uniform number in [0, 1) from blake2b(salt, parts): same inputs, same number, everywhere."""
    h = hashlib.blake2b(digest_size=8, key=salt.encode()[:64])
    for part in parts:
        h.update(part.encode())
        h.update(b"\x1f")  # unit separator: ("ab", "c") and ("a", "bc") differ
    return int.from_bytes(h.digest(), "big") / 2.0**64


def user_key(user_id: str | None, history: Sequence[str] = ()) -> str:
    """The assignment key: ``u:<user_id>``, else ``h:<hash of the history ids>`` (anonymous users)."""
    if user_id:
        return f"u:{user_id}"
    h = hashlib.blake2b(digest_size=12)
    for item in history:
        h.update(str(item).encode())
        h.update(b"\x1f")
    return f"h:{h.hexdigest()}"


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

    ``bind_engine(engine)`` (or the generic ``bind(run_shadow, primary_idle)``) must be called once
    inside the running event loop, after the engine exists; until then ``maybe_shadow`` drops
    copies (``reason="unbound"``). ``aclose()`` on shutdown stops the lane and flushes the log.
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
    def bind(self, run_shadow: Callable[[Any], Awaitable[Ranked]], primary_idle: Callable[[], bool]) -> None:
        self.lane = ShadowLane(run_shadow, self.shadow_config, self.shadow_log, primary_idle=primary_idle)
        self.lane.start()

    def bind_engine(self, engine: Any) -> None:
        """``bind`` to a ``service.engine.Engine``: copies run through ``engine.run_shadow`` (staged,
        each stage only while the primary batcher is idle) and start only while ``engine.idle``."""

        async def run_shadow(request: Any) -> Ranked:
            started = time.perf_counter()
            response = await engine.run_shadow(request)
            return ranked_from_response(response, time.perf_counter() - started)

        self.bind(run_shadow, primary_idle=lambda: bool(engine.idle))

    async def aclose(self, timeout_s: float = 1.0) -> None:
        if self.lane is not None:
            await self.lane.stop(timeout_s)
        if self.shadow_log is not None:
            self.shadow_log.close()

    # after each primary answer (sync, cheap, never raises into the engine)
    def maybe_shadow(self, request: Any, response: Any, timings: Mapping[str, float] | None = None) -> int:
        """Offer a copy of ``request`` to each sampled shadow bundle; returns how many were queued.

        Skipped: requests that named a model themselves (explicit choice, and every shadow copy),
        and popular-item fallbacks (no model ran). ``request`` / ``response`` are the service's
        ``RetrieveRequest`` / ``RetrieveResponse`` (only read; the copy is made with ``model_copy``).
        """
        if getattr(request, "model", None) is not None or getattr(response, "fallback", None) is not None:
            return 0
        key = user_key(request.user_id, request.history)
        router = self.source.router()
        targets = [b for b in router.shadow_targets(key) if b != response.model.name]
        if not targets:
            return 0
        total = (timings or {}).get("total")
        primary = ranked_from_response(response, float(total) if total is not None else float("nan"))
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
                variant=str(response.variant),
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


def ranked_from_response(response: Any, latency_s: float) -> Ranked:
    """A ``RetrieveResponse`` as the shadow lane compares it (item ids in rank order, model identity)."""
    return Ranked(
        items=tuple(item.id for item in response.items),
        bundle=response.model.name,
        version=response.model.version,
        latency_s=latency_s,
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
