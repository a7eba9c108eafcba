"""The GPU check's steps (run by scripts/gpu_check.sh, which sets PYTHONPATH and installs wheels).

Steps, each a subprocess with its own time limit inside one overall budget, so that one slow or
failing step never takes the others with it:

1. ``tests``: the device-parametrised tests (torch backend vs ONNX Runtime on the CPU, safetensors
   round trip, torch-only bundles, CUDA graphs vs eager, SASRec trained on the device) on ``cpu``
   and ``--device``, plus the import-graph test;
2. ``profile``: ``scripts/gpu_profile.py`` (torch.profiler over batches of 64 at 1M items, eager
   and CUDA graphs: top ops, kernel launches and host syncs per batch);
3. ``retrieve_1M`` / ``retrieve_1M_eager`` / ``retrieve_10M``: ``genret bench retrieve``
   (in-process Retriever: max throughput, open-loop p50/p99 at 2,000 requests/s, at 1M items also
   over a grid of batcher max batch / max wait) at 1M items (L=3), served through CUDA graphs
   (``--cuda-graphs``, with their parity against the eager path) and eagerly, and 10M items (L=4);
4. ``http``: ``scripts/gpu_http.py``: the real service (uvicorn, torch backend on the device, the
   in-process cache) on a 1M-item bundle under open-loop load from this machine's CPU cores at
   2,000, 5,000 and 10,000 requests/s (achieved, p50, p99, errors, the generator's own ceiling),
   then 10 deltas of 1,000 items under load (p99 before, during, after), RSS and GPU memory;
5. ``train``: ``scripts/gpu_train.py``: SASRec trained for a few epochs on the CPU (every core) and
   on the device through the trainers' device setting (``sasrec.device``): seconds per epoch each;
6. ``bench_search``: ``genret bench search --device D --json`` (last: the GPU goals come first).

``--small``: the same steps at sizes that run in well under a minute on a CPU (``make test`` runs
``--device cpu --small``). One JSON report, ``OUT/gpu_check.json``, is rewritten after every
step (a step being run is marked ``running``), so a run cut off from outside still reports; each
step's full output is in ``OUT/<step>.log``; ``bench retrieve`` also rewrites its own
``OUT/<step>.json`` after every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TAIL_CHARS = 3000
DEFAULT_FULL_WORKDIR = Path("/tmp/genret_gpu_check_bundles")
"""Full-size bundles (10M items: ~3 GB) stay out of --out, whose files travel back with the report."""
HOST_PROBE = (
    "import json, os, platform, torch; c = torch.cuda.is_available(); "
    "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
    "'cuda_available': c, 'cuda': torch.version.cuda, 'cpu_count': os.cpu_count(), "
    "'gpu': torch.cuda.get_device_name(0) if c else None}))"
)


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: float
    env: dict[str, str] = field(default_factory=dict)
    json_out: Path | None = None  # a report the step rewrites as it goes (merged even on timeout)


def steps_for(args: argparse.Namespace, py: str) -> list[Step]:
    out, dev = args.out, args.device
    cli = [py, "-m", "cli", "bench"]
    tests = [
        py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "tests/unit/models/test_torch_bundle.py", "tests/unit/test_gpu_imports.py",
        "tests/unit/training/test_sasrec_device.py",
        f"--junitxml={out / 'tests.xml'}",
    ]  # fmt: skip
    devices = "cpu" if dev == "cpu" else f"cpu,{dev}"
    if args.small:
        search = ["--sizes", "1000,4000", "--batch", "8", "--beam", "4", "--branching", "8", "--levels", "2"]
        search += ["--repeats", "1", "--schemes", "level", "--node-baseline-queries", "1"]
        retrieve = ["--batches", "8,32", "--throughput-seconds", "0.3", "--rate", "100", "--duration", "0.5"]
        retrieve += ["--max-batch", "16", "--dim", "32", "--threads", "1"]  # 1: no spinning on a shared CPU
        grid, eager = ["--open-loop-grid", "8:1"], ["--batches", "8"]
        profile = ["--items", "4000", "--levels", "3", "--dim", "32", "--batch", "16", "--repeats", "2"]
        # about a minute on an idle 2-core CPU; the limits leave room for a shared, busy one
        sizes = ("4000:3", "30000:4")
        http = ["--items", "3000", "--levels", "2", "--dim", "16", "--rates", "20,40,80", "--duration", "1.5"]
        http += ["--deltas", "3", "--delta-items", "20", "--procs", "2", "--max-batch", "16", "--beam", "4"]
        http += ["--workers", "2"]  # the dry run also checks that a delta reaches every worker
        train = ["--users", "600", "--items", "200", "--epochs", "2", "--dim", "16", "--cpu-threads", "1"]
        limits = {
            "tests": 240.0,
            "profile": 120.0,
            "1M": 120.0,
            "http": 180.0,
            "eager": 120.0,
            "10M": 120.0,
            "train": 120.0,
            "search": 120.0,
        }
    else:
        search, retrieve, profile = [], [], []
        train = ["--users", "10000", "--items", "5000", "--epochs", "2"]
        grid, eager = ["--open-loop-grid", "16:1,64:1,64:2,256:2"], ["--batches", "1,64,256"]
        http = ["--duration", "5"]  # 1M items, 2,000/5,000/10,000 per s, 10 deltas of 1,000 items
        # 10M: building + verifying a 3 GB bundle is CPU and disk work (~1 min expected), then serving
        sizes = ("1000000:3", "10000000:4")
        limits = {
            "tests": 100.0,
            "profile": 60.0,
            "1M": 150.0,
            "http": 150.0,
            "eager": 60.0,
            "10M": 240.0,
            "train": 60.0,
            "search": 90.0,
        }
    work = str(args.workdir or (args.out / "bundles" if args.small else DEFAULT_FULL_WORKDIR))
    steps = [Step("tests", tests, limits["tests"], env={"GENRET_TEST_DEVICES": devices})]
    # where a batch's time goes: top ops, kernel launches and host syncs per batch (1M items, batch 64)
    profile = [py, "scripts/gpu_profile.py", "--device", dev, "--workdir", work, "--cuda-graphs", *profile]
    steps.append(Step("profile", profile, limits["profile"]))
    # the GPU goals first, bench search last; served through CUDA graphs (the eager path falls back
    # by itself if a capture fails), with the eager path measured beside them at 1M items
    runs: tuple[tuple[str, str, list[str]], ...] = (
        (sizes[0], "1M", ["--cuda-graphs", *grid]),
        (sizes[0], "1M_eager", eager),
        (sizes[1], "10M", []),
    )
    for size, key, extra in runs:
        json_out = out / f"retrieve_{key}.json"
        argv = [*cli, "retrieve", "--device", dev, "--sizes", size, "--workdir", work, *retrieve, *extra]
        if key == "10M":
            argv.append("--cuda-graphs")
        limit = limits["eager" if key == "1M_eager" else key]
        steps.append(Step(f"retrieve_{key}", [*argv, "--json-out", str(json_out)], limit, json_out=json_out))
        if key == "1M":  # the service over HTTP next to the in-process figures at the same size
            http_json = out / "http.json"
            argv = [py, "scripts/gpu_http.py", "--device", dev, "--workdir", work, *http]
            steps.append(
                Step("http", [*argv, "--json-out", str(http_json)], limits["http"], json_out=http_json)
            )
    train_json = out / "train.json"
    train = [py, "scripts/gpu_train.py", "--device", dev, *train, "--json-out", str(train_json)]
    steps.append(Step("train", train, limits["train"], json_out=train_json))
    steps.append(Step("bench_search", [*cli, "search", "--device", dev, "--json", *search], limits["search"]))
    return steps


def write_report(report: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def run_process(argv: list[str], limit_s: float, log: Path, env: dict[str, str]) -> tuple[int | None, float]:
    """Run ``argv`` in its own process group, output to ``log``; (exit code or None on timeout, seconds)."""
    start = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=max(1.0, limit_s)), time.monotonic() - start
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            return None, time.monotonic() - start


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and failing test ids from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {**counts, "failed": failed}


def last_json(text: str) -> Any:
    """The JSON object a command printed (the last line starting with '{' begins it)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


