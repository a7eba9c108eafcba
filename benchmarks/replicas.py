"""Several service processes of one mode on one machine, driven as one service (``--replicas``).

One service process is bounded by its GIL: under load it uses little more than one core and leaves
the rest of the machine idle (docs/results.md, "One process or two on the same 2 cores"). A deployment runs
several replicas per node instead, each a pod with its own process, and the Kubernetes Service
spreads connections over them. This drives ``n`` processes the same way: each gets an even share of
the closed loop's connections (one ``wrk`` per replica, all at once) and of the open loop's rate
(one generator process per replica, :func:`benchmarks.load_multi.multi_open_loop`).

Merged figures: QPS, requests and errors are summed; each latency percentile is the worst
replica's (a bound on the merged percentile, and exact for one replica); resident memory is the
largest replica's, the figure a pod's memory limit is set by.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.launcher import ServiceProcess
from benchmarks.wrk import parse_wrk, wrk_command

PERCENTILES = ("p50_us", "p95_us", "p99_us", "max_us")
SUMMED = ("requests", "connect", "read", "write", "status", "timeout")


def split_connections(concurrency: int, replicas: int) -> list[int]:
    """``concurrency`` connections as even shares over ``replicas`` (each at least one)."""
    base, extra = divmod(concurrency, replicas)
    return [max(1, base + (i < extra)) for i in range(replicas)]


def merge_wrk(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several ``wrk`` summaries (one per replica, run at once) as one: the module's merge rule."""
    merged: dict[str, Any] = {key: sum(int(p[key]) for p in parts) for key in SUMMED}
    merged["duration_us"] = max(int(p["duration_us"]) for p in parts)
    merged.update({key: max(int(p[key]) for p in parts) for key in PERCENTILES})
    return merged


class Replicas:
    """Service processes of one mode, driven as one service; ``stop`` stops them all."""

    def __init__(self, processes: Sequence[ServiceProcess]) -> None:
        if not processes:
            raise ValueError("replicas need at least one service process")
        self.processes = list(processes)

    @classmethod
    def alike(cls, env: dict[str, str], log: Path, n: int) -> Replicas:
        """``n`` processes with the same settings, not started; one logs to ``log``, several to
        ``log`` numbered (``service.log`` -> ``service-0.log``, ``service-1.log``, ...)."""
        if n < 1:
            raise ValueError(f"replicas must be >= 1, got {n}")
        if n == 1:
            return cls([ServiceProcess(env, log)])
        return cls([ServiceProcess(env, log.with_name(f"{log.stem}-{i}{log.suffix}")) for i in range(n)])

    def start(self, ready_timeout_s: float) -> Replicas:
        """Start every process, then wait for each to report ready (they load side by side)."""
        try:
            for process in self.processes:
                process.launch()
            for process in self.processes:
                process.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    @property
    def ports(self) -> list[int]:
        return [p.port for p in self.processes]

    @property
    def ready_s(self) -> float:
        """Seconds until the last replica was ready (the first window starts then)."""
        return max(p.ready_s or 0.0 for p in self.processes)

    def rss_bytes(self) -> tuple[int, int]:
        """The largest replica's resident memory now and at peak."""
        readings = [p.rss_bytes() for p in self.processes]
        return max(r[0] for r in readings), max(r[1] for r in readings)

    def closed_loop(self, script: Path, concurrency: int, duration_s: float) -> dict[str, Any]:
        """One ``wrk`` per replica at once, ``concurrency`` connections in all; the merged summary."""
        runs = [
            subprocess.Popen(wrk_command(p.url, script, c, duration_s), stdout=subprocess.PIPE, text=True)
            for p, c in zip(self.processes, split_connections(concurrency, len(self.processes)), strict=True)
        ]
        outputs = [run.communicate(timeout=duration_s + 60)[0] for run in runs]
        for run in runs:
            if run.returncode:
                raise subprocess.CalledProcessError(run.returncode, run.args)
        return merge_wrk([parse_wrk(out) for out in outputs])
