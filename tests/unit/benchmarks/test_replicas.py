"""``genret bench serve --replicas``: several service processes driven as one (benchmarks/replicas.py):
connections split evenly, wrk summaries merged, open-loop generators spread over the replicas' ports,
and two real services through both loops with no error (a replica that did not answer its share
would show as connect errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load import http_post, start_trivial_server
from benchmarks.load_multi import multi_open_loop
from benchmarks.replicas import merge_wrk, split_connections
from tests.unit.benchmarks.serve_configs import tiny_bench_config


def test_connections_split_evenly_with_one_at_least() -> None:
    assert split_connections(32, 1) == [32]
    assert split_connections(32, 2) == [16, 16]
    assert split_connections(7, 3) == [3, 2, 2]
    assert sum(split_connections(64, 3)) == 64


def _summary(requests: int, duration_us: int, p99_us: int, status: int = 0) -> dict[str, int]:
    return {
        "requests": requests,
        "duration_us": duration_us,
        "connect": 0,
        "read": 0,
        "write": 0,
        "status": status,
        "timeout": 0,
        "p50_us": p99_us // 2,
        "p95_us": p99_us - 1,
        "p99_us": p99_us,
        "max_us": p99_us + 1,
    }


def test_merge_sums_counts_and_keeps_the_worst_percentile() -> None:
    merged = merge_wrk([_summary(1000, 10_000_000, 40_000), _summary(900, 10_010_000, 55_000, status=2)])
    assert (merged["requests"], merged["status"], merged["duration_us"]) == (1900, 2, 10_010_000)
    assert (merged["p50_us"], merged["p99_us"], merged["max_us"]) == (27_500, 55_000, 55_001)
    one = _summary(500, 5_000_000, 30_000)
    assert merge_wrk([one]) == one


def test_open_loop_generators_spread_over_the_ports_given() -> None:
    servers = [start_trivial_server() for _ in range(2)]
    try:
        body = http_post("/v1/retrieve", b'{"history":["1"]}')
        stats = multi_open_loop("127.0.0.1", [port for _, port in servers], [body], 100.0, 1.0, 2)
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=10)
    assert stats.processes == 2 and stats.sent == 100 and stats.errors == 0 and stats.valid
    with pytest.raises(ValueError, match="ports"):
        multi_open_loop("127.0.0.1", [1, 2, 3], [body], 100.0, 1.0, 2)


@pytest.mark.skipif(not Path("/usr/bin/wrk").exists(), reason="needs wrk (apt-get install wrk)")
def test_two_replicas_serve_a_real_closed_and_open_loop_without_errors(tmp_path: Path) -> None:
    from benchmarks.load import retrieve_bodies
    from benchmarks.serve import build_bundle, measure_mode, wrk_script

    cfg = tiny_bench_config(tmp_path, open_loop=(0.5,), replicas=2)
    bundle = build_bundle(cfg)
    bodies = retrieve_bodies(bundle, 10, k=5, beam_size=4, seed=1, user_prefix="o", users=10)
    closed, opened, start = measure_mode(
        "generative", bundle, wrk_script(bundle, cfg, tmp_path / "r.lua"), bodies, cfg
    )
    assert closed[0].errors == 0 and closed[0].qps > 0 and start.errors == 0
    assert len(opened) == 1 and opened[0].errors == 0
    logs = [tmp_path / f"service-generative-{i}.log" for i in range(2)]
    assert all(log.exists() for log in logs)
    with pytest.raises(ValueError, match="replicas"):
        tiny_bench_config(tmp_path, replicas=5)
