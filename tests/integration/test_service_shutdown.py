"""SIGTERM while requests are in flight: /readyz turns false, new requests get 503, the queued
ones all finish with 200, and the process exits cleanly within the grace period."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ServiceFactory

pytestmark = pytest.mark.integration

IN_FLIGHT = 8
GRACE_S = 30


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, bundle_dir: Path) -> ServiceProcess:
    return start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_MAX_WAIT_MS": "1500",  # requests sit in the batcher long enough to send the signal
            "GENRET_MAX_BATCH_SIZE": "64",
            "GENRET_DEFAULT_DEADLINE_MS": "20000",
            "GENRET_SHUTDOWN_GRACE_S": str(GRACE_S),
        }
    )


def inflight(client: httpx.Client) -> float:
    match = re.search(r"^genret_inflight_requests (\S+)$", client.get("/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


def test_sigterm_with_requests_in_flight_drops_none(service: ServiceProcess) -> None:
    proc = service.proc
    assert proc is not None

    async def main() -> tuple[list[httpx.Response], int, int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
            tasks = [
                asyncio.create_task(
                    client.post("/v1/retrieve", json={"history": [f"item{i + 1:04d}"], "k": 5})
                )
                for i in range(IN_FLIGHT)
            ]
            with httpx.Client(base_url=service.url, timeout=5) as probe:
                deadline = time.monotonic() + 10
                while await asyncio.to_thread(inflight, probe) < IN_FLIGHT:
                    assert time.monotonic() < deadline, "requests never reached the service"
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                ready = await asyncio.to_thread(probe.get, "/readyz")
                late = await asyncio.to_thread(probe.post, "/v1/retrieve", json={"history": ["item0001"]})
            return list(await asyncio.gather(*tasks)), ready.status_code, late.status_code

    responses, ready_status, late_status = asyncio.run(main())
    assert ready_status == 503
    assert late_status == 503
    assert [r.status_code for r in responses] == [200] * IN_FLIGHT
    assert all(len(r.json()["items"]) == 5 for r in responses)
    assert proc.wait(timeout=GRACE_S) == 0
