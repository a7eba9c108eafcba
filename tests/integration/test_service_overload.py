"""A burst beyond the queue: the overflow gets 429 with Retry-After at once, nothing gets a 5xx."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ServiceFactory

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, bundle_dir: Path) -> ServiceProcess:
    return start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_QUEUE_SIZE": "2",
            "GENRET_MAX_BATCH_SIZE": "1",
            "GENRET_MAX_WAIT_MS": "0",
            "GENRET_RETRY_AFTER_S": "2",
            "GENRET_LOCAL_CACHE_ENTRIES": "0",
        }
    )


def test_burst_beyond_the_queue_gets_429_and_no_5xx(service: ServiceProcess) -> None:
    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits) as client:
            bodies = [
                {"user_id": f"u{i}", "history": [f"item{1 + i:04d}"], "k": 5, "beam_size": 64}
                for i in range(80)
            ]
            return list(await asyncio.gather(*(client.post("/v1/retrieve", json=b) for b in bodies)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert not [c for c in codes if c >= 500], codes
    assert codes.count(429) > 0, codes
    assert codes.count(200) > 0, codes
    assert set(codes) <= {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "2"
            assert r.json()["kind"] == "queue_full"
    with httpx.Client(base_url=service.url) as client:
        assert 'genret_errors_total{kind="queue_full"}' in client.get("/metrics").text
        assert client.get("/readyz").status_code == 200  # overload is not unreadiness
