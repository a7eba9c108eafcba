"""Open-loop load from several generator processes (:func:`benchmarks.load.open_loop` in each), for
rates one Python process cannot send (the GPU check's HTTP step: 2,000-10,000 requests/s).

Process ``j`` of ``P`` sends the requests scheduled at ``offsets[j::P]`` of one schedule (evenly
spaced or Poisson, :func:`benchmarks.load.send_times`), so together they offer exactly the target
rate and each interleaves with the others. Each returns its answered requests' latencies (from the
scheduled send, as in one process), merged here before the percentiles are taken; the achieved
rate is the requests sent over the longest of the processes' send spans. A row is valid as in
:class:`benchmarks.load.OpenLoopStats` (achieved >= 98 % of target).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.load import MIN_ACHIEVED_FRACTION, Arrivals, open_loop, run_loop, send_times


@dataclass(frozen=True)
class MultiLoopStats:
    target_qps: float
    achieved_qps: float
    sent: int
    errors: int
    p50_ms: float
    p99_ms: float
    send_lag_p99_ms: float  # the worst generator's
    connections: int  # summed peaks
    processes: int

    @property
    def valid(self) -> bool:
        return self.achieved_qps >= MIN_ACHIEVED_FRACTION * self.target_qps


def _one(
    args: tuple[str, int, list[bytes], np.ndarray, float, float],
) -> tuple[int, int, float, float, int, list[float]]:
    host, port, bodies, offsets, window_s, timeout_s = args
    latencies: list[float] = []
    stats = run_loop(
        open_loop(
            host,
            port,
            bodies,
            offsets,
            window_s,
            timeout_s=timeout_s,
            warm_connections=8,
            max_connections=256,
            latencies=latencies,
        )
    )
    return stats.sent, stats.errors, stats.achieved_qps, stats.send_lag_p99_ms, stats.connections, latencies


def multi_open_loop(
    host: str,
    port: int | Sequence[int],
    bodies: Sequence[bytes],
    rate: float,
    window_s: float,
    processes: int,
    *,
    arrivals: Arrivals = "fixed",
    seed: int = 0,
    timeout_s: float = 10.0,
) -> MultiLoopStats:
    """``rate`` requests/s for ``window_s`` seconds from ``processes`` generator processes; with
    several ports (replicas of one service), process ``j`` sends to ``port[j % len(port)]``."""
    ports = [port] if isinstance(port, int) else list(port)
    offsets = send_times(rate, window_s, arrivals, seed=seed)  # [n] sorted
    P = max(1, min(processes, len(offsets)))
    if len(ports) > P:  # a port no generator sends to would get none of the load, silently
        raise ValueError(f"{len(ports)} ports need at least as many generator processes, got {P}")
    jobs = [
        (host, ports[j % len(ports)], list(bodies[j::P] or bodies), offsets[j::P], window_s, timeout_s)
        for j in range(P)
    ]
    with mp.get_context("spawn").Pool(P) as pool:  # spawn: no CUDA or event-loop state forked
        parts = pool.map(_one, jobs)
    latency_ms = np.asarray([x for part in parts for x in part[5]]) * 1000.0  # [answered]
    sent = sum(p[0] for p in parts)
    # each process's achieved rate is its share over its own span: the slowest one bounds the whole
    spans = [p[0] / p[2] for p in parts if p[2] > 0]
    took = max([window_s, *spans])
    return MultiLoopStats(
        target_qps=len(offsets) / window_s,
        achieved_qps=sent / took,
        sent=sent,
        errors=sum(p[1] for p in parts),
        p50_ms=float(np.percentile(latency_ms, 50)) if len(latency_ms) else float("nan"),
        p99_ms=float(np.percentile(latency_ms, 99)) if len(latency_ms) else float("nan"),
        send_lag_p99_ms=max(p[3] for p in parts),
        connections=sum(p[4] for p in parts),
        processes=P,
    )
