"""``genret bench serve``'s start-up window: the first seconds after ready beside the steady state,
and the resident memory at ready (benchmarks/serve.py, benchmarks/serve_report.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.serve import FIRST_WINDOW_S, Measurement, start_row
from benchmarks.serve_report import format_start_table
from tests.unit.benchmarks.serve_configs import tiny_bench_config


class FakeService:
    ready_s = 3.25

    def rss_bytes(self) -> tuple[int, int]:
        return 900 * 2**20, 1010 * 2**20


def _row(c: int, p99: float) -> Measurement:
    return Measurement("generative", c, 800.0, 30.0, 40.0, p99, 8000, 0, 950.0)


def test_first_window_sits_beside_the_steady_row_at_its_concurrency() -> None:
    first = _row(32, 420.0)
    row = start_row(first, [_row(16, 20.0), _row(32, 48.0)], FakeService(), 880 * 2**20)  # type: ignore[arg-type]
    assert (row.concurrency, row.first_p99_ms, row.steady_p99_ms) == (32, 420.0, 48.0)
    assert (row.rss_ready_mib, row.rss_peak_mib, row.ready_s) == (880.0, 1010.0, 3.25)
    assert row.window_s == FIRST_WINDOW_S
    table = format_start_table([row])
    assert "| generative | 32 | 3.2 | 5 | 800.0 | 420.0 | 48.0 | 0 | 880 | 1010 |" in table
    alone = start_row(first, [_row(64, 48.0)], FakeService(), 0)  # type: ignore[arg-type]
    assert alone.steady_p99_ms is None and "| - |" in format_start_table([alone])


@pytest.mark.skipif(not Path("/usr/bin/wrk").exists(), reason="needs wrk (apt-get install wrk)")
def test_bench_serve_reports_the_first_window_on_a_real_service(tmp_path: Path) -> None:
    from benchmarks.load import retrieve_bodies
    from benchmarks.serve import build_bundle, measure_mode, wrk_script

    cfg = tiny_bench_config(tmp_path)
    bundle = build_bundle(cfg)
    bodies = retrieve_bodies(bundle, 10, k=5, beam_size=4, seed=1, user_prefix="o", users=10)
    _, _, start = measure_mode("generative", bundle, wrk_script(bundle, cfg, tmp_path / "r.lua"), bodies, cfg)
    assert start.first_qps > 0 and start.errors == 0 and start.steady_p99_ms is not None
    assert 0 < start.rss_ready_mib <= start.rss_peak_mib and start.ready_s > 0
