"""The GPU check's HTTP step: the real service (uvicorn, torch backend on ``--device``, the
in-process cache) on a synthetic bundle, under open-loop load from this machine's own CPU cores.

1. ``ceiling``: the generator processes against a trivial HTTP server at the highest rate (what
   the generator itself can send and time on this machine; rows above it measure the generator);
2. ``rates``: each rate of ``--rates`` for ``--duration`` seconds (achieved rate, p50, p99,
   errors; latency from each request's scheduled send, :mod:`benchmarks.load_multi`);
3. ``deltas``: at the first rate, p99 before, while ``--deltas`` deltas of ``--delta-items`` new
   items each go through ``POST /admin/items`` one after another, and after them (the catalogue
   version reached, each delta's wall time); graphs are recaptured per version before it serves
   (docs/live_catalogue.md), so after should match before;
4. the service's resident memory and, with ``nvidia-smi``, the GPU memory each worker holds.

``--workers N`` starts N service processes on the same device (one Python each, for when one
process's GIL is the limit), every generator process sending to one of them in turn
(:mod:`benchmarks.replicas`); they share the delta directory, so a delta posted to the first
reaches every one (docs/live_catalogue.md).

One JSON report, ``--json-out``, rewritten after every phase (a run cut off still reports). Run by
``scripts/gpu_check.py`` (step ``http``); ``--small`` is the CPU dry run's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks.catalogue import add_body
from benchmarks.load import retrieve_bodies, start_trivial_server
from benchmarks.load_multi import multi_open_loop
from benchmarks.replicas import Replicas

ADMIN_TOKEN = "gpu-check-admin-token"


def service_env(args: argparse.Namespace, bundle: Path, deltas: Path) -> dict[str, str]:
    return {
        "GENRET_BUNDLE_PATH": str(bundle),
        "GENRET_DEVICE": args.device,
        "GENRET_DECODER_BACKEND": "torch",
        "GENRET_CATALOGUE_DIR": str(deltas),
        "GENRET_ADMIN_TOKEN": ADMIN_TOKEN,
        "GENRET_MAX_ADMIN_BODY_BYTES": str(64 * 1_048_576),
        "GENRET_MAX_BATCH_SIZE": str(args.max_batch),
        "GENRET_QUEUE_SIZE": "16384",
        "GENRET_DEFAULT_DEADLINE_MS": "10000",
        "GENRET_DEFAULT_BEAM_SIZE": str(args.beam),
        "GENRET_MAX_BEAM_SIZE": str(max(256, args.beam)),
        "GENRET_MAX_CONNECTIONS": "8192",
        "GENRET_MAX_CONNECTIONS_PER_CLIENT": "8192",  # the generators are one address for many users
        "GENRET_MAX_INFLIGHT_PER_CLIENT": "100000",
        "GENRET_QUALITY_SAMPLE": "0",
        "GENRET_ENV": "test",
    }


def gpu_memory_mib(pid: int) -> float | None:
    """GPU memory the process holds (``nvidia-smi``), or None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return float(fields[1])
    return None


