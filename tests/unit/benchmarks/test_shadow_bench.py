"""``genret bench serve --shadow`` with interleaved rounds: rate order per round, median rows."""

from __future__ import annotations

import pytest

from benchmarks.shadow import (
    ShadowMeasurement,
    format_shadow_table,
    interleaved_order,
    median_row,
    shadow_queue_depth,
    shadow_yields,
    with_p99_change,
)


def test_every_rate_leads_one_round_in_turn() -> None:
    rates = (0.0, 0.5, 1.0)
    orders = [interleaved_order(rates, r) for r in range(4)]
    assert orders == [[0.0, 0.5, 1.0], [0.5, 1.0, 0.0], [1.0, 0.0, 0.5], [0.0, 0.5, 1.0]]


def row(
    rate: float, p99: float, qps: float, runs: dict[str, int], dropped: dict[str, int]
) -> ShadowMeasurement:
    return ShadowMeasurement(
        rate, 8, qps, p99 / 2, p99 * 0.8, p99, 100, 0, 300.0, runs, dropped, shadow_yields=2
    )


def test_median_row_takes_medians_sums_counts_and_keeps_the_p99_range() -> None:
    rounds = [
        row(1.0, 30.0, 400.0, {"ok": 5}, {"queue_full": 10}),
        row(1.0, 90.0, 500.0, {"ok": 7, "timeout": 1}, {"stale": 2}),
        row(1.0, 20.0, 450.0, {}, {"queue_full": 1}),
    ]
    m = median_row(rounds)
    assert (m.p99_ms, m.qps, m.p50_ms) == (30.0, 450.0, 15.0)
    assert (m.p99_min_ms, m.p99_max_ms, m.rounds) == (20.0, 90.0, 3)
    assert m.shadow_runs == {"ok": 12, "timeout": 1}
    assert m.shadow_dropped == {"queue_full": 11, "stale": 2}
    assert (m.requests, m.shadow_yields) == (300, 6)
    base = median_row([row(0.0, 25.0, 480.0, {}, {}), row(0.0, 24.0, 470.0, {}, {})])
    table = format_shadow_table(with_p99_change([base, m]))
    assert "+22.4%" in table and "| 3 | 20.0-90.0 |" in table  # 30 vs median(24, 25) = 24.5
    with pytest.raises(ValueError, match="one rate and concurrency"):
        median_row([rounds[0], base])


def test_shadow_yields_sums_the_counter_over_labels() -> None:
    text = (
        "# TYPE genret_shadow_yields_total counter\n"
        'genret_shadow_yields_total{shadow="a"} 3.0\n'
        'genret_shadow_yields_total{shadow="b"} 4.0\n'
        'genret_shadow_yields_created{shadow="a"} 1.7e9\n'
    )
    assert shadow_yields(text) == 7
    assert shadow_yields("") == 0


def test_shadow_queue_depth_reads_the_gauge() -> None:
    text = "# TYPE genret_shadow_queue_depth gauge\ngenret_shadow_queue_depth 12.0\n"
    assert shadow_queue_depth(text) == 12
    assert shadow_queue_depth("genret_shadow_queue_depth_other 3.0\n") == 0
