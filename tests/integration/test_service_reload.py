"""Hot reload under load: the watched bundle path switches to a new version while clients send
requests -> zero failed requests; a bad bundle is refused and the serving one stays."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_HEADERS, ServiceFactory, resign_bundle

pytestmark = pytest.mark.integration

REQUEST = {"user_id": "reload-user", "history": ["item0007", "item0123", "item0456"], "k": 10}


def point(link: Path, target: Path) -> None:
    """Atomically switch the symlink ``link`` to ``target``."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


@pytest.fixture(scope="module")
def layout(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reload")
    v2 = resign_bundle(bundle_dir, root / "v2", version="v2", negate_items=True)
    bad = resign_bundle(bundle_dir, root / "bad", version="v3", negate_items=False)
    with open(bad / "decoder.onnx", "r+b") as fh:  # damaged after signing: checksum mismatch
        fh.seek(100)
        fh.write(b"\xff\xff\xff\xff")
    served = root / "served"
    served.mkdir()
    point(served / "main", bundle_dir)
    return {"served": served, "link": served / "main", "v1": bundle_dir, "v2": v2, "bad": bad}


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, layout: dict[str, Path]) -> ServiceProcess:
    return start_service({"GENRET_BUNDLE_PATH": str(layout["served"]), "GENRET_RELOAD_POLL_S": "0.3"})


def version(client: httpx.Client) -> str:
    return str(client.get("/v1/models").json()["models"][0]["version"])


def run_load_until(service: ServiceProcess, done: callable) -> list[tuple[int, str]]:  # type: ignore[valid-type]
    """Four clients send requests until ``done()``; returns (status, model version) per request."""
    seen: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            got = await client.post("/v1/retrieve", json=REQUEST)
            seen.append(
                (got.status_code, got.json().get("model", {}).get("version", "") if got.is_success else "")
            )

    async def watch() -> None:
        deadline = time.monotonic() + 120
        while not await asyncio.to_thread(done) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # a little more traffic on the new version
        stop.set()

    async def main() -> None:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            await asyncio.gather(watch(), *(client_loop(client) for _ in range(4)))

    asyncio.run(main())
    return seen


def test_new_version_swaps_in_under_load_with_zero_failed_requests(
    service: ServiceProcess, layout: dict[str, Path]
) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        v1 = version(client)
        before = [i["id"] for i in client.post("/v1/retrieve", json=REQUEST).json()["items"]]
        point(layout["link"], layout["v2"])
        seen = run_load_until(service, lambda: version(client) == "v2")
        after = client.post("/v1/retrieve", json=REQUEST).json()
    assert v1 != "v2"
    assert {status for status, _ in seen} == {200}, [s for s in seen if s[0] != 200][:5]
    assert {ver for _, ver in seen} <= {v1, "v2"} and "v2" in {ver for _, ver in seen}
    assert after["model"]["version"] == "v2"
    assert [i["id"] for i in after["items"]] != before  # the new item table ranks differently


def test_bad_bundle_is_refused_and_the_old_one_keeps_serving(
    service: ServiceProcess, layout: dict[str, Path]
) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        serving = version(client)
        point(layout["link"], layout["bad"])
        refused = httpx.post(f"{service.admin_url}/admin/reload", headers=ADMIN_HEADERS, timeout=30)
        assert refused.status_code == 422, refused.text
        assert refused.json()["kind"] == "bad_bundle" and "decoder.onnx" in refused.json()["message"]
        assert version(client) == serving
        got = client.post("/v1/retrieve", json=REQUEST)
        assert got.status_code == 200 and got.json()["model"]["version"] == serving
        assert client.get("/readyz").status_code == 200
        assert 'genret_reloads_total{result="error"}' in client.get("/metrics").text
