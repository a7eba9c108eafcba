"""The pieces of ``genret bench serve --shadow`` that need no running service: metrics parsing,
counter deltas, the generated experiment file, the bundle directory and the p99 comparison."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from service.bench import (
    BenchConfig,
    ShadowMeasurement,
    counter_delta,
    experiment_yaml,
    format_shadow_table,
    shadow_counters,
    shadow_root,
    with_p99_change,
)
from service.experiments import ExperimentConfig
from service.models_registry import ModelRegistry
from service.settings import Settings

METRICS = """\
# HELP genret_shadow_requests_total Shadow runs by shadow bundle and result (ok, error, timeout).
# TYPE genret_shadow_requests_total counter
genret_shadow_requests_total{result="ok",shadow="shadow"} 12.0
genret_shadow_requests_total{result="timeout",shadow="shadow"} 2.0
genret_shadow_requests_total{result="ok",shadow="other"} 3.0
genret_shadow_requests_total_created{result="ok",shadow="shadow"} 1.7e9
genret_shadow_dropped_total{reason="queue_full"} 40.0
genret_shadow_dropped_total{reason="stale"} 1.0
genret_requests_total{status="200"} 99.0
"""


def test_shadow_counters_sum_by_result_and_reason() -> None:
    runs, dropped = shadow_counters(METRICS)
    assert runs == {"ok": 15, "timeout": 2}
    assert dropped == {"queue_full": 40, "stale": 1}


def test_counter_delta_keeps_changed_keys_only() -> None:
    assert counter_delta({"ok": 15, "timeout": 2}, {"ok": 5, "timeout": 2}) == {"ok": 10}
    assert counter_delta({"queue_full": 3}, {}) == {"queue_full": 3}


@pytest.mark.parametrize("rate", [0.5, 1.0, 0.05])
def test_experiment_yaml_is_a_valid_experiment(rate: float) -> None:
    config = ExperimentConfig.from_dict(yaml.safe_load(experiment_yaml(rate)))
    assert [(v.name, v.bundle) for v in config.variants] == [("default", "primary")]
    assert [(s.bundle, s.sample_rate) for s in config.shadows] == [("shadow", rate)]


def _fake_bundle(path: Path, name: str) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"name": name}))
    return path


def test_shadow_root_serves_both_bundles_under_fixed_names(tmp_path: Path) -> None:
    primary = _fake_bundle(tmp_path / "bundle-s0", "synthetic")
    shadow = _fake_bundle(tmp_path / "bundle-s1", "synthetic")
    root = shadow_root(tmp_path / "work", primary, shadow)
    assert shadow_root(tmp_path / "work", primary, shadow) == root  # idempotent
    found = ModelRegistry(Settings(bundle_path=root)).discover()
    assert {name: p.resolve() for name, p in found.items()} == {
        "primary": primary.resolve(),
        "shadow": shadow.resolve(),
    }


def _row(rate: float, c: int, p99: float) -> ShadowMeasurement:
    return ShadowMeasurement(rate, c, 100.0, 5.0, 8.0, p99, 1000, 0, 300.0)


def test_p99_change_is_against_rate_zero_at_the_same_concurrency() -> None:
    rows = with_p99_change(
        [_row(0, 8, 10.0), _row(0, 32, 40.0), _row(1, 8, 11.0), _row(1, 32, 30.0), _row(0.5, 64, 5.0)]
    )
    changes = [r.p99_change_pct for r in rows]
    assert changes[:2] == [0.0, 0.0]
    assert changes[2] == pytest.approx(10.0)
    assert changes[3] == pytest.approx(-25.0)
    assert changes[4] is None  # no rate-0 row at c=64
    table = format_shadow_table([replace_counts(rows[2], {"ok": 7, "timeout": 1}, {"queue_full": 4})])
    assert "| 1 | 8 |" in table and "+10.0%" in table
    assert "| 7 | timeout=1 | queue_full=4 |" in table


def replace_counts(m: ShadowMeasurement, runs: dict[str, int], dropped: dict[str, int]) -> ShadowMeasurement:
    return replace(m, shadow_runs=runs, shadow_dropped=dropped)


def test_bench_config_rejects_rates_outside_unit_interval(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shadow rates"):
        BenchConfig(
            items=10,
            levels=2,
            branching=0,
            dim=8,
            concurrency=(1,),
            duration_s=1.0,
            k=5,
            beam_size=5,
            max_batch_size=8,
            modes=("generative",),
            workdir=tmp_path,
            shadow_rates=(0.0, 1.5),
        )
