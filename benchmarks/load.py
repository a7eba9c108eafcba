"""Open-loop HTTP load for ``genret bench serve``: requests sent at scheduled times, not when a
connection is free.

A closed-loop driver (wrk: each connection sends its next request when the previous answer
arrives) slows down with the server, so it never sees the queue a user arriving at a given rate
would. Here a scheduler fixes the send times up front — evenly spaced (``fixed``) or a Poisson
process (``poisson``: ``n = rate × duration`` arrival times uniform over the window and sorted, a
Poisson process conditioned on its count, so every row offers exactly its target) — and each
request's latency runs from its *scheduled* time to its last response byte, so any delay in the
generator or in getting a connection counts against the service, never hides it.

The client is a small HTTP/1.1 keep-alive client on asyncio streams (uvloop when installed), with
requests pre-encoded as bytes: on a 2-core machine shared with the service, httpx's per-request
overhead is a large share of one core. Connections come from a pool that grows on demand up to
``max_connections``; when every one is busy a send waits, its lag counted in its latency.

A row is valid only if the achieved rate (requests sent ÷ the time the sends took, at least the
window) is at least :data:`MIN_ACHIEVED_FRACTION` of the target. :func:`measure_ceiling` finds the
generator's own limit against :func:`serve_trivial` (a fixed 200 answer from a separate process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import numpy as np

from benchmarks.launcher import free_port

Arrivals = Literal["fixed", "poisson"]
MIN_ACHIEVED_FRACTION = 0.98
T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is installed (uvicorn[standard] brings it), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def send_times(rate: float, duration_s: float, arrivals: Arrivals, seed: int = 0) -> np.ndarray:
    """``[n]`` send offsets in seconds from the start, ``n = round(rate × duration_s)``, sorted."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be > 0, got {rate}, {duration_s}")
    n = max(1, round(rate * duration_s))
    if arrivals == "fixed":
        return np.arange(n, dtype=np.float64) / rate
    if arrivals == "poisson":
        return np.sort(np.random.default_rng(seed).uniform(0.0, duration_s, n))
    raise ValueError(f"arrivals must be 'fixed' or 'poisson', got {arrivals!r}")


