"""``genret bench serve --shadow``: the primary's latency with a shadow bundle copied a share of requests.

A second bundle of the same size (seed + 1) is served next to the primary one (a directory of
symlinks ``primary/`` and ``shadow/`` as ``GENRET_BUNDLE_PATH``), and for each rate > 0 an
experiment file copies that share of users' requests to ``shadow``. Per rate and concurrency it
prints the primary's QPS and latency, the p99 change against rate 0 at the same concurrency, and
the shadow copies completed and dropped (deltas of ``genret_shadow_*`` counters read from
``/metrics``, parsed with ``prometheus_client.parser``).

Noise: one 8-second wrk run's p99 moves by ±10 % on a shared 2-core machine, as much as the effect
measured. So the shadow bench starts one service per rate up front and measures them interleaved:
``repeat`` rounds, each going over every concurrency and every rate (the rate order rotated per
round), and reports per rate and concurrency the median QPS / p50 / p99 over the rounds (with the
p99 range), the shadow counters summed; the rate-0 baseline is measured in the same rounds.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.launcher import ServiceProcess
from benchmarks.serve import (
    BenchConfig,
    build_bundle,
    measure_level,
    service_env,
    wrk_ready,
    wrk_script,
)
from benchmarks.wrk import run_wrk


@dataclass(frozen=True)
class ShadowMeasurement:
    rate: float  # shadow sample_rate (0 = no experiment file)
    concurrency: int
    qps: float  # primary 2xx answers per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    errors: int
    rss_mib: float
    shadow_runs: dict[str, int] = field(default_factory=dict)  # result (ok, error, timeout) -> count
    shadow_dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    p99_change_pct: float | None = None  # vs rate 0 at the same concurrency
    shadow_yields: int = 0  # times a running copy paused between stages for primary work
    rounds: int = 1  # measurements this row is the median of
    p99_min_ms: float | None = None  # range of p99 over the rounds
    p99_max_ms: float | None = None


SHADOW_RUNS_METRIC = "genret_shadow_requests_total"
SHADOW_DROPPED_METRIC = "genret_shadow_dropped_total"
SHADOW_YIELDS_METRIC = "genret_shadow_yields_total"
SHADOW_DEPTH_METRIC = "genret_shadow_queue_depth"


def metric_samples(metrics_text: str) -> list[tuple[str, dict[str, str], float]]:
    """A Prometheus text page -> ``(sample name, labels, value)`` for every sample
    (``prometheus_client.parser``; counters keep their ``_total`` sample name)."""
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
    ]


def _sum_by(samples: list[tuple[str, dict[str, str], float]], name: str, label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for sample, labels, value in samples:
        if sample == name:
            key = labels.get(label, "?")
            out[key] = out.get(key, 0) + int(value)
    return out


def shadow_counters(metrics_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """From a Prometheus text page: shadow runs by result and shadow drops by reason (summed over labels)."""
    samples = metric_samples(metrics_text)
    return _sum_by(samples, SHADOW_RUNS_METRIC, "result"), _sum_by(samples, SHADOW_DROPPED_METRIC, "reason")


def shadow_yields(metrics_text: str) -> int:
    """``genret_shadow_yields_total`` summed over its labels (0 when absent)."""
    return sum(int(v) for name, _, v in metric_samples(metrics_text) if name == SHADOW_YIELDS_METRIC)


def shadow_queue_depth(metrics_text: str) -> int:
    """The ``genret_shadow_queue_depth`` gauge (0 when absent: no experiment)."""
    return sum(int(v) for name, _, v in metric_samples(metrics_text) if name == SHADOW_DEPTH_METRIC)


def wait_shadow_drained(url: str, timeout_s: float) -> None:
    """Wait until the service's shadow lane has no copy left queued (checked twice, 0.1 s apart),
    so that its backlog does not run during the next measurement (of another service)."""
    deadline = time.monotonic() + timeout_s
    empty_checks = 0
    while empty_checks < 2 and time.monotonic() < deadline:
        response = httpx.get(f"{url}/metrics", timeout=10.0)
        response.raise_for_status()
        empty_checks = empty_checks + 1 if shadow_queue_depth(response.text) == 0 else 0
        time.sleep(0.1)


@dataclass(frozen=True)
class ShadowCounters:
    runs: dict[str, int]
    dropped: dict[str, int]
    yields: int


def read_shadow_counters(url: str) -> ShadowCounters:
    response = httpx.get(f"{url}/metrics", timeout=10.0)
    response.raise_for_status()
    runs, dropped = shadow_counters(response.text)
    return ShadowCounters(runs, dropped, shadow_yields(response.text))


def counter_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def shadow_root(workdir: Path, primary: Path, shadow: Path) -> Path:
    """A bundle directory serving ``primary`` and ``shadow`` under those names (symlinks)."""
    root = workdir / f"shadow-root-{primary.name}"
    root.mkdir(parents=True, exist_ok=True)
    for name, target in (("primary", primary), ("shadow", shadow)):
        link = root / name
        if link.is_symlink() or link.exists():
            if link.resolve() == target.resolve():
                continue
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    return root


def experiment_yaml(rate: float) -> str:
    return (
        f"name: bench-shadow-{rate:g}\n"
        "salt: genret-bench-shadow\n"
        "variants:\n"
        "  - {name: default, bundle: primary, weight: 1}\n"
        "shadows:\n"
        f"  - {{bundle: shadow, sample_rate: {rate!r}}}\n"
    )


def start_shadow_service(rate: float, root: Path, cfg: BenchConfig) -> ServiceProcess:
    """The primary + shadow bundles served with ``rate`` of users' requests shadowed (0: no experiment)."""
    env = service_env(cfg, root, "generative")
    env["GENRET_DEFAULT_MODEL"] = "primary"
    env["GENRET_EXPERIMENTS_FILE"] = ""  # rate 0: no experiment, whatever the caller's environment says
    if rate > 0:
        path = cfg.workdir / f"experiment-shadow-{rate:g}.yaml"
        path.write_text(experiment_yaml(rate))
        env["GENRET_EXPERIMENTS_FILE"] = str(path)
    return ServiceProcess(env, cfg.workdir / f"service-shadow-{rate:g}.log").start(ready_timeout_s=600)


