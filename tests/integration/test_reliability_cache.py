"""Cache faults against a real uvicorn and a real redis-server, under 8 concurrent clients:

* a poisoned cache entry (well framed, wrong width / another bundle's / damaged) under one user's
  key: that user gets 200 with the fault-free answer (recomputed as a miss), nobody else fails,
  the value is counted ``invalid`` and replaced;
* Redis paused with SIGSTOP for 5 s under load: every request still 200 and no slower than the
  cache timeouts allow; the entries written before the pause are still there after it.

Each test prints one ``RELIABILITY {json}`` line (run with ``-s``) for the table in docs/results.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.launcher import ServiceProcess
from service.cache.codec import StateRow, StateSpec, decode_state, encode_state
from tests.integration.conftest import RedisServer, ServiceFactory, body, cache_counts

pytestmark = pytest.mark.integration

CLIENTS = 8
REDIS_TIMEOUT_MS = 50
DEADLINE_MS = 2000  # a request stuck on a stalled Redis would wait this long, then get 504


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, bundle_dir: Path, redis_server: RedisServer) -> ServiceProcess:
    return start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_REDIS_URL": redis_server.url,
            "GENRET_REDIS_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
            "GENRET_BREAKER_FAILURES": "2",
            "GENRET_BREAKER_RESET_S": "0.5",
            "GENRET_MAX_WAIT_MS": "20",  # 8 clients sending together land in one batch
            "GENRET_DEFAULT_DEADLINE_MS": str(DEADLINE_MS),
        }
    )


def report(**fields: Any) -> None:
    print("RELIABILITY " + json.dumps(fields))


def poisons(fingerprint: str, t: int, d: int, dr: int) -> list[tuple[str, bytes]]:
    """Values planted under the victim's key; each is refused by the serving model's spec."""

    def row(width: int) -> StateRow:
        return StateRow(np.ones((t, width), np.float32), np.ones(t, bool), np.ones(dr, np.float32))

    valid_other = encode_state(row(d), StateSpec("another-bundle", t, d, dr))
    return [
        ("wrong width", encode_state(row(16), StateSpec(fingerprint, t, 16, dr))),
        ("another bundle", valid_other),
        ("truncated", encode_state(row(d), StateSpec(fingerprint, t, d, dr))[:-5]),
        ("old format", b"GRS1" + valid_other[4:]),
    ]


def test_poisoned_entry_is_recomputed_and_no_other_client_fails(
    service: ServiceProcess, redis_server: RedisServer, bundle_dir: Path
) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    fingerprint, dims = manifest["fingerprint"], manifest["dims"]
    victim = body("poisoned-user", 7, debug=True)
    redis = redis_server.client()
    with httpx.Client(base_url=service.url, timeout=10) as client:
        clean = client.post("/v1/retrieve", json=victim)
        assert clean.status_code == 200, clean.text
        deadline = time.monotonic() + 5
        while not (keys := redis.keys("genret:*:poisoned-user:*")) and time.monotonic() < deadline:
            time.sleep(0.02)  # the write-back runs after the answer
        (key,) = keys
        before = cache_counts(client)
    t = len(victim["history"])
    spec = StateSpec(fingerprint, t, dims["memory"], dims["query"])
    planted = poisons(fingerprint, t, dims["memory"], dims["query"])
    rounds = 3 * len(planted)
    victim_status: list[int] = []
    victim_batch: list[int] = []
    others: list[int] = []
    wrong_answers = 0

    async def one_round(client: httpx.AsyncClient, r: int) -> None:
        nonlocal wrong_answers
        redis.set(key, planted[r % len(planted)][1])
        reqs = [victim] + [body(f"other-{r}-{i}", 100 * r + i) for i in range(CLIENTS - 1)]
        got = await asyncio.gather(*(client.post("/v1/retrieve", json=b) for b in reqs))
        victim_status.append(got[0].status_code)
        if got[0].status_code == 200:
            data = got[0].json()
            victim_batch.append(data["debug"]["batch_size"])
            wrong_answers += [i["id"] for i in data["items"]] != [i["id"] for i in clean.json()["items"]]
        others.extend(g.status_code for g in got[1:])
        await asyncio.sleep(0.05)  # let the fresh state be written back before the next poison

    async def main() -> None:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            for r in range(rounds):
                await one_round(client, r)

    asyncio.run(main())
    with httpx.Client(base_url=service.url, timeout=10) as client:
        after = cache_counts(client)
    refreshed = redis.get(key)
    report(
        fault="poisoned cache entry (" + ", ".join(name for name, _ in planted) + ")",
        requests=len(victim_status) + len(others),
        fault_status=sorted(set(victim_status)),
        others_non_200=sum(s != 200 for s in others),
        wrong_answers=wrong_answers,
        invalid_counted=after.get("invalid", 0) - before.get("invalid", 0),
        victim_batch_sizes=sorted(set(victim_batch)),
    )
    assert set(victim_status) == {200} and wrong_answers == 0  # recomputed as a miss, same answer
    assert others.count(200) == len(others) == rounds * (CLIENTS - 1)
    assert after.get("invalid", 0) - before.get("invalid", 0) == rounds
    assert max(victim_batch) >= 2  # the poisoned row really shared batches with other users
    assert isinstance(refreshed, bytes)
    decode_state(refreshed, spec)  # the poisoned value was replaced by a valid one


def test_redis_paused_for_5s_under_load_every_request_succeeds_in_bounded_time(
    service: ServiceProcess, redis_server: RedisServer
) -> None:
    assert redis_server.proc is not None
    redis = redis_server.client()
    pause_s, before_s, after_s = 5.0, 1.0, 1.5
    results: list[tuple[float, int, float]] = []  # (sent at, status, seconds)
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        i = 0
        while not stop.is_set():
            # users come back: about half the requests are cache hits when Redis answers
            req = body(f"pause-{c}-{i % 6}", c * 1000 + i % 6)
            sent = time.monotonic()
            try:
                status = (await client.post("/v1/retrieve", json=req)).status_code
            except httpx.HTTPError:
                status = 0
            results.append((sent, status, time.monotonic() - sent))
            i += 1

    async def main() -> tuple[float, float, dict[str, Any]]:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            loops = [asyncio.create_task(client_loop(client, c)) for c in range(CLIENTS)]
            await asyncio.sleep(before_s)
            keys_before = set(redis.keys("genret:*"))
            paused_at = time.monotonic()
            os.kill(redis_server.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            try:
                await asyncio.sleep(pause_s / 2)
                mid = (await client.get("/readyz")).json()
                await asyncio.sleep(pause_s / 2)
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
            resumed_at = time.monotonic()
            await asyncio.sleep(after_s)
            stop.set()
            await asyncio.gather(*loops)
            mid["keys_before"] = keys_before
            return paused_at, resumed_at, mid

    paused_at, resumed_at, mid = asyncio.run(main())
    during = [(s, d) for sent, s, d in results if paused_at <= sent < resumed_at]
    lost = len(mid["keys_before"] - set(redis.keys("genret:*")))
    worst = max(d for _, d in during)
    report(
        fault="Redis paused (SIGSTOP) 5 s under load",
        requests=len(results),
        fault_requests_during_pause=len(during),
        statuses=sorted({s for _, s, _ in results}),
        others_non_200=sum(s != 200 for _, s, _ in results),
        worst_latency_during_pause_s=round(worst, 3),
        p99_latency_during_pause_s=round(float(np.percentile([d for _, d in during], 99)), 3),
        breaker_mid_pause=mid["cache"]["breaker"],
        cache_keys_lost=lost,
    )
    assert len(during) >= 5 * CLIENTS  # the load really ran through the pause
    assert {s for _, s, _ in results} == {200}
    # bounded by the cache timeouts (a stalled MGET is cut after 2 x GENRET_REDIS_TIMEOUT_MS, then
    # the breaker stops asking), far below the deadline a request would hit waiting on Redis
    assert worst < DEADLINE_MS / 1000 / 2, worst
    assert mid["cache"]["breaker"] in ("open", "half_open")
    assert lost == 0  # what was cached before the pause is still there
