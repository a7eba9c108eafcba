"""Reloads against a real uvicorn: 20 reloads under 8 clients with zero failed requests and the
server's RSS stable within 10 %; a reload that unloads a model, one refused for a bad model name
and one refused because it would drop the default model — the serving models keep serving.

The admin API is reached on its own port (``service.admin_url``, ``ADMIN_HEADERS`` from conftest).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_HEADERS, ServiceFactory, admin_client

pytestmark = pytest.mark.integration

CLIENTS = 8
RELOADS = 20
WARMUP_RELOADS = 2


@pytest.fixture(scope="module")
def served(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliability-reload") / "bundles"
    root.mkdir()
    (root / "main").symlink_to(bundle_dir)
    return root


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, served: Path) -> ServiceProcess:
    return start_service({"GENRET_BUNDLE_PATH": str(served), "GENRET_DEFAULT_MODEL": "main"})


def body(i: int) -> dict[str, Any]:
    return {"user_id": f"user-{i % 50}", "history": [f"item{1 + (i * 7 + j) % 1000:04d}" for j in range(4)]}


def model_names(service: ServiceProcess) -> list[str]:
    return [m["name"] for m in httpx.get(f"{service.url}/v1/models", timeout=10).json()["models"]]


def test_20_reloads_under_8_clients_keep_rss_stable_and_fail_nothing(service: ServiceProcess) -> None:
    statuses: list[int] = []
    reload_statuses: list[int] = []
    rss: dict[str, int] = {}
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        i = c
        while not stop.is_set():
            try:
                statuses.append((await client.post("/v1/retrieve", json=body(i))).status_code)
            except httpx.HTTPError:
                statuses.append(0)
            i += CLIENTS

    async def reloads(admin: httpx.AsyncClient) -> None:
        await asyncio.sleep(1.0)  # traffic first: allocator arenas, caches and batches warm up
        for n in range(WARMUP_RELOADS + RELOADS):
            if n == WARMUP_RELOADS:
                rss["warm"] = service.rss_bytes()[0]
            reload_statuses.append((await admin.post("/admin/reload")).status_code)
        await asyncio.sleep(0.5)
        rss["end"], rss["peak"] = service.rss_bytes()
        stop.set()

    async def main() -> None:
        async with (
            httpx.AsyncClient(base_url=service.url, timeout=30) as client,
            httpx.AsyncClient(base_url=service.admin_url, headers=ADMIN_HEADERS, timeout=60) as admin,
        ):
            loops = [asyncio.create_task(client_loop(client, c)) for c in range(CLIENTS)]
            await reloads(admin)
            await asyncio.gather(*loops)

    started = time.monotonic()
    asyncio.run(main())
    growth = rss["end"] / rss["warm"] - 1
    print(
        "RELIABILITY "
        + json.dumps(
            {
                "fault": f"{RELOADS} reloads (after {WARMUP_RELOADS} warm-up reloads) under {CLIENTS} clients",
                "requests": len(statuses),
                "reload_statuses": sorted(set(reload_statuses)),
                "others_non_200": sum(s != 200 for s in statuses),
                "rss_warm_mib": round(rss["warm"] / 2**20, 1),
                "rss_end_mib": round(rss["end"] / 2**20, 1),
                "rss_peak_mib": round(rss["peak"] / 2**20, 1),
                "rss_growth_pct": round(100 * growth, 2),
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )
    assert set(reload_statuses) == {200}
    assert statuses and set(statuses) == {200}
    assert abs(growth) <= 0.10, rss


def test_reload_unloads_a_removed_model_and_refuses_bad_names_and_a_lost_default(
    service: ServiceProcess, served: Path, bundle_dir: Path
) -> None:
    with admin_client(service, timeout_s=60) as client:
        (served / "extra").symlink_to(bundle_dir)
        added = client.post("/admin/reload", json={"model": "extra"})
        assert added.status_code == 200 and model_names(service) == ["extra", "main"], added.text

        (served / "extra").unlink()
        removed = client.post("/admin/reload")
        assert removed.status_code == 200, removed.text
        assert {o["name"]: o["removed"] for o in removed.json()["reloaded"]}["extra"] is True
        assert model_names(service) == ["main"]
        gone = httpx.post(f"{service.url}/v1/retrieve", json={**body(1), "model": "extra"}, timeout=10)
        assert gone.status_code == 404

        (served / "Bad_Name").symlink_to(bundle_dir)
        try:
            bad = client.post("/admin/reload")  # reported; the other bundles still reload
            assert bad.status_code == 200, bad.text
            refused = {o["name"]: o.get("refused") for o in bad.json()["reloaded"]}
            assert "'Bad_Name'" in refused["Bad_Name"] and refused["main"] is None, bad.text
        finally:
            (served / "Bad_Name").unlink()

        os.replace(served / "main", served / ".main-aside")  # the default model's bundle leaves
        try:
            (served / "other").symlink_to(bundle_dir)
            lost = client.post("/admin/reload")
            assert lost.status_code == 409 and lost.json()["kind"] == "reload_conflict", lost.text
            assert "GENRET_DEFAULT_MODEL='main'" in lost.json()["message"]
        finally:
            os.replace(served / ".main-aside", served / "main")
            (served / "other").unlink()
        assert model_names(service) == ["main"]  # nothing was swapped
        ok = httpx.post(f"{service.url}/v1/retrieve", json=body(2), timeout=10)
        assert ok.status_code == 200 and ok.json()["model"]["name"] == "main"
