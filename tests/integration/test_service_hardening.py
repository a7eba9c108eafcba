"""Server hardening against a real uvicorn process and raw sockets: clients that stall mid-headers or
mid-body are cut off, the connection cap answers 503, shutdown does not wait for a stalled upload,
production defaults keep /docs, debug and the admin API closed, start-up mistakes are one line,
and a Redis password with '@' and '/' works."""

from __future__ import annotations

import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.launcher import ServiceProcess, free_port
from tests.integration.conftest import RedisServer, ServiceFactory

pytestmark = pytest.mark.integration

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
SLACK_S = 3.0  # scheduling on a loaded machine: a timeout fires within this of its setting
HALF_HEADERS = b"POST /v1/retrieve HTTP/1.1\r\nHost: test\r\nContent-Type: appl"
BODY = b'{"history": ["item0001", "item0002"], "k": 3}'
HEADERS = b"POST /v1/retrieve HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


@pytest.fixture(scope="module")
def guarded(start_service: ServiceFactory, bundle_dir: Path) -> ServiceProcess:
    return start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "GENRET_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        }
    )


def connect(service: ServiceProcess) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", service.port), timeout=HEADER_TIMEOUT_S + BODY_TIMEOUT_S + SLACK_S
    )
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    started = time.monotonic()
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def test_a_client_stalled_mid_headers_gets_408_and_is_closed(guarded: ServiceProcess) -> None:
    with connect(guarded) as sock:
        sock.sendall(HALF_HEADERS)
        answer, waited = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"header_timeout_s" in answer
    assert HEADER_TIMEOUT_S * 0.9 <= waited <= HEADER_TIMEOUT_S + SLACK_S


def test_trickling_header_bytes_does_not_extend_the_deadline(guarded: ServiceProcess) -> None:
    """A slowloris client sends a byte now and then; the deadline runs from the request's first byte."""
    with connect(guarded) as sock:
        sock.sendall(HALF_HEADERS)
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S:
            ready, _, _ = select.select([sock], [], [], HEADER_TIMEOUT_S / 5)
            if ready:
                answer, _ = read_until_closed(sock)
                break
            sock.sendall(b"x")
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert waited <= HEADER_TIMEOUT_S + SLACK_S


def test_a_pipelined_request_stalled_mid_headers_is_cut_after_the_first_answer(
    guarded: ServiceProcess,
) -> None:
    with connect(guarded) as sock:
        sock.sendall(HEADERS % len(BODY) + BODY + HALF_HEADERS)
        answer, waited = read_until_closed(sock)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"408"], answer  # responses back to back
    assert waited <= HEADER_TIMEOUT_S * 2 + SLACK_S


def test_a_client_stalled_mid_body_gets_408_and_is_closed(guarded: ServiceProcess) -> None:
    with connect(guarded) as sock:
        sock.sendall(HEADERS % len(BODY) + BODY[:10])
        answer, waited = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body_timeout_s" in answer
    assert BODY_TIMEOUT_S * 0.9 <= waited <= BODY_TIMEOUT_S + SLACK_S


def test_an_idle_connection_is_closed_without_an_answer(guarded: ServiceProcess) -> None:
    with connect(guarded) as sock:
        answer, waited = read_until_closed(sock)
    assert answer == b"" and waited <= HEADER_TIMEOUT_S + SLACK_S


def test_a_slow_but_timely_client_is_answered(guarded: ServiceProcess) -> None:
    """The guard cuts stalls only: a body that arrives in two parts within the timeout gets its 200."""
    with connect(guarded) as sock:
        sock.sendall(HEADERS % len(BODY) + BODY[:10])
        time.sleep(BODY_TIMEOUT_S / 3)
        sock.sendall(BODY[10:])
        status = sock.recv(65536).split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 200 OK"
    metrics = httpx.get(f"{guarded.url}/metrics").text
    assert 'genret_errors_total{kind="header_timeout"}' in metrics
    assert 'genret_errors_total{kind="body_timeout"}' in metrics


def test_past_the_connection_cap_requests_get_503(start_service: ServiceFactory, bundle_dir: Path) -> None:
    cap = 4
    service = start_service({"GENRET_BUNDLE_PATH": str(bundle_dir), "GENRET_MAX_CONNECTIONS": str(cap)})
    idle = [connect(service) for _ in range(cap)]
    try:
        time.sleep(0.2)  # the server has accepted them
        over = httpx.post(f"{service.url}/v1/retrieve", json={"history": ["item0001"]}, timeout=10)
        assert over.status_code == 503, over.text
        assert over.json()["kind"] == "overloaded" and f"max_connections={cap}" in over.json()["message"]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert (
        httpx.post(f"{service.url}/v1/retrieve", json={"history": ["item0001"]}, timeout=10).status_code
        == 200
    )


