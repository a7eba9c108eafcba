"""``genret bench soak``: is the service stable under sustained load? (a benchmark, not a test)

1. build (or reuse) a synthetic bundle and start `genret serve` on it (a real uvicorn process);
2. probe: closed loop (each connection sends its next request when the previous answer arrives)
   at a few concurrencies for a few seconds each; the best error-free throughput is the maximum;
3. soak: offer ``rate_fraction`` of that maximum open loop (sends at fixed scheduled times,
   latency from the scheduled time: :mod:`benchmarks.load`) for ``minutes``, one window of
   ``window_s`` after another; after each window sample the server's resident memory;
4. print a row per window and the verdict. **Stable** = from the first window that starts at or
   after ``warmup_s`` (minute 2) to the last one, RSS grows at most 5 % and p99 stays within 1.2x.

Every request carries a fresh random history (a cache miss: the model path runs every time); the
in-process LRU is kept small (``cache_entries``) so that it is full within the warm-up and its
growth is not mistaken for a leak.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.launcher import ONE_CLIENT_LOAD, ServiceProcess
from benchmarks.load import (
    Connection,
    OpenLoopStats,
    open_loop,
    retrieve_bodies,
    run_loop,
    send_times,
)

MAX_RSS_GROWTH = 0.05
MAX_P99_RATIO = 1.2


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 10.0
    rate_fraction: float = 0.5
    window_s: float = 60.0
    warmup_s: float = 60.0
    items: int = 100_000
    levels: int = 3
    dim: int = 64
    k: int = 10
    beam_size: int = 20
    concurrency: tuple[int, ...] = (4, 16, 64)
    probe_s: float = 8.0
    cache_entries: int = 1000
    threads: int = 1
    workdir: Path = Path("runs/bench_soak")
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.rate_fraction <= 1:
            raise ValueError(f"rate_fraction must be in (0, 1], got {self.rate_fraction}")
        if self.minutes * 60 < self.window_s or self.window_s <= 0:
            raise ValueError(f"need 0 < window_s={self.window_s} <= minutes*60={self.minutes * 60}")


@dataclass(frozen=True)
class Window:
    start_s: float  # from the start of the soak
    stats: OpenLoopStats
    rss_mib: float  # the server's VmRSS after the window


def build_bundle(cfg: SoakConfig) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    branching = int(np.ceil(cfg.items ** (1.0 / cfg.levels)))
    out = cfg.workdir / f"bundle-{cfg.items}-{cfg.levels}-{cfg.dim}-{cfg.seed}"
    if (out / "manifest.json").exists():
        return out
    print(f"building synthetic bundle: {cfg.items} items, {cfg.levels} levels of {branching} ...", flush=True)
    return make_synthetic_bundle(out, cfg.items, branching, cfg.levels, dim=cfg.dim, seed=cfg.seed)


def service_env(cfg: SoakConfig, bundle: Path) -> dict[str, str]:
    return {
        "GENRET_BUNDLE_PATH": str(bundle),
        "GENRET_LOCAL_CACHE_ENTRIES": str(cfg.cache_entries),
        "GENRET_QUEUE_SIZE": "4096",
        "GENRET_DEFAULT_DEADLINE_MS": "10000",
        "GENRET_MAX_HISTORY_ITEMS": "100",
        **ONE_CLIENT_LOAD,
        "GENRET_TORCH_THREADS": str(cfg.threads),
        "GENRET_INTRA_OP_THREADS": str(cfg.threads),
    }


async def closed_loop(port: int, bodies: list[bytes], concurrency: int, duration_s: float) -> tuple[int, int]:
    """``concurrency`` connections, each sending its next request on the previous answer -> (ok, errors)."""
    counts = {"ok": 0, "errors": 0}
    stop = time.perf_counter() + duration_s

    async def worker(offset: int) -> None:
        conn = await Connection.open("127.0.0.1", port)
        i = offset
        try:
            while time.perf_counter() < stop:
                status, keep = await conn.exchange(bodies[i % len(bodies)])
                counts["ok" if 200 <= status < 300 else "errors"] += 1
                i += concurrency
                if not keep:
                    conn.close()
                    conn = await Connection.open("127.0.0.1", port)
        finally:
            conn.close()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return counts["ok"], counts["errors"]


def probe_max_qps(port: int, bodies: list[bytes], cfg: SoakConfig) -> tuple[float, list[dict[str, Any]]]:
    """The best error-free closed-loop throughput over ``cfg.concurrency``, and every probe row."""
    rows = []
    for c in cfg.concurrency:
        ok, errors = run_loop(closed_loop(port, bodies, c, cfg.probe_s))
        rows.append({"concurrency": c, "qps": ok / cfg.probe_s, "errors": errors})
        print(f"probe: concurrency {c:>3}: {ok / cfg.probe_s:8.1f} req/s, {errors} errors", flush=True)
    clean = [r["qps"] for r in rows if r["errors"] == 0]
    if not clean:
        raise RuntimeError(f"every closed-loop probe had errors: {rows}")
    return max(clean), rows


def soak(service: ServiceProcess, bodies: list[bytes], rate: float, cfg: SoakConfig) -> list[Window]:
    windows = []
    count = round(cfg.minutes * 60 / cfg.window_s)
    offsets = send_times(rate, cfg.window_s, "fixed")
    for w in range(count):
        first = w * len(offsets)
        chunk = [bodies[(first + i) % len(bodies)] for i in range(len(offsets))]
        stats = run_loop(open_loop("127.0.0.1", service.port, chunk, offsets, cfg.window_s))
        rss, _ = service.rss_bytes()
        windows.append(Window(start_s=w * cfg.window_s, stats=stats, rss_mib=rss / 2**20))
        print(format_row(windows[-1]), flush=True)
    return windows


def verdict(windows: list[Window], warmup_s: float) -> dict[str, Any]:
    """RSS growth and p99 ratio from the first window after the warm-up to the last window."""
    after = [w for w in windows if w.start_s >= warmup_s]
    if len(after) < 2:
        return {"stable": None, "reason": f"needs two windows after the {warmup_s:g}s warm-up"}
    base, last = after[0], after[-1]
    growth = last.rss_mib / base.rss_mib - 1.0
    ratio = last.stats.p99_ms / base.stats.p99_ms
    valid = all(w.stats.valid for w in after)
    return {
        "stable": growth <= MAX_RSS_GROWTH and ratio <= MAX_P99_RATIO,
        "rss_growth": growth,
        "p99_ratio": ratio,
        "from_s": base.start_s,
        "to_s": last.start_s,
        "errors": sum(w.stats.errors for w in windows),
        "all_windows_valid": valid,
    }


HEADER = (
    f"{'window':>10} {'target/s':>9} {'sent/s':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8}"
)


def format_row(w: Window) -> str:
    s = w.stats
    mark = "" if s.valid else "  (generator fell behind)"
    return (
        f"{w.start_s:>9.0f}s {s.target_qps:9.1f} {s.achieved_qps:8.1f} {s.errors:6d} "
        f"{s.p50_ms:8.1f} {s.p99_ms:8.1f} {w.rss_mib:8.1f}{mark}"
    )


def format_verdict(v: dict[str, Any]) -> str:
    if v["stable"] is None:
        return f"stable: n/a ({v['reason']})"
    return (
        f"stable: {'yes' if v['stable'] else 'NO'} — RSS {v['rss_growth']:+.1%} (limit +{MAX_RSS_GROWTH:.0%}), "
        f"p99 x{v['p99_ratio']:.2f} (limit x{MAX_P99_RATIO}) from {v['from_s']:.0f}s to {v['to_s']:.0f}s; "
        f"{v['errors']} errors; every window at its target rate: {v['all_windows_valid']}"
    )


def run_soak(cfg: SoakConfig, as_json: bool = False) -> int:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(cfg)
    # a fresh random history per request (a cache miss) from 5000 users
    bodies = retrieve_bodies(
        bundle, 20_000, k=cfg.k, beam_size=cfg.beam_size, seed=cfg.seed + 11, user_prefix="s", users=5000
    )
    service = ServiceProcess(service_env(cfg, bundle), cfg.workdir / "service.log").start(ready_timeout_s=600)
    try:
        max_qps, probes = probe_max_qps(service.port, bodies, cfg)
        rate = cfg.rate_fraction * max_qps
        print(f"\nmax closed-loop {max_qps:.1f} req/s; soak at {rate:.1f} req/s for {cfg.minutes:g} min\n")
        print(HEADER, flush=True)
        windows = soak(service, bodies, rate, cfg)
    finally:
        code = service.stop()
    result = verdict(windows, cfg.warmup_s)
    print(f"\n{format_verdict(result)}\nservice exit code after SIGTERM: {code}")
    if as_json:
        rows = [{"start_s": w.start_s, "rss_mib": w.rss_mib, **asdict(w.stats)} for w in windows]
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        print(json.dumps({"config": config, "probes": probes, "windows": rows, "verdict": result}, indent=2))
    return 0 if result["stable"] is not False and code == 0 else 1
