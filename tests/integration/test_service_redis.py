"""The service with a real Redis cache: hits through Redis, then Redis killed mid-run -> still all 200."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import RedisServer, ServiceFactory, cache_counts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, bundle_dir: Path, redis_server: RedisServer) -> ServiceProcess:
    return start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_REDIS_URL": redis_server.url,
            "GENRET_REDIS_TIMEOUT_MS": "50",
            "GENRET_BREAKER_FAILURES": "2",
            "GENRET_BREAKER_RESET_S": "0.5",
        }
    )


def body(i: int) -> dict[str, object]:
    return {
        "user_id": f"user-{i % 7}",
        "history": [f"item{1 + i % 50:04d}", f"item{100 + i % 13:04d}"],
        "k": 5,
    }


def test_states_are_cached_in_redis_and_hits_match_misses(
    service: ServiceProcess, redis_server: RedisServer
) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as client:
        req = {**body(3), "debug": True}
        before = cache_counts(client)
        miss = client.post("/v1/retrieve", json=req).json()
        after_miss = cache_counts(client)
        hit = client.post("/v1/retrieve", json=req).json()
        after_hit = cache_counts(client)
        assert after_miss.get("miss", 0) - before.get("miss", 0) == 1
        assert after_hit.get("hit", 0) - after_miss.get("hit", 0) == 1
        assert "cache" not in hit["debug"] and set(hit["debug"]["timings_ms"]) == set(
            miss["debug"]["timings_ms"]
        )
        assert [i["id"] for i in hit["items"]] == [i["id"] for i in miss["items"]]
        keys = redis_server.client().keys("genret:*")
        assert keys and all(str(k, "utf-8").count(":") == 3 for k in keys if isinstance(k, bytes))
        assert client.get("/readyz").json()["cache"] == {
            "kind": "redis",
            "breaker": "closed",
            "last_error": None,
        }


def test_redis_killed_mid_run_every_request_still_200(
    service: ServiceProcess, redis_server: RedisServer
) -> None:
    statuses: list[int] = []

    async def worker(client: httpx.AsyncClient, start: int) -> None:
        for i in range(start, start + 30):
            statuses.append((await client.post("/v1/retrieve", json=body(i))).status_code)
            if len(statuses) == 40:
                redis_server.kill()

    async def main() -> None:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            await asyncio.gather(*(worker(client, 100 * w) for w in range(6)))

    asyncio.run(main())
    assert redis_server.proc is not None and redis_server.proc.poll() is not None  # it really died mid-run
    assert len(statuses) == 180
    assert set(statuses) == {200}, statuses
    with httpx.Client(base_url=service.url, timeout=10) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200  # Redis is reported, not required
        assert ready.json()["cache"]["breaker"] in ("open", "half_open")
        metrics = client.get("/metrics").text
    assert 'genret_cache_results_total{result="error"}' in metrics
