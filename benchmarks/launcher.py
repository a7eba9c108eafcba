"""Start `genret serve` as a subprocess on a free loopback port, wait until ready, stop it.

Used by the integration tests and by ``genret bench serve``: a real uvicorn process, polled on
``/readyz`` until a deadline (failing fast if it exits), terminate-then-kill on stop. The public
API is at ``url``; the admin API (served only when ``GENRET_ADMIN_TOKEN`` is in ``env``) at
``admin_url``, on a free port of its own so that several services can run side by side.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

ONE_CLIENT_LOAD: dict[str, str] = {
    "GENRET_MAX_CONNECTIONS_PER_CLIENT": "100000",
    "GENRET_MAX_INFLIGHT_PER_CLIENT": "100000",
}
"""Service settings for a benchmark's load generator: one client address standing for many users, so
the per-client connection and in-flight shares must not apply."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(
        self, env: dict[str, str], log_path: Path, port: int | None = None, admin_port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_port = admin_port or free_port()
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log_path = log_path
        self._env = {
            **os.environ,
            **env,
            "GENRET_HOST": "127.0.0.1",
            "GENRET_PORT": str(self.port),
            "GENRET_ADMIN_HOST": "127.0.0.1",
            "GENRET_ADMIN_PORT": str(self.admin_port),
        }
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None  # seconds from the process start to the first ready /readyz
        self._launched = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout_s: float = 120.0) -> ServiceProcess:
        self.launch()
        self.wait_ready(ready_timeout_s)
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (:meth:`wait_ready` waits)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._launched = time.monotonic()

    def wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"service exited with {self.proc.returncode} during startup:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    self.ready_s = time.monotonic() - self._launched
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # bench serve's first window starts at ready: find it promptly
        self.stop()
        raise TimeoutError(f"service not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def rss_bytes(self) -> tuple[int, int]:
        """Resident memory now and at peak (VmRSS, VmHWM) of the service process."""
        fields: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields.get("VmRSS", 0), fields.get("VmHWM", 0)
