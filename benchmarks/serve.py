"""``genret bench serve``: the served generative path against brute-force top-K, same items, same service.

1. build (or reuse) a synthetic bundle of N items (``benchmarks.synthetic_bundle``);
2. for each mode (``generative``: beam search + rerank; ``bruteforce``: encode, then exact
   ``query @ item_emb.T`` top-K), start `genret serve` as a subprocess with the cache off
   (``replicas`` > 1: that many, the load split evenly over them, :mod:`benchmarks.replicas`);
3. the first :data:`FIRST_WINDOW_S` seconds after the service reports ready: closed-loop load at the
   first concurrency with no warm-up, its p99 set beside the steady state's (a rollout's new
   replica takes traffic at once), and the resident memory at ready, before any request;
4. closed loop: drive it from a separate process — ``wrk`` with a Lua script sending random
   histories — at each concurrency for ``duration`` seconds, after a short warm-up;
5. open loop (``open_loop`` fractions, default 0.5, 0.8, 0.95): the mode's maximum throughput is
   its best error-free closed-loop QPS of this run; requests are then sent at each fraction of it
   at scheduled times (:mod:`benchmarks.load`), latency timed from the scheduled send; a row
   whose achieved rate is under 98 % of its target is marked invalid;
6. print QPS and p50/p95/p99 per mode and concurrency, the QPS ratio, the start-up window, the
   open-loop rows and the service's resident memory.

With ``shadow_rates`` (``--shadow 0,0.5,1``) it measures the shadow lane's cost instead
(:mod:`benchmarks.shadow`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.launcher import ONE_CLIENT_LOAD, ServiceProcess
from benchmarks.load import Arrivals, OpenLoopStats, open_loop, retrieve_bodies, run_loop, send_times
from benchmarks.load_multi import MultiLoopStats, multi_open_loop
from benchmarks.replicas import Replicas
from benchmarks.serve_report import format_open_table, format_start_table, format_table
from benchmarks.serve_types import Measurement, OpenLoopMeasurement, StartMeasurement
from models.bundle.manifest import SCHEMA_VERSION

__all__ = ["BenchConfig", "Measurement", "OpenLoopMeasurement", "StartMeasurement", "run_bench"]

FIRST_WINDOW_S = 5.0
"""Seconds of load started at ready whose p99 is reported beside the steady state: a new replica
of a rollout takes traffic as soon as it reports ready."""

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
    open_loop: tuple[float, ...] = (0.5, 0.8, 0.95)  # fractions of the best error-free closed-loop QPS
    arrivals: Arrivals = "fixed"  # open-loop send times: evenly spaced or Poisson
    replicas: int = 1  # service processes per mode, the load split evenly (benchmarks/replicas.py)

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
        if not 1 <= self.replicas <= min(self.concurrency):
            raise ValueError(
                f"replicas must be >= 1 and at most the lowest concurrency (a connection each), got {self.replicas}"
            )
        if self.shadow_rates and self.replicas != 1:
            raise ValueError("the shadow bench runs one service process per rate: leave replicas at 1")
        if any(not 0.0 < f <= 2.0 for f in self.open_loop) or self.arrivals not in ("fixed", "poisson"):
            raise ValueError(
                f"open-loop fractions must be in (0, 2] and arrivals fixed|poisson, got {self.open_loop}, "
                f"{self.arrivals!r}"
            )

    @property
    def tree_branching(self) -> int:
        return self.branching or max(2, math.ceil(self.items ** (1.0 / self.levels) - 1e-9))


def build_bundle(cfg: BenchConfig) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = cfg.workdir / f"bundle-n{cfg.items}-l{cfg.levels}-b{cfg.tree_branching}-d{cfg.dim}-s{cfg.seed}"
    manifest = out / "manifest.json"
    if manifest.is_file():
        version = json.loads(manifest.read_text()).get("schema_version")
        if version == SCHEMA_VERSION:
            print(f"reusing bundle {out}", flush=True)
            return out
        print(f"rebuilding {out}: its schema_version {version} is not this build's {SCHEMA_VERSION}")
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
        **ONE_CLIENT_LOAD,
        "GENRET_TORCH_THREADS": str(cfg.threads),
        "GENRET_INTRA_OP_THREADS": str(cfg.threads),
    }


def measure_level(
    mode: str,
    service: ServiceProcess | Replicas,
    script: Path,
    c: int,
    cfg: BenchConfig,
    duration_s: float | None = None,
) -> Measurement:
    """One wrk run of ``duration_s`` (default ``cfg.duration_s``) at ``c`` connections in all against
    a started service or replicas (one wrk each, merged: :mod:`benchmarks.replicas`)."""
    replicas = service if isinstance(service, Replicas) else Replicas([service])
    raw = replicas.closed_loop(script, c, cfg.duration_s if duration_s is None else duration_s)
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


def measure_open(
    mode: str, service: Replicas, bodies: list[bytes], max_qps: float, cfg: BenchConfig
) -> list[OpenLoopMeasurement]:
    """One open-loop run of ``cfg.duration_s`` per fraction of ``max_qps``: one generator in this
    process for one replica, one generator process per replica for several."""
    rows = []
    for fraction in cfg.open_loop:
        stats: OpenLoopStats | MultiLoopStats
        if len(service.ports) == 1:
            offsets = send_times(fraction * max_qps, cfg.duration_s, cfg.arrivals, seed=cfg.seed)
            stats = run_loop(
                open_loop("127.0.0.1", service.ports[0], bodies, offsets, cfg.duration_s, timeout_s=10.0)
            )
        else:
            stats = multi_open_loop(
                "127.0.0.1",
                service.ports,
                bodies,
                fraction * max_qps,
                cfg.duration_s,
                len(service.ports),
                arrivals=cfg.arrivals,
                seed=cfg.seed,
            )
        row = OpenLoopMeasurement(
            mode=mode,
            fraction=fraction,
            max_qps=max_qps,
            target_qps=stats.target_qps,
            achieved_qps=stats.achieved_qps,
            p50_ms=stats.p50_ms,
            p99_ms=stats.p99_ms,
            errors=stats.errors,
            valid=stats.valid,
            arrivals=cfg.arrivals,
            requests=stats.sent,
            send_lag_p99_ms=stats.send_lag_p99_ms,
            connections=stats.connections,
        )
        print(
            f"  {mode:<10} open {fraction:.0%} of {max_qps:.0f}: target={row.target_qps:7.1f} "
            f"achieved={row.achieved_qps:7.1f} p50={row.p50_ms:7.1f}ms p99={row.p99_ms:7.1f}ms "
            f"errors={row.errors} valid={row.valid} lag_p99={row.send_lag_p99_ms:.1f}ms",
            flush=True,
        )
        rows.append(row)
    return rows


def max_throughput(rows: list[Measurement]) -> float | None:
    """The best closed-loop QPS among rows with no error (None when every row erred)."""
    clean = [m.qps for m in rows if m.errors == 0]
    return max(clean) if clean else None


def start_row(
    first: Measurement, rows: list[Measurement], service: Replicas, rss_ready: int
) -> StartMeasurement:
    """The first window's row, beside the steady-state row at the same concurrency."""
    steady = [m.p99_ms for m in rows if m.concurrency == first.concurrency]
    row = StartMeasurement(
        mode=first.mode,
        concurrency=first.concurrency,
        ready_s=service.ready_s,
        window_s=FIRST_WINDOW_S,
        first_qps=first.qps,
        first_p50_ms=first.p50_ms,
        first_p99_ms=first.p99_ms,
        errors=first.errors,
        steady_p99_ms=steady[0] if steady else None,
        rss_ready_mib=rss_ready / 2**20,
        rss_peak_mib=service.rss_bytes()[1] / 2**20,
    )
    print(
        f"  {row.mode:<10} first {FIRST_WINDOW_S:.0f} s after ready (c={row.concurrency}): "
        f"p99={row.first_p99_ms:7.1f}ms steady p99={row.steady_p99_ms}ms rss at ready={row.rss_ready_mib:.0f}MiB "
        f"peak={row.rss_peak_mib:.0f}MiB",
        flush=True,
    )
    return row