def measure_shadow_once(
    rate: float, service: ServiceProcess, script: Path, c: int, cfg: BenchConfig
) -> ShadowMeasurement:
    """One wrk run at ``c`` connections; shadow counters as deltas over that run."""
    before = read_shadow_counters(service.url)
    m = measure_level("generative", service, script, c, cfg)
    after = read_shadow_counters(service.url)
    return ShadowMeasurement(
        rate=rate,
        concurrency=c,
        qps=m.qps,
        p50_ms=m.p50_ms,
        p95_ms=m.p95_ms,
        p99_ms=m.p99_ms,
        requests=m.requests,
        errors=m.errors,
        rss_mib=m.rss_mib,
        shadow_runs=counter_delta(after.runs, before.runs),
        shadow_dropped=counter_delta(after.dropped, before.dropped),
        shadow_yields=after.yields - before.yields,
        p99_min_ms=m.p99_ms,
        p99_max_ms=m.p99_ms,
    )


def _sum_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for key, value in c.items():
            out[key] = out.get(key, 0) + value
    return dict(sorted(out.items()))


def median_row(rows: list[ShadowMeasurement]) -> ShadowMeasurement:
    """Rounds of one (rate, concurrency) -> one row: median QPS and latencies, p99 range, summed counts."""
    if not rows or len({(r.rate, r.concurrency) for r in rows}) != 1:
        raise ValueError("median_row needs measurements of one rate and concurrency")
    p99s = [r.p99_ms for r in rows]
    return ShadowMeasurement(
        rate=rows[0].rate,
        concurrency=rows[0].concurrency,
        qps=float(np.median([r.qps for r in rows])),
        p50_ms=float(np.median([r.p50_ms for r in rows])),
        p95_ms=float(np.median([r.p95_ms for r in rows])),
        p99_ms=float(np.median(p99s)),
        requests=sum(r.requests for r in rows),
        errors=sum(r.errors for r in rows),
        rss_mib=max(r.rss_mib for r in rows),
        shadow_runs=_sum_counts([r.shadow_runs for r in rows]),
        shadow_dropped=_sum_counts([r.shadow_dropped for r in rows]),
        shadow_yields=sum(r.shadow_yields for r in rows),
        rounds=len(rows),
        p99_min_ms=min(p99s),
        p99_max_ms=max(p99s),
    )


def interleaved_order(rates: tuple[float, ...], round_index: int) -> list[float]:
    """The rates in round ``round_index``: rotated by one each round, so no rate always goes first."""
    shift = round_index % len(rates)
    return list(rates[shift:] + rates[:shift])