def http_post(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    """One pre-encoded HTTP/1.1 keep-alive POST with a JSON body."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def retrieve_bodies(
    bundle: Path, count: int, *, k: int, beam_size: int, seed: int, user_prefix: str, users: int
) -> list[bytes]:
    """``count`` pre-encoded ``POST /v1/retrieve`` requests for ``bundle``'s items, each with a random
    history of 3..20 items; request ``i`` comes from user ``{user_prefix}{i % users}``."""
    with np.load(bundle / "items.npz", allow_pickle=False) as data:
        item_ids = data["item_ids"]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        history = item_ids[rng.integers(1, len(item_ids), size=int(rng.integers(3, 21)))].tolist()
        body = {"user_id": f"{user_prefix}{i % users}", "history": history, "k": k, "beam_size": beam_size}
        out.append(http_post("/v1/retrieve", json.dumps(body).encode()))
    return out


class Connection:
    """One keep-alive connection: send a request, read one response (Content-Length framed)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """-> (status code, whether the server keeps the connection open)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, keep = -1, True
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
        if length < 0:
            raise ValueError(f"response without Content-Length: {lines[0]}")
        await self.reader.readexactly(length)
        return status, keep

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Idle keep-alive connections; a new one is opened when none is idle, up to ``limit``."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.opened = 0
        self.peak = 0
        self._idle: asyncio.Queue[Connection] = asyncio.Queue()

    async def warm(self, count: int) -> None:
        """Open ``count`` connections up front, so the first sends pay no connect."""
        conns = await asyncio.gather(*(Connection.open(self.host, self.port) for _ in range(count)))
        self.opened = self.peak = len(conns)
        for conn in conns:
            self._idle.put_nowait(conn)

    async def acquire(self) -> Connection:
        if self._idle.empty() and self.opened < self.limit:
            self.opened += 1
            try:
                conn = await Connection.open(self.host, self.port)
            except BaseException:
                self.opened -= 1
                raise
            self.peak = max(self.peak, self.opened)
            return conn
        return await self._idle.get()

    def release(self, conn: Connection, reusable: bool) -> None:
        if reusable:
            self._idle.put_nowait(conn)
        else:
            conn.close()
            self.opened -= 1

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get_nowait().close()


@dataclass(frozen=True)
class OpenLoopStats:
    target_qps: float
    achieved_qps: float
    sent: int
    errors: int  # non-2xx, socket errors and timeouts
    p50_ms: float  # from the scheduled send time to the response, over every answered request
    p99_ms: float
    send_lag_p99_ms: float  # actual minus scheduled send time (generator or pool delay)
    connections: int  # peak open connections

    @property
    def valid(self) -> bool:
        return self.achieved_qps >= MIN_ACHIEVED_FRACTION * self.target_qps


async def _send(
    pool: Pool, request: bytes, scheduled: float, timeout_s: float, out: dict[str, list[float]]
) -> None:
    conn: Connection | None = None
    reusable = False
    try:
        async with asyncio.timeout(timeout_s):
            conn = await pool.acquire()
            now = time.perf_counter()  # not loop.time(): uvloop's clock ticks in whole milliseconds
            out["sent_at"].append(now)
            out["lag"].append(now - scheduled)
            status, reusable = await conn.exchange(request)
        out["latency"].append(time.perf_counter() - scheduled)
        if 200 <= status < 300:
            out["ok"].append(1.0)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        reusable = False
    finally:
        if conn is not None:
            pool.release(conn, reusable)


async def open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    offsets: np.ndarray,
    window_s: float,
    *,
    timeout_s: float = 10.0,
    warm_connections: int = 32,
    max_connections: int = 1024,
    latencies: list[float] | None = None,
) -> OpenLoopStats:
    """Send ``requests[i % len(requests)]`` at ``offsets[i]`` seconds (``[n]``, sorted, within
    ``window_s``) from the start; the target rate is ``n / window_s``. ``latencies``: extended with
    every answered request's latency in seconds (several generators' rows merge exactly)."""
    loop = asyncio.get_running_loop()
    pool = Pool(host, port, max_connections)
    await pool.warm(min(warm_connections, max_connections))
    out: dict[str, list[float]] = {"sent_at": [], "lag": [], "latency": [], "ok": []}
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.05
    try:
        for i, offset in enumerate(offsets.tolist()):
            scheduled = start + offset
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(_send(pool, requests[i % len(requests)], scheduled, timeout_s, out))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout_s + 5.0)
    finally:
        for task in tasks:
            task.cancel()
        pool.close()
    sent = len(out["sent_at"])
    if latencies is not None:
        latencies.extend(out["latency"])
    took = max(window_s, (max(out["sent_at"]) - start) if sent else 0.0)
    latency_ms = np.asarray(out["latency"]) * 1000.0
    lag_ms = np.asarray(out["lag"]) * 1000.0
    return OpenLoopStats(
        target_qps=len(offsets) / window_s,
        achieved_qps=sent / took if took > 0 else 0.0,
        sent=sent,
        errors=len(offsets) - len(out["ok"]),  # non-2xx, failed or never answered
        p50_ms=float(np.percentile(latency_ms, 50)) if len(latency_ms) else float("nan"),
        p99_ms=float(np.percentile(latency_ms, 99)) if len(latency_ms) else float("nan"),
        send_lag_p99_ms=float(np.percentile(lag_ms, 99)) if len(lag_ms) else float("nan"),
        connections=pool.peak,
    )


# --------------------------------------------------------------------------- the generator's ceiling
TRIVIAL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _Trivial(asyncio.Protocol):
    """Answers every HTTP/1.1 request (Content-Length framed) with :data:`TRIVIAL_RESPONSE`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(TRIVIAL_RESPONSE)


async def serve_trivial(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Trivial, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def start_trivial_server() -> tuple[subprocess.Popen[bytes], int]:
    """The trivial server in its own process (as the real service is); waits until it accepts."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.load", "--trivial-server", str(port)])
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        try:
            run_loop(Connection.open("127.0.0.1", port)).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the trivial server did not start")


def measure_ceiling(
    rates: Sequence[float] = (1000, 2000, 4000, 8000, 16000), duration_s: float = 2.0
) -> list[OpenLoopStats]:
    """Open-loop runs against the trivial server at rising rates, stopping after the first
    invalid (or erroring) one: the last valid rate is the generator's ceiling on this machine."""
    proc, port = start_trivial_server()
    body = http_post("/v1/retrieve", b'{"history":["1"]}')
    rows: list[OpenLoopStats] = []
    try:
        for rate in rates:
            offsets = send_times(rate, duration_s, "fixed")
            stats = run_loop(open_loop("127.0.0.1", port, [body], offsets, duration_s))
            rows.append(stats)
            if not stats.valid or stats.errors:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the trivial HTTP server of the ceiling measurement")
    parser.add_argument("--trivial-server", type=int, required=True, help="loopback port")
    run_loop(serve_trivial(parser.parse_args().trivial_server))
