"""The soak verdict (benchmarks/soak.py): RSS growth and p99 ratio from the first window after the
warm-up to the last one, against the limits 5 % and 1.2x."""

from __future__ import annotations

import pytest

from benchmarks.load import OpenLoopStats
from benchmarks.soak import MAX_P99_RATIO, MAX_RSS_GROWTH, SoakConfig, Window, verdict


def window(start_s: float, p99_ms: float, rss_mib: float, achieved: float = 50.0) -> Window:
    stats = OpenLoopStats(
        target_qps=50.0,
        achieved_qps=achieved,
        sent=3000,
        errors=0,
        p50_ms=p99_ms / 3,
        p99_ms=p99_ms,
        send_lag_p99_ms=0.1,
        connections=4,
    )
    return Window(start_s=start_s, stats=stats, rss_mib=rss_mib)


def test_the_warm_up_window_does_not_count() -> None:
    # minute 1 is slow and small (warm-up); from minute 2 on the figures hold still
    windows = [
        window(0, 90.0, 300.0),
        window(60, 20.0, 400.0),
        window(120, 21.0, 401.0),
        window(180, 20.0, 402.0),
    ]
    v = verdict(windows, warmup_s=60)
    assert v["stable"] is True and (v["from_s"], v["to_s"]) == (60, 180)
    assert v["rss_growth"] == pytest.approx(402 / 400 - 1) and v["p99_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("last_p99", "last_rss", "stable"),
    [
        (20.0 * MAX_P99_RATIO * 0.99, 400.0 * (1 + MAX_RSS_GROWTH) * 0.999, True),
        (20.0 * MAX_P99_RATIO * 1.01, 400.0, False),
        (20.0, 400.0 * (1 + MAX_RSS_GROWTH) * 1.01, False),
    ],
)
def test_limits(last_p99: float, last_rss: float, stable: bool) -> None:
    v = verdict([window(60, 20.0, 400.0), window(120, last_p99, last_rss)], warmup_s=60)
    assert v["stable"] is stable


def test_too_short_a_soak_has_no_verdict_and_a_bad_config_is_refused() -> None:
    assert verdict([window(0, 20.0, 400.0), window(60, 20.0, 400.0)], warmup_s=60)["stable"] is None
    with pytest.raises(ValueError, match="rate_fraction"):
        SoakConfig(rate_fraction=1.5)
    with pytest.raises(ValueError, match="window_s"):
        SoakConfig(minutes=0.5, window_s=60)