def test_shutdown_does_not_wait_for_a_stalled_upload(start_service: ServiceFactory, bundle_dir: Path) -> None:
    grace_s = 30
    service = start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_BODY_TIMEOUT_S": "120",  # longer than the test: only the shutdown can cut it
            "GENRET_SHUTDOWN_GRACE_S": str(grace_s),
        }
    )
    assert service.proc is not None
    with connect(service) as sock:
        sock.settimeout(grace_s)
        sock.sendall(HEADERS % len(BODY) + BODY[:10])
        time.sleep(0.3)
        started = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        answer, _ = read_until_closed(sock)
        code = service.proc.wait(timeout=grace_s)
        took = time.monotonic() - started
    assert code == 0
    assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer
    assert took < grace_s / 3, f"shutdown took {took:.1f}s with a stalled upload"


def test_production_defaults_keep_docs_debug_and_admin_closed(
    start_service: ServiceFactory, bundle_dir: Path
) -> None:
    service = start_service(
        {"GENRET_BUNDLE_PATH": str(bundle_dir), "GENRET_ENV": "prod", "GENRET_ADMIN_TOKEN": ""}
    )
    with httpx.Client(base_url=service.url, timeout=10) as client:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert client.get(path).status_code == 404, path
        debug = client.post("/v1/retrieve", json={"history": ["item0001"], "debug": True})
        assert debug.status_code == 422 and debug.json()["detail"][0]["loc"] == ["body", "debug"]
        assert client.post("/v1/retrieve", json={"history": ["item0001"]}).status_code == 200
        assert client.post("/admin/reload").status_code == 404
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{service.admin_url}/admin/reload", timeout=5)  # nothing listens there


def serve_once(
    args: list[str], env: dict[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={"PATH": "/usr/bin:/bin", "GENRET_HOST": "127.0.0.1", **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_startup_mistakes_are_one_line_naming_the_setting(
    bundle_dir: Path, busy_port: int, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--bundle", "/nonexistent"], {}, "GENRET_BUNDLE_PATH=/nonexistent (--bundle): no such directory"),
        (["--bundle", str(empty)], {}, f"GENRET_BUNDLE_PATH={empty} holds no bundle"),
        (["--bundle", str(bundle_dir)], {"GENRET_MAX_K": "0"}, "GENRET_MAX_K=0: Input should be greater"),
        (["--bundle", str(bundle_dir)], {"GENRET_MAX_KK": "3"}, "did you mean GENRET_MAX_K?"),
        (["--bundle", str(bundle_dir), "--port", str(busy_port)], {}, f"GENRET_PORT={busy_port} (--port)"),
    ]
    for args, env, expected in cases:
        got = serve_once(args, env)
        lines = got.stderr.strip().splitlines()
        assert got.returncode == 2, (args, env, got.stderr)
        assert len(lines) == 1 and expected in lines[0], (args, env, got.stderr)
        assert "Traceback" not in got.stdout + got.stderr


def test_a_bundle_refused_at_load_is_one_line_without_traceback(bundle_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    with open(broken / "decoder.onnx", "ab") as fh:
        fh.write(b"tampered")  # its sha256 no longer matches the manifest
    got = serve_once(
        ["--bundle", str(broken), "--port", str(free_port())], {"GENRET_ADMIN_PORT": str(free_port())}
    )
    output = got.stdout + got.stderr
    assert got.returncode != 0 and "Traceback" not in output, output
    assert [line for line in output.splitlines() if "decoder.onnx" in line], output


def test_a_redis_password_with_at_and_slash_works(
    start_service: ServiceFactory, bundle_dir: Path, tmp_path: Path
) -> None:
    password = "p@ss/w:rd#1"
    server = RedisServer(tmp_path, password=password).start()
    try:
        service = start_service(
            {
                "GENRET_BUNDLE_PATH": str(bundle_dir),
                "GENRET_REDIS_HOST": "127.0.0.1",
                "GENRET_REDIS_PORT": str(server.port),
                "GENRET_REDIS_PASSWORD": password,
            }
        )
        got = httpx.post(
            f"{service.url}/v1/retrieve", json={"user_id": "u", "history": ["item0005"]}, timeout=10
        )
        assert got.status_code == 200
        cache = httpx.get(f"{service.url}/readyz").json()["cache"]
        assert cache["kind"] == "redis" and cache["breaker"] == "closed" and cache["last_error"] is None
        deadline = time.monotonic() + 5
        while server.client().dbsize() == 0:  # the state is written after the answer
            assert time.monotonic() < deadline, "nothing was written to Redis"
            time.sleep(0.05)
    finally:
        server.stop()