def measure_mode(
    mode: str, bundle: Path, script: Path, bodies: list[bytes], cfg: BenchConfig
) -> tuple[list[Measurement], list[OpenLoopMeasurement], StartMeasurement]:
    """The first window after ready, then closed loop per concurrency, then open loop."""
    log = cfg.workdir / f"service-{mode}.log"
    service = Replicas.alike(service_env(cfg, bundle, mode), log, cfg.replicas).start(ready_timeout_s=600)
    results = []
    try:
        rss_ready, _ = service.rss_bytes()
        first = measure_level(mode, service, script, cfg.concurrency[0], cfg, FIRST_WINDOW_S)  # no warm-up
        service.closed_loop(script, max(8, cfg.replicas), 2.0)  # warm-up
        for c in cfg.concurrency:
            m = measure_level(mode, service, script, c, cfg)
            print(
                f"  {mode:<10} c={c:<3} qps={m.qps:8.1f} p50={m.p50_ms:7.1f}ms p95={m.p95_ms:7.1f}ms "
                f"p99={m.p99_ms:7.1f}ms errors={m.errors} rss={m.rss_mib:.0f}MiB",
                flush=True,
            )
            results.append(m)
        best = max_throughput(results)
        if cfg.open_loop and best is None:
            print(f"  {mode}: no error-free closed-loop row, so no open-loop rows", flush=True)
        opened = measure_open(mode, service, bodies, best, cfg) if cfg.open_loop and best else []
        start = start_row(first, results, service, rss_ready)
    finally:
        service.stop()
    return results, opened, start


