"""The tables ``genret bench serve`` prints: closed loop, open loop, and the start-up window.

The start-up table sets the p99 of the first seconds after the service reports ready (the window
in which a rollout's new replica takes its first traffic) beside the steady-state p99 at the same
concurrency, with the service's resident memory at ready (before any load or catalogue delta) and
at its peak.
"""

from __future__ import annotations

from benchmarks.serve_types import Measurement, OpenLoopMeasurement, StartMeasurement


def format_table(results: list[Measurement]) -> str:
    lines = [
        "| mode | concurrency | QPS | p50 ms | p95 ms | p99 ms | requests | errors | RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        lines.append(
            f"| {m.mode} | {m.concurrency} | {m.qps:.1f} | {m.p50_ms:.1f} | {m.p95_ms:.1f} | {m.p99_ms:.1f} "
            f"| {m.requests} | {m.errors} | {m.rss_mib:.0f} |"
        )
    by = {(m.mode, m.concurrency): m for m in results}
    ratios = []
    for c in sorted({m.concurrency for m in results}):
        gen, bf = by.get(("generative", c)), by.get(("bruteforce", c))
        if gen and bf and bf.qps > 0:
            ratios.append(f"c={c}: {gen.qps / bf.qps:.2f}x")
    if ratios:
        lines.append("")
        lines.append("generative / brute-force QPS: " + ", ".join(ratios))
    return "\n".join(lines)


def format_open_table(rows: list[OpenLoopMeasurement]) -> str:
    lines = [
        "| mode | arrivals | % of max | max QPS | target QPS | achieved QPS | p50 ms | p99 ms | errors | valid "
        "| send lag p99 ms | connections |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.arrivals} | {r.fraction:.0%} | {r.max_qps:.1f} | {r.target_qps:.1f} "
            f"| {r.achieved_qps:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {'yes' if r.valid else 'NO'} "
            f"| {r.send_lag_p99_ms:.1f} | {r.connections} |"
        )
    return "\n".join(lines)


def format_start_table(rows: list[StartMeasurement]) -> str:
    lines = [
        "| mode | concurrency | ready after s | first window s | first-window QPS | first-window p99 ms "
        "| steady p99 ms | errors | RSS at ready MiB | RSS peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        steady = "-" if r.steady_p99_ms is None else f"{r.steady_p99_ms:.1f}"
        lines.append(
            f"| {r.mode} | {r.concurrency} | {r.ready_s:.1f} | {r.window_s:.0f} | {r.first_qps:.1f} "
            f"| {r.first_p99_ms:.1f} | {steady} | {r.errors} | {r.rss_ready_mib:.0f} | {r.rss_peak_mib:.0f} |"
        )
    return "\n".join(lines)