def measure_shadow_rates(root: Path, script: Path, cfg: BenchConfig) -> list[ShadowMeasurement]:
    """Every rate's service up at once; ``cfg.repeat`` interleaved rounds; median rows per (rate, c)."""
    services: dict[float, ServiceProcess] = {}
    raw: dict[tuple[float, int], list[ShadowMeasurement]] = {}
    try:
        for rate in cfg.shadow_rates:
            print(f"starting the service for shadow rate {rate:g} ...", flush=True)
            services[rate] = start_shadow_service(rate, root, cfg)
            run_wrk(services[rate].url, script, 8, 2.0)  # warm-up (both bundles when shadowing)
        for r in range(cfg.repeat):
            for c in cfg.concurrency:
                for rate in interleaved_order(cfg.shadow_rates, r):
                    sm = measure_shadow_once(rate, services[rate], script, c, cfg)
                    print(
                        f"  round {r + 1}/{cfg.repeat} shadow={rate:<4g} c={c:<3} qps={sm.qps:8.1f} "
                        f"p50={sm.p50_ms:7.1f}ms p99={sm.p99_ms:7.1f}ms errors={sm.errors} "
                        f"shadow_runs={sm.shadow_runs} dropped={sm.shadow_dropped} yields={sm.shadow_yields}",
                        flush=True,
                    )
                    raw.setdefault((rate, c), []).append(sm)
                    if rate > 0:  # queued copies are run (or go stale) in the lull after the load
                        wait_shadow_drained(services[rate].url, timeout_s=30.0)
    finally:
        for service in services.values():
            service.stop()
    return [median_row(raw[(rate, c)]) for rate in cfg.shadow_rates for c in cfg.concurrency]


def with_p99_change(results: list[ShadowMeasurement]) -> list[ShadowMeasurement]:
    """Fill ``p99_change_pct`` against the rate-0 row at the same concurrency (None without one)."""
    base = {m.concurrency: m.p99_ms for m in results if m.rate == 0}
    out = []
    for m in results:
        b = base.get(m.concurrency)
        change = None if not b else 100.0 * (m.p99_ms - b) / b
        out.append(replace(m, p99_change_pct=change))
    return out


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items()) or "0"


def format_shadow_table(results: list[ShadowMeasurement]) -> str:
    lines = [
        "| shadow rate | concurrency | primary QPS | p50 ms | p99 ms | p99 vs rate 0 | shadow completed "
        "| shadow error/timeout | shadow dropped | primary errors | shadow yields | rounds | p99 range ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|",
    ]
    for m in results:
        change = "-" if m.p99_change_pct is None else f"{m.p99_change_pct:+.1f}%"
        failed = {k: v for k, v in m.shadow_runs.items() if k != "ok"}
        spread = (
            "-" if m.p99_min_ms is None or m.p99_max_ms is None else f"{m.p99_min_ms:.1f}-{m.p99_max_ms:.1f}"
        )
        lines.append(
            f"| {m.rate:g} | {m.concurrency} | {m.qps:.1f} | {m.p50_ms:.1f} | {m.p99_ms:.1f} | {change} "
            f"| {m.shadow_runs.get('ok', 0)} | {_counts(failed)} | {_counts(m.shadow_dropped)} | {m.errors} "
            f"| {m.shadow_yields} | {m.rounds} | {spread} |"
        )
    return "\n".join(lines)


def run_shadow_bench(cfg: BenchConfig, as_json: bool = False) -> int:
    if not wrk_ready(cfg):
        return 2
    primary = build_bundle(cfg)
    shadow = build_bundle(replace(cfg, seed=cfg.seed + 1))
    root = shadow_root(cfg.workdir, primary, shadow)
    with tempfile.TemporaryDirectory() as tmp:
        script = wrk_script(primary, cfg, Path(tmp) / "retrieve.lua")
        results = with_p99_change(measure_shadow_rates(root, script, cfg))
    print(
        f"\nbench serve --shadow: N={cfg.items} L={cfg.levels} branching={cfg.tree_branching} dim={cfg.dim} "
        f"k={cfg.k} beam={cfg.beam_size} batch<={cfg.max_batch_size} threads={cfg.threads} "
        f"duration={cfg.duration_s}s x {cfg.repeat} interleaved rounds, medians (primary and shadow "
        "bundles of the same size; load: wrk, 1 thread)"
    )
    print(format_shadow_table(results))
    if as_json:
        print(
            json.dumps(
                {
                    "config": {**asdict(cfg), "workdir": str(cfg.workdir)},
                    "shadow_results": [asdict(m) for m in results],
                }
            )
        )
    return 0