def generator_ceiling() -> list[dict[str, Any]]:
    """The open-loop generator against a trivial server (:func:`benchmarks.load.measure_ceiling`)."""
    from benchmarks.load import measure_ceiling

    print("measuring the open-loop generator's ceiling against a trivial server ...", flush=True)
    rows = [{**asdict(r), "valid": r.valid} for r in measure_ceiling()]
    for r in rows:
        print(
            f"  target={r['target_qps']:8.0f} achieved={r['achieved_qps']:8.0f} p99={r['p99_ms']:6.1f}ms "
            f"lag_p99={r['send_lag_p99_ms']:.1f}ms valid={r['valid']}",
            flush=True,
        )
    return rows


def wrk_ready(cfg: BenchConfig) -> bool:
    """wrk is installed (else says so on stderr) and the work directory exists."""
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk, or run `make bench`)", file=sys.stderr)
        return False
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    return True


def run_bench(cfg: BenchConfig, as_json: bool = False, ceiling: bool = False) -> int:
    """The mode comparison: closed loop per concurrency, then open loop (``--shadow``: :mod:`benchmarks.shadow`)."""
    if not wrk_ready(cfg):
        return 2
    generator = generator_ceiling() if ceiling else []
    bundle = build_bundle(cfg)
    bodies = retrieve_bodies(
        bundle, 2000, k=cfg.k, beam_size=cfg.beam_size, seed=cfg.seed + 7, user_prefix="o", users=2000
    )
    results: list[Measurement] = []
    opened: list[OpenLoopMeasurement] = []
    starts: list[StartMeasurement] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = wrk_script(bundle, cfg, Path(tmp) / "retrieve.lua")
        for mode in cfg.modes:
            print(f"measuring {mode} ...", flush=True)
            closed, open_rows, start = measure_mode(mode, bundle, script, bodies, cfg)
            results.extend(closed)
            opened.extend(open_rows)
            starts.append(start)
    print(
        f"\nbench serve: N={cfg.items} L={cfg.levels} branching={cfg.tree_branching} dim={cfg.dim} k={cfg.k} "
        f"beam={cfg.beam_size} batch<={cfg.max_batch_size} threads={cfg.threads} replicas={cfg.replicas} "
        f"duration={cfg.duration_s}s "
        "(closed loop: wrk, 1 thread, separate process; open loop: benchmarks.load, "
        f"{cfg.arrivals} arrivals, latency from the scheduled send)"
    )
    print(format_table(results))
    print()
    print(format_start_table(starts))
    if opened:
        print()
        print(format_open_table(opened))
    if as_json:
        payload = {
            "config": {**asdict(cfg), "workdir": str(cfg.workdir)},
            "results": [asdict(m) for m in results]
            + [asdict(r) for r in opened]
            + [asdict(r) for r in starts],
        }
        if generator:
            payload["generator_ceiling"] = generator
        print(json.dumps(payload))
    return 0
