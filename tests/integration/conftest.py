"""Real servers for the integration tests: redis-server and `genret serve` (uvicorn) on free loopback ports.

* ``bundle_dir`` (session): a small synthetic bundle (1000 items, 3 levels of 10), built once.
* ``redis_server`` (module): a throwaway redis-server without persistence, stopped on teardown.
* ``start_service`` (module): starts one service process with the given ``GENRET_*`` env, polls
  ``/readyz`` until a deadline (failing fast if the process exits), terminate-then-kill on teardown.
  It returns a ``ServiceProcess``: ``service.url`` is the public API (``/v1/*``, ``/readyz``,
  ``/metrics``), ``service.admin_url`` the admin API (``/admin/*``) on its own port, which needs
  ``ADMIN_HEADERS`` (bearer ``ADMIN_TOKEN``)::

      service = start_service({"GENRET_BUNDLE_PATH": str(bundle_dir)})
      httpx.post(f"{service.admin_url}/admin/reload", headers=ADMIN_HEADERS)
      with admin_client(service) as admin: admin.post("/admin/reload")

  ``GENRET_ENV=test`` (``/docs`` and ``debug`` on). Pass ``{"GENRET_ADMIN_TOKEN": ""}`` for a
  service without admin API, ``{"GENRET_ENV": "prod"}`` for the production defaults.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from benchmarks.launcher import ServiceProcess, free_port

BUNDLE_ITEMS = 1000
BUNDLE_BRANCHING = 10
BUNDLE_LEVELS = 3
ADMIN_TOKEN = "integration-test-admin-token"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def admin_client(service: ServiceProcess, timeout_s: float = 30.0) -> httpx.Client:
    """An httpx client for ``service``'s admin port that sends the admin token."""
    return httpx.Client(base_url=service.admin_url, headers=ADMIN_HEADERS, timeout=timeout_s)


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"  # without the password: see ``password``
        self.password = password
        self._workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._workdir),
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server on port {self.port} not answering after {timeout_s}s")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=1.0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=5)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("bundles") / "small"
    return make_synthetic_bundle(
        out, BUNDLE_ITEMS, BUNDLE_BRANCHING, BUNDLE_LEVELS, dim=32, seed=0, num_layers=1
    )


def resign_bundle(src: Path, dst: Path, *, version: str, negate_items: bool) -> Path:
    """Copy a bundle as a new version; with ``negate_items`` its item table (and so its rankings) changes.

    Rewrites the sizes, checksums and fingerprint in the manifest the way the exporter does.
    """
    from models.bundle.manifest import bundle_fingerprint, file_sha256

    shutil.copytree(src, dst)
    if negate_items:
        with np.load(dst / "items.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        arrays["item_emb"] = -arrays["item_emb"]
        with open(dst / "items.npz", "wb") as fh:
            np.savez(fh, **arrays)
    manifest = json.loads((dst / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"] = file_sha256(dst / name)
        entry["bytes"] = (dst / name).stat().st_size
    manifest["fingerprint"] = bundle_fingerprint({n: e["sha256"] for n, e in manifest["files"].items()})
    manifest["version"] = version
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


ServiceFactory = Callable[[dict[str, str]], ServiceProcess]


@pytest.fixture(scope="module")
def start_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceFactory]:
    started: list[ServiceProcess] = []
    logs = tmp_path_factory.mktemp("service-logs")

    def start(env: dict[str, str]) -> ServiceProcess:
        base = {
            "GENRET_ENV": "test",
            "GENRET_ADMIN_TOKEN": ADMIN_TOKEN,
            "GENRET_DEFAULT_BEAM_SIZE": "10",
            # each service its own delta directory: deltas written beside a shared test bundle would
            # reach every later service of that bundle (a test sharing one passes it explicitly)
            "GENRET_CATALOGUE_DIR": str(tmp_path_factory.mktemp("deltas")),
            # the monitor's sampled shadow runs add cache lookups: off unless a test turns it on
            "GENRET_QUALITY_SAMPLE": "0",
            "OMP_NUM_THREADS": "1",
        }
        service = ServiceProcess({**base, **env}, logs / f"service-{len(started)}.log")
        started.append(service)
        return service.start(ready_timeout_s=180)

    yield start
    for service in started:
        service.stop(timeout_s=20)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something already listens on (a start-up that binds it must fail)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def body(user: str, seed: int, **extra: Any) -> dict[str, Any]:
    """A retrieve body for ``user``: a few history ids of the test bundle, chosen by ``seed``."""
    history = [f"item{1 + (seed * 37 + j * 101) % 1000:04d}" for j in range(3 + seed % 4)]
    return {"user_id": user, "history": history, "k": 10, **extra}


def cache_counts(client: httpx.Client) -> dict[str, float]:
    """``genret_cache_results_total`` by result, from the public ``/metrics``."""
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('genret_cache_results_total{result="'):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('"')[1]] = float(value)
    return out