def loop_row(
    port: int | list[int], bodies: list[bytes], rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    stats = multi_open_loop("127.0.0.1", port, bodies, rate, args.duration, args.procs)
    row = {**asdict(stats), "valid": stats.valid}
    print(
        f"gpu_http: {rate:8.0f}/s offered: achieved {stats.achieved_qps:8.0f}/s p50 {stats.p50_ms:7.2f} ms "
        f"p99 {stats.p99_ms:7.2f} ms errors {stats.errors} ({'valid' if stats.valid else 'INVALID'})",
        flush=True,
    )
    return row


def ceiling(bodies: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    proc, port = start_trivial_server()
    try:
        return loop_row(port, bodies, max(args.rates), args)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def deltas_under_load(
    service: Replicas, bundle: Path, bodies: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    """p99 at the first rate during ``args.deltas`` adds (posted to the first worker), then after them."""
    admin_url = service.processes[0].admin_url
    rate = args.rates[0]
    adds: list[dict[str, Any]] = []

    def post_deltas() -> None:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        with httpx.Client(timeout=120.0) as client:
            for d in range(args.deltas):
                body = add_body(bundle, args.delta_items, seed=1000 + d)
                t = time.perf_counter()
                answer = client.post(f"{admin_url}/admin/items", content=body, headers=headers)
                took = time.perf_counter() - t
                adds.append(
                    {"status": answer.status_code, "seconds": round(took, 3), "answer": answer.json()}
                )

    writer = threading.Thread(target=post_deltas)
    writer.start()
    during = loop_row(service.ports, bodies, rate, args)
    writer.join()
    after = loop_row(service.ports, bodies, rate, args)
    models, converged_s = converged_models(service)
    return {
        "rate": rate,
        "during": during,
        "after": after,
        "adds": adds,
        "models": models,
        "workers_converged_s": converged_s,
    }


def converged_models(service: Replicas, timeout_s: float = 15.0) -> tuple[list[Any], float | None]:
    """Every worker's ``/v1/models`` once they serve the same catalogue version (the others apply the
    first worker's deltas at their next poll), and the seconds that took; None if they never did."""
    started = time.perf_counter()
    while True:
        models = [httpx.get(f"{p.url}/v1/models", timeout=10.0).json() for p in service.processes]
        if len({m["models"][0]["catalogue_version"] for m in models}) == 1:
            return models, round(time.perf_counter() - started, 3)
        if time.perf_counter() - started > timeout_s:
            return models, None
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--rates", default="2000,5000,10000", help="offered requests/s, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    p.add_argument("--deltas", type=int, default=10)
    p.add_argument("--delta-items", type=int, default=1000)
    p.add_argument("--procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    p.add_argument("--workers", type=int, default=1, help="service processes on the one device")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "genret_gpu_http")
    p.add_argument("--json-out", type=Path, required=True)
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    if not 1 <= args.workers <= args.procs:
        p.error(f"--workers must be between 1 and --procs ({args.procs}): a generator process each at least")
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "workers": args.workers}

    def save() -> None:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")

    from benchmarks.retrieve import build_bundle

    # the bundle `bench retrieve` builds (and the check's retrieve step already built) at this size
    spec = argparse.Namespace(workdir=args.workdir, backend="torch", dim=args.dim, seed=0)
    bundle, report["build_s"], report["bundle_reused"] = build_bundle(spec, args.items, args.levels)
    bodies = retrieve_bodies(bundle, 4000, k=10, beam_size=args.beam, seed=3, user_prefix="g", users=4000)
    report["ceiling"] = ceiling(bodies, args)
    save()
    deltas = Path(tempfile.mkdtemp(prefix="genret-http-deltas-"))
    env = service_env(args, bundle, deltas)
    log = args.json_out.with_suffix(".service.log")
    service = Replicas.alike(env, log, args.workers).start(ready_timeout_s=300)
    report["ready_s"] = service.ready_s
    try:
        report["rates"] = []
        for rate in args.rates:
            report["rates"].append(loop_row(service.ports, bodies, rate, args))
            save()
        report["deltas"] = {"before": report["rates"][0], **deltas_under_load(service, bundle, bodies, args)}
        # now and at peak, the largest worker's
        report["rss_mib"] = [round(x / 2**20) for x in service.rss_bytes()]
        report["gpu_memory_mib"] = [gpu_memory_mib(p.pid) for p in service.processes]  # per worker
        save()
    finally:
        report["exit_codes"] = [p.stop() for p in service.processes]
        report["exit_code"] = next((c for c in report["exit_codes"] if c), 0)
        save()
    d = report["deltas"]
    print(
        f"gpu_http: deltas at {d['rate']:.0f}/s: p99 before {d['before']['p99_ms']:.2f} ms, during "
        f"{d['during']['p99_ms']:.2f} ms, after {d['after']['p99_ms']:.2f} ms; "
        f"adds {[a['seconds'] for a in d['adds']]} s; RSS {report['rss_mib']} MiB, GPU {report['gpu_memory_mib']} MiB"
    )
    return 0 if all(a["status"] == 200 for a in d["adds"]) and d["workers_converged_s"] is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
