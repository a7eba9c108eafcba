"""The closed-loop load generator: one ``wrk`` run (1 thread, a Lua script) and its JSON summary line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def wrk_command(url: str, script: Path, concurrency: int, duration_s: float) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"{url}/v1/retrieve",
    ]


def parse_wrk(out: str) -> dict[str, Any]:
    """The ``WRKJSON`` line the bench's Lua ``done`` hook prints."""
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            return dict(json.loads(line[len("WRKJSON ") :]))
    raise RuntimeError(f"wrk printed no summary:\n{out}")


def run_wrk(url: str, script: Path, concurrency: int, duration_s: float) -> dict[str, Any]:
    cmd = wrk_command(url, script, concurrency, duration_s)
    return parse_wrk(
        subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration_s + 60).stdout
    )
