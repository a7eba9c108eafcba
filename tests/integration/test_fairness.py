"""Fairness between clients against a real uvicorn (service/http/guard.py), with clients on distinct
loopback addresses (127.0.0.1 well behaved, 127.0.0.2 abusive, 127.0.0.3 a trusted proxy):

* one client holding connections past the whole connection cap (1,100 slowloris sockets, reopened
  when closed) keeps at most its per-client share; a well-behaved client's p99 stays near its p99
  alone in the same run, with 0 non-200s;
* one client with more requests running than its in-flight share gets 429 ``client_limit`` for the
  excess while another client is answered 200;
* behind a trusted proxy the client is the address the proxy reports in X-Forwarded-For; a client
  that is not a trusted proxy cannot choose its address by writing that header.

Each test prints one ``RELIABILITY {json}`` line (run with ``-s``) for the table in docs/results.md.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_HEADERS, ServiceFactory

pytestmark = pytest.mark.integration

ABUSER, PROXY = "127.0.0.2", "127.0.0.3"
HALF_HEADERS = b"POST /v1/retrieve HTTP/1.1\r\nHost: test\r\nContent-Type: appl"
ABUSE_SOCKETS = 1100  # past max_connections=1024
PER_CLIENT = 256
REQUESTS = 200
# the goal is 1.5x; the machine running this test also runs the service and the abuser (2 shared
# cores), so the assertion allows more and the measured ratio is printed for the notes
P99_FACTOR = 3.0


def body(i: int) -> dict[str, Any]:
    return {"user_id": f"good-{i % 20}", "history": [f"item{1 + (i * 7) % 999:04d}", "item0002"], "k": 10}


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def compared(alone: list[float], during: list[float], statuses: list[int]) -> dict[str, Any]:
    """The well-behaved client's figures for a RELIABILITY line: its non-200s and p99 alone / during."""
    return {
        "others_non_200": sum(s != 200 for s in statuses),
        "p99_alone_ms": round(1000 * p99(alone), 1),
        "p99_during_ms": round(1000 * p99(during), 1),
        "ratio": round(p99(during) / p99(alone), 2),
    }


def measure(service: ServiceProcess) -> tuple[list[float], list[int]]:
    """A well-behaved client: REQUESTS sequential requests on one keep-alive connection."""
    latencies, statuses = [], []
    with httpx.Client(base_url=service.url, timeout=10) as client:
        client.post("/v1/retrieve", json=body(0))  # connection up, caches warm
        for i in range(REQUESTS):
            started = time.perf_counter()
            statuses.append(client.post("/v1/retrieve", json=body(i)).status_code)
            latencies.append(time.perf_counter() - started)
    return latencies, statuses


