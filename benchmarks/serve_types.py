"""The rows ``genret bench serve`` measures (closed loop, open loop, the first window after ready)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    mode: str
    concurrency: int
    qps: float  # 2xx answers per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx + socket errors + timeouts
    rss_mib: float
    load: str = "closed"  # wrk: each connection sends when its previous answer arrived


@dataclass(frozen=True)
class OpenLoopMeasurement:
    mode: str
    fraction: float  # of max_qps
    max_qps: float  # the mode's best error-free closed-loop QPS in this run
    target_qps: float
    achieved_qps: float
    p50_ms: float  # from each request's scheduled send time
    p99_ms: float
    errors: int
    valid: bool  # achieved >= 98 % of target
    arrivals: str
    requests: int
    send_lag_p99_ms: float  # generator / connection delay, already inside the latencies
    connections: int  # peak open connections
    load: str = "open"


@dataclass(frozen=True)
class StartMeasurement:
    """The first ``window_s`` seconds of closed-loop load, started as soon as ``/readyz`` says ready
    (no warm-up before it), beside the steady-state p99 measured later at the same concurrency."""

    mode: str
    concurrency: int
    ready_s: float  # from the process start to the first ready /readyz
    window_s: float
    first_qps: float
    first_p50_ms: float
    first_p99_ms: float
    errors: int
    steady_p99_ms: float | None  # the closed-loop row at the same concurrency (None: not measured)
    rss_ready_mib: float  # VmRSS at ready, before any request
    rss_peak_mib: float  # VmHWM when the mode's runs ended
    load: str = "first-window"
