"""``scripts/gpu_check.sh --device cpu --small``: the GPU check's own steps, on the CPU, so that
the script cannot rot between the runs on a CUDA machine.

Runs the real script (a subprocess: bash, then scripts/gpu_check.py, then one subprocess per
step) and reads its JSON report: every step passed, the nested device tests ran and none failed,
``bench search --device`` and both ``bench retrieve`` sizes measured what the report promises, and
the HTTP step served every rate and every delta through a real uvicorn process, and the training
step trained SASRec through its device setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--small", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    failed = {
        name: step.get("output_tail", "")[-1500:]
        for name, step in steps.items()
        if step["status"] != "passed"
    }
    assert result.returncode == 0 and report["ok"], (failed, result.stdout[-2000:], result.stderr[-2000:])
    assert list(steps) == [
        "tests",
        "profile",
        "retrieve_1M",
        "http",
        "retrieve_1M_eager",
        "retrieve_10M",
        "train",
        "bench_search",
    ]
    assert report["host"]["torch"] and report["device"] == "cpu" and report["small"] is True

    summary = steps["tests"]["summary"]
    assert summary["tests"] >= 5 and summary["failures"] == summary["errors"] == 0

    search = steps["bench_search"]["report"]
    assert search["device"] == "cpu" and len(search["scaling"]) == 2
    for row in search["scaling"]:
        assert row["step_ms_per_level"] > 0 and row["step_reference_same_leaf_sets"] == row["queries"]

    for name, levels in (("retrieve_1M", 3), ("retrieve_10M", 4)):
        run = steps[name]["report"]
        assert run["status"] == "done" and run == json.loads((out / f"{name}.json").read_text())
        (size,) = run["sizes"]
        assert "error" not in size and size["levels"] == levels
        assert [t["batch"] for t in size["throughput"]] == [8, 32]
        assert size["max_requests_per_s"] == max(t["requests_per_s"] for t in size["throughput"]) > 0
        loop = size["open_loop"]
        assert loop["requests"] == 50 and 0 < loop["p50_ms"] <= loop["p99_ms"] <= loop["max_ms"]
        assert 1 <= loop["batch_size_mean"] <= loop["batch_size_max"] <= 16

    http = steps["http"]["report"]
    assert http == json.loads((out / "http.json").read_text()) and http["exit_code"] == 0
    assert [row["target_qps"] for row in http["rates"]] == [20, 40, 80]
    for row in [http["ceiling"], *http["rates"]]:
        assert row["errors"] == 0 and 0 < row["p50_ms"] <= row["p99_ms"] and row["processes"] == 2
    deltas = http["deltas"]
    assert [a["status"] for a in deltas["adds"]] == [200] * 3
    assert http["workers"] == 2 and len(deltas["models"]) == 2 and deltas["workers_converged_s"] is not None
    for worker in deltas["models"]:  # posted to the first worker, applied by both
        (model,) = worker["models"]
        assert (model["catalogue_version"], model["num_items"], model["num_live"]) == (3, 3060, 3060)
    assert deltas["after"]["errors"] == 0 and deltas["after"]["p99_ms"] > 0 and http["rss_mib"][0] > 0

    train = steps["train"]["report"]
    for label in ("cpu", "device"):
        run = train[label]
        assert run["device"] == "cpu" and run["weights_on"] == "cpu" and run["epochs"] == 2
        assert len(run["epoch_seconds"]) == 2 and run["seconds_per_epoch"] == run["epoch_seconds"][-1] > 0
        assert 0 <= run["valid_recall@20"] <= 1
    # both runs on the CPU here: the same data, config, seed and threads train the same model
    assert train["cpu"]["valid_recall@20"] == train["device"]["valid_recall@20"]
    assert train["cpu_over_device"] > 0