class Slowloris:
    """ABUSE_SOCKETS connections from ABUSER, each with half a request's headers, reopened when closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []
        self.opened = 0
        self.stop = threading.Event()
        self.paused = threading.Event()  # set: stop reopening, so that a count sees what the server keeps
        self.lock = threading.Lock()  # the socket list is read by the test and grown by the thread
        self.thread = threading.Thread(target=self.run, daemon=True)

    def open_one(self) -> socket.socket | None:
        sock = socket.socket()
        sock.setblocking(True)
        sock.settimeout(2)
        try:
            sock.bind((ABUSER, 0))
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(HALF_HEADERS)
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)  # a peek at a socket with nothing to read must not wait (open_count)
        self.opened += 1
        return sock

    def open_count(self) -> int:
        """Sockets the server still holds. One it closed reads as EOF; one it timed out reads as its
        408 (the abuser never reads, so that answer stays buffered and a peek never reaches the EOF
        behind it): the server sends a slowloris socket nothing else, so any byte means let go."""
        with self.lock:
            return self._count_open()

    def _count_open(self) -> int:
        alive = []
        for sock in self.socks:
            try:
                sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                closed = True  # EOF, or the server's 408
            except BlockingIOError:
                closed = False  # nothing to read: still open
            except OSError:
                closed = True
            if closed:
                sock.close()
            else:
                alive.append(sock)
        self.socks = alive
        return len(alive)

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                missing = 0 if self.paused.is_set() else ABUSE_SOCKETS - self._count_open()
                for _ in range(missing):
                    if (sock := self.open_one()) is not None:
                        self.socks.append(sock)
            self.stop.wait(1.0)

    def __enter__(self) -> Slowloris:
        for _ in range(ABUSE_SOCKETS):
            if (sock := self.open_one()) is not None:
                self.socks.append(sock)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for sock in self.socks:
            sock.close()


def settled_count(abuser: Slowloris, cap: int, timeout_s: float = 15.0) -> int:
    """The abuser's open sockets once the server has caught up with its accept queue: the first
    count at or under ``cap`` within ``timeout_s``, else the last. Connections the kernel completed
    but the server has not accepted yet read as open; on a loaded host the server takes more than
    a second to reach (and close) all of them, so the abuser stops reopening while it is counted
    (otherwise each second's reopened sockets can keep the count above the cap however long it waits)."""
    abuser.paused.set()
    try:
        deadline = time.monotonic() + timeout_s
        time.sleep(1.0)
        count = abuser.open_count()
        while count > cap and time.monotonic() < deadline:
            time.sleep(0.25)
            count = abuser.open_count()
        return count
    finally:
        abuser.paused.clear()


def errors_of(service: ServiceProcess, kind: str) -> float:
    for line in httpx.get(f"{service.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'genret_errors_total{{kind="{kind}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_one_client_past_the_connection_cap_does_not_shut_out_another(
    start_service: ServiceFactory, bundle_dir: Path
) -> None:
    service = start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_MAX_CONNECTIONS": "1024",
            "GENRET_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
        }
    )
    alone, alone_status = measure(service)
    with Slowloris(service.port) as abuser:
        held = settled_count(abuser, PER_CLIENT)
        abused, abused_status = measure(service)
        held_after = settled_count(abuser, PER_CLIENT)
    refused = errors_of(service, "client_connections")
    report = {
        "fault": f"one client holds {ABUSE_SOCKETS} slowloris sockets (cap 1024, {PER_CLIENT} per client)",
        "requests": len(alone) + len(abused),
        "fault_status": f"{held} sockets held, the rest closed at accept ({refused:.0f} refused)",
        **compared(alone, abused, alone_status + abused_status),
    }
    print("RELIABILITY " + json.dumps(report))
    assert set(alone_status) == set(abused_status) == {200}, report
    assert 0 < held <= PER_CLIENT and held_after <= PER_CLIENT and refused > 0, report
    assert p99(abused) <= P99_FACTOR * p99(alone), report


@pytest.fixture(scope="module")
def shared(start_service: ServiceFactory, bundle_dir: Path) -> ServiceProcess:
    return start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_MAX_INFLIGHT_PER_CLIENT": "2",
            "GENRET_TRUSTED_PROXIES": f"{PROXY}/32",
        }
    )


