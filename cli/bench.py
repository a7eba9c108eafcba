"""``genret bench serve`` and ``genret bench soak``: the wiring; the benchmarks live in ``benchmarks/``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import benchmarks.soak
from benchmarks.soak import SoakConfig, run_soak
from cli.args import comma_list


def register(sub: Any, groups: dict[str, Any]) -> None:
    register_serve(groups["bench"])
    register_soak(groups["bench"])


def register_serve(group: Any) -> None:
    bench = group.add_parser(
        "serve",
        help="QPS and latency of the service vs brute-force top-K over the same items",
        description="Build a synthetic bundle of N items, serve it (uvicorn subprocess), drive it with wrk at "
        "each concurrency (closed loop), then at fixed fractions of the best error-free closed-loop QPS with "
        "requests sent at scheduled times (open loop); then the same against brute-force inner-product top-K "
        "served the same way.",
    )
    bench.add_argument("--items", type=int, default=1_000_000, help="catalogue size N")
    bench.add_argument("--levels", type=int, default=3, help="index depth L")
    bench.add_argument("--branching", type=int, default=0, help="children per node (0 = ceil(N^(1/L)))")
    bench.add_argument("--dim", type=int, default=64, help="model width")
    bench.add_argument("--concurrency", default="1,8,32,64", help="comma-separated open connections")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    bench.add_argument("--k", type=int, default=10, help="items per request")
    bench.add_argument("--beam-size", type=int, default=20, help="beam width of the generative path")
    bench.add_argument(
        "--max-batch-size", type=int, default=64, help="GENRET_MAX_BATCH_SIZE of the served app"
    )
    bench.add_argument("--modes", default="generative,bruteforce", help="which paths to measure")
    bench.add_argument("--workdir", type=Path, default=Path("runs/bench_serve"), help="bundle cache and logs")
    bench.add_argument(
        "--threads", type=int, default=1, help="torch / ONNX Runtime threads of the served app"
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--shadow",
        default="",
        help="comma-separated shadow sample rates, e.g. 0,0.5,1: measure the primary's latency with a "
        "same-size shadow bundle copied that share of requests (instead of the mode comparison)",
    )
    bench.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="shadow bench: rounds over all rates, interleaved in rotating order; the table gives medians",
    )
    bench.add_argument(
        "--open-loop",
        default="0.5,0.8,0.95",
        help="comma-separated fractions of the best error-free closed-loop QPS to offer open loop ('' = none)",
    )
    bench.add_argument(
        "--arrivals", choices=["fixed", "poisson"], default="fixed", help="open-loop send times"
    )
    bench.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="service processes per mode on this machine, the load split evenly over them as a "
        "Kubernetes Service spreads it over pods (benchmarks/replicas.py)",
    )
    bench.add_argument(
        "--ceiling",
        action="store_true",
        help="first measure the open-loop generator's own ceiling against a trivial HTTP server",
    )
    bench.add_argument("--json", action="store_true", help="print the results as JSON too")
    bench.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from benchmarks.serve import BenchConfig, run_bench

    config = BenchConfig(
        items=args.items,
        levels=args.levels,
        branching=args.branching,
        dim=args.dim,
        concurrency=comma_list(args.concurrency, int),
        duration_s=args.duration,
        k=args.k,
        beam_size=args.beam_size,
        max_batch_size=args.max_batch_size,
        modes=comma_list(args.modes, str),
        workdir=args.workdir,
        seed=args.seed,
        threads=args.threads,
        shadow_rates=comma_list(args.shadow, float),
        repeat=args.repeat,
        open_loop=comma_list(args.open_loop, float),
        arrivals=args.arrivals,
        replicas=args.replicas,
    )
    if config.shadow_rates:
        from benchmarks.shadow import run_shadow_bench

        return run_shadow_bench(config, as_json=args.json)
    return run_bench(config, as_json=args.json, ceiling=args.ceiling)


def register_soak(group: Any) -> None:
    soak_parser = group.add_parser(
        "soak",
        help="sustained load at a fraction of the measured maximum: RSS and p99 per window, stable or not",
        description=(benchmarks.soak.__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = SoakConfig()
    soak_parser.add_argument("--minutes", type=float, default=defaults.minutes, help="soak length")
    soak_parser.add_argument(
        "--rate-fraction", type=float, default=defaults.rate_fraction, help="share of the maximum QPS offered"
    )
    soak_parser.add_argument("--window-s", type=float, default=defaults.window_s, help="seconds per row")
    soak_parser.add_argument(
        "--warmup-s", type=float, default=defaults.warmup_s, help="rows before this are warm-up"
    )
    soak_parser.add_argument("--items", type=int, default=defaults.items, help="synthetic catalogue size")
    soak_parser.add_argument("--levels", type=int, default=defaults.levels, help="index depth")
    soak_parser.add_argument(
        "--probe-s", type=float, default=defaults.probe_s, help="seconds per closed-loop probe"
    )
    soak_parser.add_argument(
        "--concurrency",
        default=",".join(map(str, defaults.concurrency)),
        help="closed-loop probe connections",
    )
    soak_parser.add_argument(
        "--cache-entries",
        type=int,
        default=defaults.cache_entries,
        help="GENRET_LOCAL_CACHE_ENTRIES of the server",
    )
    soak_parser.add_argument("--threads", type=int, default=defaults.threads, help="torch / ORT threads")
    soak_parser.add_argument("--workdir", type=Path, default=defaults.workdir, help="bundle cache and log")
    soak_parser.add_argument("--json", action="store_true", help="print the rows and verdict as JSON too")
    soak_parser.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    cfg = SoakConfig(
        minutes=args.minutes,
        rate_fraction=args.rate_fraction,
        window_s=args.window_s,
        warmup_s=args.warmup_s,
        items=args.items,
        levels=args.levels,
        probe_s=args.probe_s,
        concurrency=comma_list(args.concurrency, int),
        cache_entries=args.cache_entries,
        threads=args.threads,
        workdir=args.workdir,
    )
    return run_soak(cfg, as_json=args.json)
