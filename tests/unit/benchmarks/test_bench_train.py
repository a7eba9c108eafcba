"""``genret bench train``: every thread count is timed on the same batches, and the table says so."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.train import bench_train, format_report
from training.data.synthetic import synthetic_dataset
from training.splits import make_split


def test_each_thread_count_gets_a_row_and_a_ratio_to_the_first() -> None:
    data = synthetic_dataset(num_users=300, num_items=200, branching=4, depth=2, seed=0)
    split = make_split(data, kind="loo", seed=0, max_len=20)
    report = bench_train(split, [1, 2], steps=2, rounds=2, overrides={"sasrec.dim": 16})
    assert [r["threads"] for r in report["rows"]] == [1, 2]
    assert report["rows"][0]["speed_vs_first"] == 1.0
    for row in report["rows"]:
        assert len(row["rounds_ms"]) == 2 and all(ms > 0 for ms in row["rounds_ms"])
        assert row["epoch_seconds"] == pytest.approx(
            row["ms_per_step"] * report["steps_per_epoch"] / 1e3, abs=0.06
        )
    assert report["config"]["dim"] == 16
    text = format_report(report, "planted")
    assert "threads" in text and "x  " in text


def test_the_command_refuses_zero_steps() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "bench", "train", "--data", "synthetic", "--steps", "0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "--steps" in done.stderr
