"""The GPU check's ``profile`` step: where one serving batch spends its time on the device.

Builds (or reuses, in the same work folder as ``bench retrieve``) the synthetic bundle, serves
``--batch`` requests per batch through the Retriever (eager, and with ``--cuda-graphs`` also
through CUDA graphs), and runs ``torch.profiler`` over ``--repeats`` batches of each. Prints, per
variant: the top 15 ops by self device time and by CPU time, kernel launches per batch, and host
synchronisations per batch (the profiler's ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize``
/ ``cudaMemcpy`` / ``cudaEventSynchronize`` calls). On ``cpu`` (the dry run) device columns are 0.
The last line of output is one JSON object with the counts (the check's report keeps it).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.retrieve import build_bundle, history_pool
from models.bundle.bundle import load_bundle
from models.search.retriever import Retriever

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
"""Runtime calls that block the host until the device catches up (``cudaMemcpy`` with pageable
host memory is synchronous; ``cudaMemcpyAsync`` counts among them, as it waits the same way there)."""
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


def table(prof: Any, key: str, device: bool) -> str:
    if device and not torch.cuda.is_available():
        return "(no device activity on cpu)"
    return str(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


def profile_variant(
    retriever: Retriever, batch: list[np.ndarray], args: argparse.Namespace
) -> dict[str, Any]:
    """Profile ``args.repeats`` retrieve calls; print the tables; return per-batch counts."""
    cuda = retriever.device.type == "cuda"
    for _ in range(3):  # warm: allocations, kernel choice, graph capture
        retriever.retrieve(batch, k=args.k, beam_size=args.beam)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.repeats):
            retriever.retrieve(batch, k=args.k, beam_size=args.beam)
    wall_ms = 1e3 * (time.perf_counter() - start) / args.repeats
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
    syncs = {e.key: e.count / args.repeats for e in events if any(e.key.startswith(s) for s in SYNC_CALLS)}
    device_kernels = sum(
        e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
    )
    print(
        f"-- top 15 by self device time (batch {len(batch)}):\n" + table(prof, "self_device_time_total", True)
    )
    print(f"-- top 15 by CPU time (batch {len(batch)}):\n" + table(prof, "cpu_time_total", False))
    sync_warnings = None
    if cuda:  # the same count another way: torch warns at every op that syncs the host
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            retriever.retrieve(batch, k=args.k, beam_size=args.beam)
        torch.cuda.set_sync_debug_mode(0)
        sync_warnings = len(caught)
        for w in caught[:8]:
            print(f"   sync: {str(w.message)[:160]} ({Path(w.filename).name}:{w.lineno})")
    return {
        "sync_debug_warnings_per_batch": sync_warnings,
        "batch": len(batch),
        "repeats": args.repeats,
        "wall_ms_per_batch_profiled": wall_ms,
        "launches_per_batch": launches / args.repeats,
        "device_ops_per_batch": device_kernels / args.repeats,
        "syncs_per_batch": syncs,
        "sync_calls_per_batch": sum(syncs.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/genret_gpu_check_bundles"))
    p.add_argument("--cuda-graphs", action="store_true", help="also profile the CUDA-graph path")
    args = p.parse_args(argv)
    args.backend = "torch"
    args.workdir.mkdir(parents=True, exist_ok=True)
    path, build_s, reused = build_bundle(args, args.items, args.levels)
    print(f"profile: bundle {path.name} ({'reused' if reused else f'built in {build_s:.1f} s'})", flush=True)
    bundle = load_bundle(path)
    pool = history_pool(args.items, args.history, args.batch, args.seed)
    report: dict[str, Any] = {"device": args.device, "items": args.items, "levels": args.levels}
    graphs = args.cuda_graphs and torch.device(args.device).type == "cuda"  # else the same eager path
    variants = [("eager", False)] + ([("cuda_graphs", True)] if graphs else [])
    for name, graphs in variants:
        retriever = Retriever(bundle, args.device, "torch", cuda_graphs=graphs)
        print(f"== {name} ==", flush=True)
        report[name] = profile_variant(retriever, pool, args)
        if retriever.graphs is not None:
            report[name]["graphs_disabled"] = retriever.graphs.disabled
        print(f"== {name}: {json.dumps(report[name])}", flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