async def burst(
    service: ServiceProcess, local: str, n: int, headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    transport = httpx.AsyncHTTPTransport(local_address=local)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(
        base_url=service.url, timeout=10, transport=transport, limits=limits, headers=headers
    ) as client:
        return list(await asyncio.gather(*(client.post("/v1/retrieve", json=body(i)) for i in range(n))))


def test_a_client_past_its_in_flight_share_gets_429_and_another_is_answered(shared: ServiceProcess) -> None:
    async def main() -> tuple[list[httpx.Response], list[httpx.Response]]:
        abusive = asyncio.create_task(burst(shared, ABUSER, 24))
        good = []
        for _ in range(6):
            good += await burst(shared, "127.0.0.1", 2)
        return await abusive, good

    abusive, good = asyncio.run(main())
    codes = [r.status_code for r in abusive]
    limited = [r for r in abusive if r.status_code == 429]
    report = {
        "fault": "one client sends 24 requests at once (in-flight share 2)",
        "requests": len(abusive) + len(good),
        "fault_status": sorted(set(codes)),
        "others_non_200": sum(r.status_code != 200 for r in good),
    }
    print("RELIABILITY " + json.dumps(report))
    assert set(codes) <= {200, 429} and limited, report
    assert all(r.json()["kind"] == "client_limit" and r.headers["retry-after"] == "1" for r in limited)
    assert all(r.status_code == 200 for r in good), report


def test_behind_a_trusted_proxy_the_client_is_the_forwarded_address(shared: ServiceProcess) -> None:
    async def main() -> dict[str, list[int]]:
        runs = await asyncio.gather(
            # the proxy relays one busy client (1.1.1.1): it is limited as that client
            burst(shared, PROXY, 24, {"X-Forwarded-For": "1.1.1.1"}),
            # an untrusted client writing X-Forwarded-For is keyed by its own address
            burst(shared, ABUSER, 24, {"X-Forwarded-For": "9.9.9.9"}),
        )
        quiet = []
        for _ in range(6):  # another client behind the same proxy, two at a time: within its share
            quiet += await burst(shared, PROXY, 2, {"X-Forwarded-For": "2.2.2.2, 10.0.0.1"})
        return {
            "proxied": [r.status_code for r in runs[0]],
            "spoofed": [r.status_code for r in runs[1]],
            "quiet": [r.status_code for r in quiet],
        }

    got = asyncio.run(main())
    assert 429 in got["proxied"] and set(got["proxied"]) <= {200, 429}, got
    assert 429 in got["spoofed"], got  # its header did not make 24 clients of it
    assert set(got["quiet"]) == {200}, got


ALLOW_IDS = 80_000  # within max_allow_items (100,000): a valid request of about 1 MB
HEAVY_CLIENTS = 4


class HeavySenders:
    """HEAVY_CLIENTS threads on ABUSER, each looping a valid request with an ALLOW_IDS-id ``allow``
    (http.client on pre-encoded bytes: the sockets release the GIL, so they cost this process little)."""

    def __init__(self, port: int) -> None:
        allow = [f"item{1 + (j * 13) % 999:04d}" for j in range(ALLOW_IDS)]
        self.payload = json.dumps({"user_id": "heavy", "history": ["item0003"], "allow": allow}).encode()
        self.port = port
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(HEAVY_CLIENTS)]

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30, source_address=(ABUSER, 0))
        headers = {"Content-Type": "application/json"}
        while not self.stop.is_set():
            conn.request("POST", "/v1/retrieve", body=self.payload, headers=headers)
            response = conn.getresponse()
            response.read()
            self.statuses.append(response.status)
        conn.close()

    def __enter__(self) -> HeavySenders:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def test_clients_sending_maximal_allow_lists_do_not_stall_another(
    start_service: ServiceFactory, bundle_dir: Path
) -> None:
    service = start_service({"GENRET_BUNDLE_PATH": str(bundle_dir)})
    alone, alone_status = measure(service)
    with HeavySenders(service.port) as heavy:
        time.sleep(1.0)
        loaded, loaded_status = measure(service)
    report = {
        "fault": f"{HEAVY_CLIENTS} clients loop valid requests with {ALLOW_IDS:,} allow ids "
        f"({len(heavy.payload) / 1e6:.2f} MB)",
        "requests": len(alone) + len(loaded) + len(heavy.statuses),
        "fault_status": sorted(set(heavy.statuses)),
        "heavy_answered": len(heavy.statuses),
        "p50_alone_ms": round(1000 * statistics.median(alone), 1),
        "p50_during_ms": round(1000 * statistics.median(loaded), 1),
        **compared(alone, loaded, alone_status + loaded_status),
    }
    print("RELIABILITY " + json.dumps(report))
    assert set(alone_status) == set(loaded_status) == {200}, report
    assert set(heavy.statuses) == {200}, report  # valid requests: answered, only never at the others' cost
    assert p99(loaded) <= P99_FACTOR * p99(alone), report


ADMIN_BODY_ITEMS = 85_000  # 64 floats each: a 59 MB delta, within max_admin_body_bytes (64 MiB)


def test_a_large_admin_body_does_not_stall_the_public_port(
    start_service: ServiceFactory, bundle_dir: Path
) -> None:
    """A 59 MB delta posted in a loop to the admin port (refused 422: its vectors have 64 dimensions,
    the bundle 32) while a client sends requests to the public port."""
    service = start_service({"GENRET_BUNDLE_PATH": str(bundle_dir)})
    rng = np.random.default_rng(0)
    vectors = np.round(rng.uniform(-1, 1, (ADMIN_BODY_ITEMS, 64)), 6).tolist()
    payload = json.dumps({"add": [{"id": f"new{i}", "vector": v} for i, v in enumerate(vectors)]}).encode()
    stop, codes = threading.Event(), []

    def post_admin() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", service.admin_port, timeout=120)
        headers = {"Content-Type": "application/json", **ADMIN_HEADERS}
        while not stop.is_set():
            conn.request("POST", "/admin/items", body=payload, headers=headers)
            response = conn.getresponse()
            response.read()
            codes.append(response.status)
        conn.close()

    alone, alone_status = measure(service)
    poster = threading.Thread(target=post_admin, daemon=True)
    poster.start()
    time.sleep(0.5)
    loaded, loaded_status = measure(service)
    stop.set()
    poster.join(timeout=120)
    report = {
        "fault": f"a {len(payload) / 1e6:.0f} MB delta posted in a loop to the admin port",
        "requests": len(alone) + len(loaded) + len(codes),
        "fault_status": sorted(set(codes)),
        **compared(alone, loaded, alone_status + loaded_status),
    }
    print("RELIABILITY " + json.dumps(report))
    assert set(alone_status) == set(loaded_status) == {200}, report
    assert codes and set(codes) == {422}, report
    assert p99(loaded) <= P99_FACTOR * p99(alone), report