def run_step(step: Step, out: Path, deadline: float) -> dict[str, Any]:
    left = deadline - time.monotonic()
    if left < 10:
        return {"status": "skipped", "reason": f"overall budget spent ({left:.0f} s left)"}
    log = out / f"{step.name}.log"
    code, seconds = run_process(step.argv, min(step.limit_s, left - 5), log, step.env)
    text = log.read_text(errors="replace")
    status = "timeout" if code is None else ("passed" if code == 0 else "failed")
    result: dict[str, Any] = {"status": status, "seconds": round(seconds, 1), "limit_s": step.limit_s}
    result["command"] = " ".join(step.argv)
    if code is not None:
        result["exit_code"] = code
    if step.name == "tests" and (out / "tests.xml").is_file():
        result["summary"] = junit_summary(out / "tests.xml")
    elif step.json_out is not None and step.json_out.is_file():
        result["report"] = json.loads(step.json_out.read_text())
    elif step.name in ("bench_search", "profile"):
        result["report"] = last_json(text)
    if status != "passed":
        result["output_tail"] = text[-TAIL_CHARS:]
    return result


def host_info(py: str) -> dict[str, Any]:
    try:
        probe = subprocess.run([py, "-c", HOST_PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT)
        info: dict[str, Any] = (
            json.loads(probe.stdout) if probe.returncode == 0 else {"error": probe.stderr[-800:]}
        )
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        info = {"error": f"host probe failed: {exc}"}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def step_summary(name: str, step: dict[str, Any]) -> list[str]:
    """A few lines of figures per step, printed as the check goes (the run's output tail shows them)."""
    head = f"gpu_check: {name}: {step['status']} in {step.get('seconds', 0)} s"
    lines = [head + (f" ({step['reason']})" if "reason" in step else "")]
    report = step.get("report") or {}
    if name == "tests" and "summary" in step:
        t = step["summary"]
        lines.append(
            f"  {t['tests']} tests, {t['failures']} failures, {t['errors']} errors; failed: {t['failed']}"
        )
    for size in report.get("sizes", []):
        if "error" in size:
            lines.append(f"  {size['items']} items L={size['levels']}: ERROR {size['error'][:300]}")
            continue
        lines.append(
            f"  {size['items']} items L={size['levels']}: build {size.get('build_s', 0):.1f} s, load "
            f"{size.get('load_s', 0):.1f} s, GPU peak {size.get('gpu_peak_memory_gib', '-')} GiB"
        )
        for t in size.get("throughput", []):
            lines.append(
                f"    batch {t['batch']:>5}: {t['ms_per_batch_p50']:8.2f} ms/batch ({t.get('encode_ms_p50', float('nan')):.2f} encode, "
                f"{t.get('search_ms_p50', float('nan')):.2f} search+rerank), {t['requests_per_s']:9.0f} req/s"
            )
        ol = size.get("open_loop")
        if ol:
            lines.append(
                f"    open loop {ol['offered_per_s']:.0f}/s offered, max batch {ol['max_batch']}, max wait "
                f"{ol['max_wait_ms']} ms: p50 {ol['p50_ms']:.2f} ms, p99 {ol['p99_ms']:.2f} ms, mean batch "
                f"{ol['batch_size_mean']:.1f}, achieved {ol['achieved_per_s']:.0f}/s, "
                f"{'valid' if ol['valid'] else 'INVALID'} ({ol['unserved']} unserved)"
            )
        for g in size.get("open_loop_grid", []):
            lines.append(
                f"    open loop max batch {g['max_batch']}, wait {g['max_wait_ms']} ms: p50 {g['p50_ms']:.2f} ms, "
                f"p99 {g['p99_ms']:.2f} ms, mean batch {g['batch_size_mean']:.1f}, compute mean "
                f"{g['compute_ms_mean']:.2f} ms, {'valid' if g['valid'] else 'INVALID'}"
            )
        if "cuda_graphs" in size:
            lines.append(
                f"    cuda graphs {size['cuda_graphs']} ({size.get('cuda_graphs_captured', 0)} captured, "
                f"disabled: {size.get('cuda_graphs_disabled')}), parity vs eager {size.get('graph_parity')}"
            )
    lines += http_summary(report) if name == "http" else []
    for label in ("cpu", "device") if name == "train" else ():
        if label in report:
            r = report[label]
            lines.append(
                f"  train sasrec on {r['device']} ({r['threads']} threads): {r['seconds_per_epoch']:.2f} s the last "
                f"of {r['epochs']} epochs {r['epoch_seconds']}, valid recall@20 {r['valid_recall@20']}"
            )
    if name == "train" and "cpu_over_device" in report:
        lines.append(f"  train: CPU / device = {report['cpu_over_device']}x (last epoch)")
    for variant in ("eager", "cuda_graphs") if name == "profile" else ():
        if variant in report:
            lines.append(f"  profile {variant}: {json.dumps(report[variant])}")
    for row in report.get("scaling", []):
        lines.append(
            f"  search {row['items']} items L={row['levels']}: step {row['step_ms_per_level']:.2f} ms/level, "
            f"full prefix {row['reference_ms_per_level']:.2f}, table {row['table_ms_per_level']:.2f}; "
            f"same leaves {row['step_reference_same_leaf_sets']}/{row['queries']}"
        )
    if step["status"] != "passed" and step.get("output_tail"):
        lines.append("  output tail: " + step["output_tail"][-600:].replace("\n", "\n  | "))
    return lines


def http_summary(report: dict[str, Any]) -> list[str]:
    """The HTTP step's rows: the generator's ceiling, each rate, the deltas' p99 before/during/after."""
    lines = []
    for label, row in [("ceiling", report.get("ceiling"))] + [("rate", r) for r in report.get("rates", [])]:
        if row:
            lines.append(
                f"  http {label} {row['target_qps']:.0f}/s: achieved {row['achieved_qps']:.0f}/s, p50 "
                f"{row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, errors {row['errors']}, "
                f"{'valid' if row['valid'] else 'INVALID'} ({row['processes']} generator processes)"
            )
    d = report.get("deltas")
    if d:
        lines.append(
            f"  http deltas at {d['rate']:.0f}/s: p99 before {d['before']['p99_ms']:.2f} ms, during "
            f"{d['during']['p99_ms']:.2f} ms, after {d['after']['p99_ms']:.2f} ms; adds (s) "
            f"{[a['seconds'] for a in d['adds']]}; RSS {report.get('rss_mib')} MiB, GPU "
            f"{report.get('gpu_memory_mib')} MiB ({report.get('workers', 1)} workers)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    parser.add_argument("--small", action="store_true", help="small sizes (CPU dry run, seconds)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check", help="report folder")
    parser.add_argument(
        "--workdir",
        type=Path,
        help=f"synthetic bundles (default: OUT/bundles with --small, else {DEFAULT_FULL_WORKDIR})",
    )
    parser.add_argument(
        "--budget", type=float, default=0.0, help="overall seconds (0 = 470, or 540 with --small)"
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (540.0 if args.small else 470.0)
    deadline = time.monotonic() + budget
    py = sys.executable
    path = args.out / "gpu_check.json"
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": args.device,
        "small": args.small,
        "budget_s": budget,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "steps": {},
    }
    write_report(report, path)
    report["host"] = host_info(py)
    print(f"gpu_check: host {json.dumps(report['host'])}", flush=True)
    if args.device.startswith("cuda") and not report["host"].get("cuda_available"):
        report["error"] = f"--device {args.device} but torch.cuda.is_available() is False on this machine"
    write_report(report, path)
    for step in steps_for(args, py):
        report["steps"][step.name] = {"status": "running", "command": " ".join(step.argv)}
        write_report(report, path)
        report["steps"][step.name] = run_step(step, args.out, deadline)
        write_report(report, path)
        try:
            print("\n".join(step_summary(step.name, report["steps"][step.name])), flush=True)
        except (KeyError, TypeError, ValueError) as exc:  # a summary never stops the check
            print(f"gpu_check: {step.name}: {report['steps'][step.name]['status']} (summary failed: {exc!r})")
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["total_s"] = round(budget - (deadline - time.monotonic()), 1)
    report["ok"] = "error" not in report and all(s["status"] == "passed" for s in report["steps"].values())
    write_report(report, path)
    print(f"gpu_check: report {path} ({'all steps passed' if report['ok'] else 'NOT all steps passed'})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
