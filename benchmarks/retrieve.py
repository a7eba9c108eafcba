"""``genret bench retrieve``: in-process serving speed of the Retriever on a device, no HTTP.

For each catalogue size (``--sizes 1000000:3,10000000:4`` = items:levels) a synthetic bundle is
built (torch files only unless ``--backend onnx``: no ONNX export, vectorised numpy), loaded and
verified, served by a :class:`models.search.retriever.Retriever` on ``--device``, then measured twice:

* **max throughput**: ``retrieve`` (encode + beam search + rerank, results copied to the host)
  on back-to-back batches of each ``--batches`` size; requests/s = batch / median batch time.
* **open loop**: ``--rate`` requests/s with Poisson arrival times fixed in advance, formed into
  batches the way the service's batcher does (a batch starts when ``--max-batch`` requests wait or
  the oldest has waited ``--max-wait-ms``, and only after the previous batch finished); a
  request's latency runs from its scheduled arrival to the end of its batch, so queueing counts.
  The row is ``valid`` only if the achieved rate is at least 98% of the offered one
  (:data:`MIN_ACHIEVED_SHARE`) and every request was served: serving stops ``--duration`` seconds
  after the last arrival, so an overloaded device reports in bounded time.

The report (JSON) is rewritten to ``--json-out`` after every phase, so a run cut off by a time
limit still reports what it measured. GPU timings include the device-to-host copy of the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.synthetic_bundle import make_synthetic_bundle
from models.bundle.bundle import load_bundle
from models.bundle.manifest import BundleError
from models.search.retriever import Retriever

MIN_ACHIEVED_SHARE = 0.98
"""An open-loop row counts only if completions kept up with at least this share of the offered rate
(the schedule's own rate: requests / last arrival; achieved: requests / last completion)."""


def compare_with_eager(
    retriever: Retriever, batches: Sequence[Sequence[np.ndarray]], k: int, beam_size: int
) -> dict[str, float | int]:
    """:meth:`Retriever.retrieve` (graphs where enabled) against the eager ``search(encode(...))``
    of the same retriever: rows with equal items, the largest score gap (a GPU check's report;
    exact score ties may order differently, so they are counted rather than failed)."""
    rows = same = 0
    gap = 0.0
    for histories in batches:
        got = retriever.retrieve(histories, k=k, beam_size=beam_size)
        want = retriever.search(retriever.encode(histories), k=k, beam_size=beam_size)
        rows += len(histories)
        same += int((got.items == want.items).all(axis=1).sum())
        finite = np.isfinite(want.scores)
        gap = max(gap, float(np.abs(got.scores[finite] - want.scores[finite]).max(initial=0.0)))
    return {"rows": rows, "same_items_rows": same, "max_abs_score_diff": gap}


def device_report(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def write_report(report: dict[str, Any], path: Path | None) -> None:
    """Rewrite the report atomically (a reader never sees half a file)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def build_bundle(args: argparse.Namespace, items: int, levels: int) -> tuple[Path, float, bool]:
    """The synthetic bundle for one size (reused when a verified one with the same config exists);
    returns (path, build seconds, reused)."""
    branching = max(2, math.ceil(items ** (1.0 / levels)))
    while branching**levels < items:  # float roots can land one short
        branching += 1
    backends = ("torch",) if args.backend == "torch" else ("onnx",)
    path = args.workdir / f"synthetic-{items}-L{levels}-k{branching}-d{args.dim}-{args.backend}"
    want = {"num_items": items, "branching": branching, "levels": levels, "dim": args.dim, "seed": args.seed}
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if {k: manifest["config"].get(k) for k in want} == want and args.backend in manifest.get(
            "backends", ["onnx"]
        ):
            return path, 0.0, True
    except (OSError, ValueError, KeyError):
        pass
    start = time.perf_counter()
    make_synthetic_bundle(path, items, branching, levels, dim=args.dim, seed=args.seed, backends=backends)
    return path, time.perf_counter() - start, False


def history_pool(num_items: int, length: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` random histories of ``length`` dense ids (requests cycle through them)."""
    rng = np.random.default_rng(seed)
    return list(rng.integers(1, num_items + 1, size=(count, length), dtype=np.int64))


def stage_times(
    retriever: Retriever, histories: list[np.ndarray], args: argparse.Namespace
) -> dict[str, float]:
    """Median ms of encode and of search + rerank for one batch (device synchronised), 5 runs each."""
    device = retriever.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    encode, search = [], []
    for _ in range(5):
        start = time.perf_counter()
        states = retriever.encode(histories)
        sync()
        encode.append(time.perf_counter() - start)
        start = time.perf_counter()
        retriever.search(states, k=args.k, beam_size=args.beam)  # results land on the host
        search.append(time.perf_counter() - start)
    return {"encode_ms_p50": 1e3 * float(np.median(encode)), "search_ms_p50": 1e3 * float(np.median(search))}


def measure_throughput(
    retriever: Retriever, pool: list[np.ndarray], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Back-to-back batches of each size: median batch time, requests/s, and the encode / search split."""
    rows = []
    for batch in args.batches:
        histories = [pool[i % len(pool)] for i in range(batch)]
        retriever.retrieve(histories, k=args.k, beam_size=args.beam)  # warm this shape
        times: list[float] = []
        deadline = time.perf_counter() + args.throughput_seconds
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
            start = time.perf_counter()
            retriever.retrieve(histories, k=args.k, beam_size=args.beam)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        rows.append(
            {
                "batch": batch,
                "batches_run": len(times),
                "ms_per_batch_p50": 1e3 * median,
                "ms_per_batch_max": 1e3 * max(times),
                "requests_per_s": batch / median,
                **stage_times(retriever, histories, args),
            }
        )
    return rows


def serve_schedule(
    retriever: Retriever, pool: list[np.ndarray], arrivals: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """Serve requests arriving at ``arrivals`` (seconds) one batch at a time, as the service's batcher
    does; stops at the first batch boundary past ``args.duration`` seconds after the last arrival
    (an overloaded device would otherwise run for minutes). Latency runs from arrival to batch end."""
    n = len(arrivals)
    latency = np.full(n, np.nan)  # [n] seconds, NaN = not served before the stop
    sizes: list[int] = []
    compute: list[float] = []  # seconds per batch
    max_wait, stop = args.max_wait_ms / 1e3, arrivals[-1] + args.duration
    t0 = time.perf_counter() + 0.05
    last_done, i = 0.0, 0
    while i < n and last_done < stop:
        now = time.perf_counter() - t0
        if arrivals[i] > now:  # idle until the next request arrives
            time.sleep(arrivals[i] - now)
            continue
        full_at = arrivals[min(i + args.max_batch - 1, n - 1)]  # the arrival that fills the batch
        start = min(arrivals[i] + max_wait, full_at)
        if start > now:
            time.sleep(start - now)
            now = time.perf_counter() - t0
        j = min(int(np.searchsorted(arrivals, now, side="right")), i + args.max_batch, n)
        began = time.perf_counter()
        retriever.retrieve([pool[r % len(pool)] for r in range(i, j)], k=args.k, beam_size=args.beam)
        last_done = time.perf_counter() - t0
        compute.append(time.perf_counter() - began)
        latency[i:j] = last_done - arrivals[i:j]
        sizes.append(j - i)
        i = j
    return {"latency": latency, "sizes": sizes, "compute": compute, "served": i, "last_done": last_done}


def open_loop(retriever: Retriever, pool: list[np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """Poisson arrivals at ``args.rate``/s served by one batcher (max size / max wait): latency from arrival."""
    n = max(1, int(args.rate * args.duration))
    rng = np.random.default_rng(args.seed + 1)
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, size=n))  # [n] seconds after t0
    for size in range(1, args.max_batch + 1):  # every batch shape the batcher can form, once
        retriever.retrieve([pool[i % len(pool)] for i in range(size)], k=args.k, beam_size=args.beam)
    gc.collect()
    gc.freeze()  # as the service does after start: no collection pauses over long-lived objects
    run = serve_schedule(retriever, pool, arrivals, args)
    gc.unfreeze()
    served, sizes, compute = run["served"], run["sizes"], run["compute"]
    offered = n / arrivals[-1]  # the drawn schedule's own rate (Poisson: near args.rate)
    achieved = served / max(run["last_done"], arrivals[-1])
    ms = 1e3 * run["latency"][:served]  # p50/p99 over the served requests; unserved ones void the row
    return {
        "rate_per_s": args.rate,
        "offered_per_s": offered,
        "requests": n,
        "unserved": n - served,
        "achieved_per_s": achieved,
        "valid": bool(served == n and achieved >= MIN_ACHIEVED_SHARE * offered),
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "batches": len(sizes),
        "batch_size_mean": float(np.mean(sizes)),
        "batch_size_max": int(max(sizes)),
        "compute_ms_mean": 1e3 * float(np.mean(compute)),
        "compute_ms_p99": 1e3 * float(np.percentile(compute, 99)),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def open_loop_grid(
    retriever: Retriever, pool: list[np.ndarray], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """:func:`open_loop` at each ``--open-loop-grid`` (max batch, max wait) pair: the batch-formation
    wait is part of the latency, so p99 depends on both."""
    return [
        open_loop(retriever, pool, argparse.Namespace(**{**vars(args), "max_batch": b, "max_wait_ms": w}))
        for b, w in args.open_loop_grid
    ]


def run_size(args: argparse.Namespace, items: int, levels: int, row: dict[str, Any], save: Any) -> None:
    """Fill ``row`` phase by phase for one catalogue size, calling ``save()`` after each phase."""
    path, row["build_s"], row["bundle_reused"] = build_bundle(args, items, levels)
    save()
    start = time.perf_counter()
    bundle = load_bundle(path)
    row["load_s"] = time.perf_counter() - start
    row["branching"] = bundle.manifest.branching
    start = time.perf_counter()
    retriever = Retriever(bundle, args.device, args.backend, cuda_graphs=args.cuda_graphs)
    retriever.warmup(beam_size=args.beam)
    row["retriever_s"] = time.perf_counter() - start
    row["device_info"] = retriever.device_info
    save()
    pool = history_pool(items, args.history, 4096, args.seed)
    if retriever.graphs is not None:
        batches = [[pool[(i * 7) % len(pool)] for i in range(n)] for n in (1, 7, 64)]
        row["graph_parity"] = compare_with_eager(retriever, batches, args.k, args.beam)
    row["throughput"] = measure_throughput(retriever, pool, args)
    row["max_requests_per_s"] = max(r["requests_per_s"] for r in row["throughput"])
    save()
    row["open_loop"] = open_loop(retriever, pool, args)
    save()
    row["open_loop_grid"] = open_loop_grid(retriever, pool, args)
    row["cuda_graphs"] = retriever.graphs is not None and retriever.graphs.disabled is None
    if retriever.graphs is not None:
        row["cuda_graphs_captured"] = len(retriever.graphs.graphs)
        row["cuda_graphs_disabled"] = retriever.graphs.disabled
    if torch.device(args.device).type == "cuda":
        row["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    save()


def cmd_retrieve(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench retrieve: --device cuda but torch.cuda.is_available() is False")
    args.workdir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "json_out", "workdir", "json")}
    report: dict[str, Any] = {
        "status": "running",
        "host": device_report(device),
        "settings": {**settings, "sizes": [f"{n}:{lv}" for n, lv in args.sizes]},
        "sizes": [],
    }

    def save() -> None:
        write_report(report, args.json_out)

    for items, levels in args.sizes:
        row: dict[str, Any] = {"items": items, "levels": levels}
        report["sizes"].append(row)
        try:
            run_size(args, items, levels, row, save)
        except (BundleError, RuntimeError, ValueError, MemoryError) as exc:  # report, go on to the next size
            row["error"] = f"{type(exc).__name__}: {exc}"
            save()
    report["status"] = "done"
    save()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if any("error" in r for r in report["sizes"]) else 0


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"bench retrieve on {report['host']['device']} ({report['host'].get('gpu', 'cpu')}), backend {s['backend']}, "
        f"beam {s['beam']}, k {s['k']}, history {s['history']}; open loop {s['rate']}/s for {s['duration']} s, "
        f"max batch {s['max_batch']}, max wait {s['max_wait_ms']} ms"
    ]
    for r in report["sizes"]:
        if "error" in r:
            lines.append(f"{r['items']:>10} items L={r['levels']}: ERROR {r['error']}")
            continue
        tp = "  ".join(f"b{t['batch']}:{t['requests_per_s']:.0f}/s" for t in r.get("throughput", []))
        ol = r.get("open_loop", {})
        lines.append(
            f"{r['items']:>10} items L={r['levels']}: build {r.get('build_s', 0):.1f}s load {r.get('load_s', 0):.1f}s  "
            f"max {r.get('max_requests_per_s', 0):.0f} req/s ({tp})  open loop p50 {ol.get('p50_ms', 0):.2f} ms "
            f"p99 {ol.get('p99_ms', 0):.2f} ms, mean batch {ol.get('batch_size_mean', 0):.1f}, "
            f"achieved {ol.get('achieved_per_s', 0):.0f}/s {'valid' if ol.get('valid') else 'INVALID'}"
        )
        for g in r.get("open_loop_grid", []):
            lines.append(
                f"{'':>12}open loop max batch {g['max_batch']}, wait {g['max_wait_ms']} ms: p50 {g['p50_ms']:.2f} "
                f"ms p99 {g['p99_ms']:.2f} ms, mean batch {g['batch_size_mean']:.1f}, "
                f"{'valid' if g['valid'] else 'INVALID'}"
            )
    return "\n".join(lines)
