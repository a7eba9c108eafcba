"""``genret bench serve``: the served generative path against brute-force top-K, same items, same service.

1. build (or reuse) a synthetic bundle of N items (``training.synthetic_bundle``);
2. for each mode (``generative``: beam search + rerank; ``bruteforce``: encode, then exact
   ``query @ item_emb.T`` top-K), start `genret serve` as a subprocess with the cache off;
3. drive it from a separate process — ``wrk`` with a Lua script sending random histories — at each
   concurrency for ``duration`` seconds, after a short warm-up;
4. print QPS and p50/p95/p99 per mode and concurrency, the QPS ratio, and the service's resident memory.

With ``shadow_rates`` (``--shadow 0,0.5,1``) it measures the shadow lane's cost instead: a second
bundle of the same size (seed + 1) is served next to the primary one (a directory of symlinks
``primary/`` and ``shadow/`` as ``GENRET_BUNDLE_PATH``), and for each rate > 0 an experiment file
copies that share of users' requests to ``shadow``. Per rate and concurrency it prints the primary's
QPS and latency, the p99 change against rate 0 at the same concurrency, and the shadow copies
completed and dropped (deltas of ``genret_shadow_*`` counters read from ``/metrics``).

Noise: one 8-second wrk run's p99 moves by ±10 % on a shared 2-core machine, as much as the effect
measured. So the shadow bench starts one service per rate up front and measures them interleaved:
``repeat`` rounds, each going over every concurrency and every rate (the rate order rotated per
round), and reports per rate and concurrency the median QPS / p50 / p99 over the rounds (with the
p99 range), the shadow counters summed; the rate-0 baseline is measured in the same rounds.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.launcher import ServiceProcess

WRK_SCRIPT = r"""
local ids = {%(ids)s}
local k, beam = %(k)d, %(beam)d
local counter = 0
init = function(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
end
request = function()
  counter = counter + 1
  local n = math.random(3, 20)
  local h = {}
  for i = 1, n do h[i] = '"' .. ids[math.random(#ids)] .. '"' end
  local body = '{"user_id":"u' .. math.random(1, 100000000) .. '","history":[' .. table.concat(h, ",") ..
    '],"k":' .. k .. ',"beam_size":' .. beam .. '}'
  return wrk.format("POST", "/v1/retrieve", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d,' ..
    '"p50_us":%%d,"p95_us":%%d,"p99_us":%%d,"max_us":%%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class BenchConfig:
    items: int
    levels: int
    branching: int  # 0 = ceil(items ** (1 / levels))
    dim: int
    concurrency: tuple[int, ...]
    duration_s: float
    k: int
    beam_size: int
    max_batch_size: int
    modes: tuple[str, ...]
    workdir: Path
    seed: int = 0
    threads: int = 1  # torch and ONNX Runtime intra-op threads of the served app (both modes alike)
    shadow_rates: tuple[float, ...] = ()  # non-empty: run the shadow experiment instead of the modes
    repeat: int = 1  # shadow bench: interleaved rounds over all rates; the table shows medians

    def __post_init__(self) -> None:
        if self.items < 2 or self.levels < 1 or self.dim < 1 or not self.concurrency:
            raise ValueError(f"invalid bench config: {self}")
        if any(c < 1 for c in self.concurrency) or self.duration_s <= 0:
            raise ValueError(f"concurrency levels must be >= 1 and duration > 0: {self}")
        if not set(self.modes) <= {"generative", "bruteforce"} or not self.modes:
            raise ValueError(f"modes must be among generative, bruteforce; got {self.modes}")
        if any(not 0.0 <= r <= 1.0 for r in self.shadow_rates):
            raise ValueError(f"shadow rates must be in [0, 1], got {self.shadow_rates}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {self.repeat}")

    @property
    def tree_branching(self) -> int:
        return self.branching or max(2, math.ceil(self.items ** (1.0 / self.levels) - 1e-9))


@dataclass(frozen=True)
class Measurement:
    mode: str
    concurrency: int
    qps: float  # 2xx answers per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx + socket errors + timeouts
    rss_mib: float


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


def build_bundle(cfg: BenchConfig) -> Path:
    from training.synthetic_bundle import make_synthetic_bundle

    out = cfg.workdir / f"bundle-n{cfg.items}-l{cfg.levels}-b{cfg.tree_branching}-d{cfg.dim}-s{cfg.seed}"
    if (out / "manifest.json").is_file():
        print(f"reusing bundle {out}", flush=True)
        return out
    if out.exists():
        shutil.rmtree(out)
    print(
        f"building synthetic bundle: {cfg.items} items, {cfg.levels} levels of {cfg.tree_branching} ...",
        flush=True,
    )
    return make_synthetic_bundle(out, cfg.items, cfg.tree_branching, cfg.levels, dim=cfg.dim, seed=cfg.seed)


def wrk_script(bundle: Path, cfg: BenchConfig, path: Path) -> Path:
    with np.load(bundle / "items.npz", allow_pickle=False) as data:
        item_ids = data["item_ids"]
    rng = np.random.default_rng(cfg.seed)
    sample = rng.choice(np.arange(1, len(item_ids)), size=min(5000, len(item_ids) - 1), replace=False)
    ids = ",".join(json.dumps(str(item_ids[i])) for i in sample)
    path.write_text(WRK_SCRIPT % {"ids": ids, "k": cfg.k, "beam": cfg.beam_size})
    return path


def run_wrk(url: str, script: Path, concurrency: int, duration_s: float) -> dict[str, Any]:
    cmd = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"{url}/v1/retrieve",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration_s + 60).stdout
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            return dict(json.loads(line[len("WRKJSON ") :]))
    raise RuntimeError(f"wrk printed no summary:\n{out}")


def service_env(cfg: BenchConfig, bundle_path: Path, mode: str) -> dict[str, str]:
    return {
        "GENRET_BUNDLE_PATH": str(bundle_path),
        "GENRET_SEARCH_MODE": mode,
        "GENRET_LOCAL_CACHE_ENTRIES": "0",  # every request computes: measure the search, not the cache
        "GENRET_MAX_BATCH_SIZE": str(cfg.max_batch_size),
        "GENRET_QUEUE_SIZE": "4096",
        "GENRET_DEFAULT_DEADLINE_MS": "10000",
        "GENRET_MAX_BEAM_SIZE": str(max(256, cfg.beam_size)),
        "GENRET_DEFAULT_BEAM_SIZE": str(cfg.beam_size),
        "GENRET_MAX_HISTORY_ITEMS": "100",
        "GENRET_TORCH_THREADS": str(cfg.threads),
        "GENRET_INTRA_OP_THREADS": str(cfg.threads),
    }


def measure_level(mode: str, service: ServiceProcess, script: Path, c: int, cfg: BenchConfig) -> Measurement:
    """One wrk run of ``cfg.duration_s`` at ``c`` connections against a started service."""
    raw = run_wrk(service.url, script, c, cfg.duration_s)
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    seconds = raw["duration_us"] / 1e6
    rss, _ = service.rss_bytes()
    return Measurement(
        mode=mode,
        concurrency=c,
        qps=(raw["requests"] - raw["status"]) / seconds,
        p50_ms=raw["p50_us"] / 1000,
        p95_ms=raw["p95_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        requests=raw["requests"],
        errors=errors,
        rss_mib=rss / 2**20,
    )


def measure_mode(mode: str, bundle: Path, script: Path, cfg: BenchConfig) -> list[Measurement]:
    env = service_env(cfg, bundle, mode)
    service = ServiceProcess(env, cfg.workdir / f"service-{mode}.log").start(ready_timeout_s=600)
    results = []
    try:
        run_wrk(service.url, script, 8, 2.0)  # warm-up
        for c in cfg.concurrency:
            m = measure_level(mode, service, script, c, cfg)
            print(
                f"  {mode:<10} c={c:<3} qps={m.qps:8.1f} p50={m.p50_ms:7.1f}ms p95={m.p95_ms:7.1f}ms "
                f"p99={m.p99_ms:7.1f}ms errors={m.errors} rss={m.rss_mib:.0f}MiB",
                flush=True,
            )
            results.append(m)
    finally:
        service.stop()
    return results


SHADOW_RUNS_METRIC = "genret_shadow_requests_total"
SHADOW_DROPPED_METRIC = "genret_shadow_dropped_total"
SHADOW_YIELDS_METRIC = "genret_shadow_yields_total"
SHADOW_DEPTH_METRIC = "genret_shadow_queue_depth"


def parse_labels(text: str) -> dict[str, str]:
    """``a="x",b="y"`` -> {a: x, b: y} (label values in these metrics hold no quotes or commas)."""
    out = {}
    for part in text.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip().strip('"')
    return out


def shadow_counters(metrics_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """From a Prometheus text page: shadow runs by result and shadow drops by reason (summed over labels)."""
    runs: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for line in metrics_text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels_text, _, value_text = rest.rpartition("}")
        labels = parse_labels(labels_text)
        value = int(float(value_text.strip().split()[0]))
        if name == SHADOW_RUNS_METRIC:
            result = labels.get("result", "?")
            runs[result] = runs.get(result, 0) + value
        elif name == SHADOW_DROPPED_METRIC:
            reason = labels.get("reason", "?")
            dropped[reason] = dropped.get(reason, 0) + value
    return runs, dropped


def shadow_yields(metrics_text: str) -> int:
    """``genret_shadow_yields_total`` summed over its labels (0 when absent)."""
    total = 0
    for line in metrics_text.splitlines():
        if line.startswith(SHADOW_YIELDS_METRIC + "{"):
            total += int(float(line.rpartition("}")[2].strip().split()[0]))
    return total


def shadow_queue_depth(metrics_text: str) -> int:
    """The ``genret_shadow_queue_depth`` gauge (0 when absent: no experiment)."""
    for line in metrics_text.splitlines():
        if line.startswith(SHADOW_DEPTH_METRIC + " "):
            return int(float(line.split()[1]))
    return 0


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


def format_table(results: list[Measurement]) -> str:
    lines = [
        "| mode | concurrency | QPS | p50 ms | p95 ms | p99 ms | requests | errors | RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        lines.append(
            f"| {m.mode} | {m.concurrency} | {m.qps:.1f} | {m.p50_ms:.1f} | {m.p95_ms:.1f} | {m.p99_ms:.1f} "
            f"| {m.requests} | {m.errors} | {m.rss_mib:.0f} |"
        )
    by = {(m.mode, m.concurrency): m for m in results}
    ratios = []
    for c in sorted({m.concurrency for m in results}):
        gen, bf = by.get(("generative", c)), by.get(("bruteforce", c))
        if gen and bf and bf.qps > 0:
            ratios.append(f"c={c}: {gen.qps / bf.qps:.2f}x")
    if ratios:
        lines.append("")
        lines.append("generative / brute-force QPS: " + ", ".join(ratios))
    return "\n".join(lines)


def run_bench(cfg: BenchConfig, as_json: bool = False) -> int:
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    if cfg.shadow_rates:
        return run_shadow_bench(cfg, as_json=as_json)
    bundle = build_bundle(cfg)
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = wrk_script(bundle, cfg, Path(tmp) / "retrieve.lua")
        for mode in cfg.modes:
            print(f"measuring {mode} ...", flush=True)
            results.extend(measure_mode(mode, bundle, script, cfg))
    print(
        f"\nbench serve: N={cfg.items} L={cfg.levels} branching={cfg.tree_branching} dim={cfg.dim} k={cfg.k} "
        f"beam={cfg.beam_size} batch<={cfg.max_batch_size} threads={cfg.threads} duration={cfg.duration_s}s "
        "(load: wrk, 1 thread, separate process)"
    )
    print(format_table(results))
    if as_json:
        print(
            json.dumps(
                {
                    "config": {**asdict(cfg), "workdir": str(cfg.workdir)},
                    "results": [asdict(m) for m in results],
                }
            )
        )
    return 0
