"""The pieces of ``genret bench serve`` that need no service: metrics parsing, counter deltas, the
generated experiment file, the bundle directory and the p99 comparison of ``--shadow``; the
open-loop schedule, its client against small in-test servers, and the row validity."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.launcher import free_port
from benchmarks.load import Arrivals, OpenLoopStats, http_post, open_loop, run_loop, send_times
from benchmarks.serve import BenchConfig, Measurement, max_throughput
from benchmarks.shadow import (
    ShadowMeasurement,
    counter_delta,
    experiment_yaml,
    format_shadow_table,
    shadow_counters,
    shadow_queue_depth,
    shadow_root,
    shadow_yields,
    with_p99_change,
)
from service.registry.model_registry import ModelRegistry
from service.settings import Settings
from service.shadow.experiments import ExperimentConfig

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


def test_shadow_gauge_and_yields_parse_with_prometheus_client() -> None:
    text = METRICS + (
        "# TYPE genret_shadow_queue_depth gauge\ngenret_shadow_queue_depth 3.0\n"
        "# TYPE genret_shadow_yields_total counter\n"
        'genret_shadow_yields_total{shadow="a"} 4.0\ngenret_shadow_yields_total{shadow="b"} 1.0\n'
    )
    assert shadow_queue_depth(text) == 3
    assert shadow_yields(text) == 5
    assert shadow_queue_depth(METRICS) == 0


@pytest.mark.parametrize("arrivals", ["fixed", "poisson"])
def test_send_times_offer_exactly_the_target_within_the_window(arrivals: Arrivals) -> None:
    offsets = send_times(250.0, 4.0, arrivals, seed=3)
    assert len(offsets) == 1000
    assert np.all(np.diff(offsets) >= 0) and offsets[0] >= 0 and offsets[-1] < 4.0
    gaps = np.diff(offsets)
    if arrivals == "fixed":
        assert np.allclose(gaps, 1 / 250.0)
    else:  # exponential gaps: mean 1/rate, coefficient of variation ~1 (fixed spacing has 0)
        assert gaps.mean() == pytest.approx(1 / 250.0, rel=0.1)
        assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.15)


def test_open_loop_times_latency_from_the_scheduled_send() -> None:
    """A server that answers one request at a time, 20 ms each, offered 100/s: the generator keeps
    its schedule (achieved = target, valid), and the queue the server builds shows in the latency
    (a closed-loop client would see ~20 ms every time)."""

    async def main() -> OpenLoopStats:
        lock = asyncio.Lock()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    async with lock:
                        await asyncio.sleep(0.02)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            body = http_post("/v1/retrieve", b"{}")
            return await open_loop("127.0.0.1", port, [body], send_times(100.0, 1.0, "fixed"), 1.0)

    stats = run_loop(main())
    assert stats.sent == 100 and stats.errors == 0
    assert stats.achieved_qps == pytest.approx(100.0, rel=0.02) and stats.valid
    assert stats.p50_ms > 200.0  # 100/s offered to a 50/s server: the backlog grows for the whole second
    assert stats.p99_ms > stats.p50_ms


def test_a_row_under_98_percent_of_its_target_is_invalid() -> None:
    ok = OpenLoopStats(100.0, 98.5, 985, 0, 5.0, 9.0, 1.0, 8)
    slow = OpenLoopStats(100.0, 97.0, 970, 0, 5.0, 9.0, 1.0, 8)
    assert ok.valid and not slow.valid


def test_open_loop_errors_count_refused_connections() -> None:
    async def main() -> OpenLoopStats:
        port = free_port()  # nothing listens there
        return await open_loop(
            "127.0.0.1", port, [b"x"], send_times(10.0, 0.5, "fixed"), 0.5, warm_connections=0
        )

    stats = run_loop(main())
    assert stats.errors == 5 and stats.sent == 0 and not stats.valid


def _closed(qps: float, errors: int) -> Measurement:
    return Measurement("generative", 32, qps, 1.0, 2.0, 3.0, 100, errors, 10.0)


def test_max_throughput_is_the_best_error_free_closed_loop_row() -> None:
    assert max_throughput([_closed(400.0, 0), _closed(480.0, 0), _closed(520.0, 3)]) == 480.0
    assert max_throughput([_closed(520.0, 3)]) is None
