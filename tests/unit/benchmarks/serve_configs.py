"""The smallest ``genret bench serve`` config a test runs against a real service (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.serve import BenchConfig


def tiny_bench_config(workdir: Path, **overrides: Any) -> BenchConfig:
    """300 items, 2 levels, D = 16, one 1-second closed-loop level at 4 connections, no open loop."""
    fields: dict[str, Any] = {
        "items": 300,
        "levels": 2,
        "branching": 0,
        "dim": 16,
        "concurrency": (4,),
        "duration_s": 1.0,
        "k": 5,
        "beam_size": 4,
        "max_batch_size": 8,
        "modes": ("generative",),
        "workdir": workdir,
        "open_loop": (),
    }
    return BenchConfig(**{**fields, **overrides})
