"""One user's bad cache entry, or one bad bundle folder, stays that user's or that folder's problem,
against a real uvicorn and a real redis-server under 8 concurrent clients:

* a well-formed entry of finite 3e38 values (beyond the range the exporter recorded for the
  encoder), a 100 MB value, and a Redis list under one user's key: that user gets 200 with the
  fault-free answer, nobody else fails, the Redis breaker stays closed (no ``error`` lookups), the
  value is counted ``invalid`` and replaced by a valid one;
* a bundle folder with a bad name and a corrupt bundle beside the good ones: a reload reports both
  and loads the rest, and a reload of another model succeeds while they are there.

Each test prints one ``RELIABILITY {json}`` line (run with ``-s``) for the table in docs/results.md.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis as redis_lib

from benchmarks.launcher import ServiceProcess
from service.cache.codec import StateRow, StateSpec, decode_state, encode_state
from tests.integration.conftest import RedisServer, ServiceFactory, admin_client, body, cache_counts

pytestmark = pytest.mark.integration

CLIENTS = 8
ROUNDS = 4
REDIS_TIMEOUT_MS = 50
BIG_BYTES = 100 * 2**20


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, bundle_dir: Path, redis_server: RedisServer) -> ServiceProcess:
    return start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_REDIS_URL": redis_server.url,
            "GENRET_REDIS_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
            "GENRET_BREAKER_FAILURES": "1",  # the most sensitive breaker: any failed call opens it
            "GENRET_BREAKER_RESET_S": "30",
            "GENRET_MAX_WAIT_MS": "20",  # 8 clients sending together land in one batch
        }
    )


def extreme(spec: StateSpec) -> bytes:
    """Well framed, the right bundle and shapes, every value a finite 3e38."""
    t, d, dr = spec.length, spec.memory_dim, spec.query_dim
    row = StateRow(np.full((t, d), 3e38, np.float32), np.ones(t, bool), np.full(dr, 3e38, np.float32))
    return encode_state(row, StateSpec(spec.fingerprint, t, d, dr, max_abs=float("inf")))


def oversized(spec: StateSpec) -> bytes:
    """A valid value followed by 100 MB: reading it whole would take longer than the Redis timeout."""
    t, d, dr = spec.length, spec.memory_dim, spec.query_dim
    row = StateRow(np.ones((t, d), np.float32), np.ones(t, bool), np.ones(dr, np.float32))
    return encode_state(row, spec) + bytes(BIG_BYTES)


FAULTS: dict[str, Callable[[redis_lib.Redis, str, StateSpec], object]] = {
    "finite 3e38 values": lambda r, key, spec: r.set(key, extreme(spec)),
    "100 MB value": lambda r, key, spec: r.set(key, oversized(spec)),
    "a list under the key": lambda r, key, spec: (r.delete(key), r.rpush(key, b"x", b"y")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_one_users_bad_entry_never_fails_others_nor_opens_the_breaker(
    fault: str, service: ServiceProcess, redis_server: RedisServer, bundle_dir: Path
) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["state_bounds"]["max_abs"] < 1e4  # the exporter recorded the encoder's range
    victim = body(f"victim-{fault.split()[0]}", 11)
    redis = redis_server.client()
    with httpx.Client(base_url=service.url, timeout=10) as client:
        clean = client.post("/v1/retrieve", json=victim)
        assert clean.status_code == 200, clean.text
        deadline = time.monotonic() + 5
        while not (keys := redis.keys(f"genret:*:{victim['user_id']}:*")) and time.monotonic() < deadline:
            time.sleep(0.02)  # the write-back runs after the answer
        (raw_key,) = keys
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        before = cache_counts(client)
    t = len(victim["history"])
    spec = StateSpec(manifest["fingerprint"], t, manifest["dims"]["memory"], manifest["dims"]["query"])
    victim_status: list[int] = []
    others: list[int] = []
    wrong_answers = 0

    async def main() -> None:
        nonlocal wrong_answers
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            for r in range(ROUNDS):
                FAULTS[fault](redis, key, spec)
                reqs = [victim] + [body(f"other-{fault}-{r}-{i}", 100 * r + i) for i in range(CLIENTS - 1)]
                got = await asyncio.gather(*(client.post("/v1/retrieve", json=b) for b in reqs))
                victim_status.append(got[0].status_code)
                if got[0].status_code == 200:
                    ids = [i["id"] for i in got[0].json()["items"]]
                    wrong_answers += ids != [i["id"] for i in clean.json()["items"]]
                others.extend(g.status_code for g in got[1:])
                await asyncio.sleep(0.1)  # the fresh state is written back before the next fault

    asyncio.run(main())
    with httpx.Client(base_url=service.url, timeout=10) as client:
        after = cache_counts(client)
        ready = client.get("/readyz").json()
    report = {
        "fault": f"cache entry: {fault}",
        "requests": len(victim_status) + len(others),
        "fault_status": sorted(set(victim_status)),
        "others_non_200": sum(s != 200 for s in others),
        "wrong_answers": wrong_answers,
        "invalid_counted": after.get("invalid", 0) - before.get("invalid", 0),
        "errors_counted": after.get("error", 0) - before.get("error", 0),
        "breaker": ready["cache"]["breaker"],
    }
    print("RELIABILITY " + json.dumps(report))
    assert set(victim_status) == {200} and wrong_answers == 0, report
    assert others.count(200) == len(others) == ROUNDS * (CLIENTS - 1), report
    assert report["invalid_counted"] == ROUNDS and report["errors_counted"] == 0, report
    assert ready["cache"]["breaker"] == "closed", ready
    refreshed = redis.get(key)
    assert isinstance(refreshed, bytes) and len(refreshed) < 2**20
    decode_state(refreshed, spec)  # the bad value was replaced by a valid one


@pytest.fixture
def served(tmp_path: Path, bundle_dir: Path) -> Path:
    root = tmp_path / "bundles"
    root.mkdir()
    (root / "main").symlink_to(bundle_dir)
    (root / "other").symlink_to(bundle_dir)
    return root


def test_one_bad_bundle_folder_does_not_block_the_others(
    start_service: ServiceFactory, served: Path, bundle_dir: Path
) -> None:
    service = start_service({"GENRET_BUNDLE_PATH": str(served), "GENRET_DEFAULT_MODEL": "main"})
    (served / "Bad_Name").symlink_to(bundle_dir)
    broken = served / "broken"
    shutil.copytree(bundle_dir, broken)
    with open(broken / "decoder.onnx", "ab") as fh:
        fh.write(b"tampered")
    statuses: list[int] = []
    with (
        admin_client(service, timeout_s=120) as admin,
        httpx.Client(base_url=service.url, timeout=10) as client,
    ):
        whole = admin.post("/admin/reload")
        statuses += [client.post("/v1/retrieve", json=body("u", i)).status_code for i in range(10)]
        one = admin.post("/admin/reload", json={"model": "other"})
        statuses += [
            client.post("/v1/retrieve", json=body("u", i, model="other")).status_code for i in range(10)
        ]
        bad = admin.post("/admin/reload", json={"model": "broken"})
        models = sorted(m["name"] for m in client.get("/v1/models").json()["models"])
    outcomes = {o["name"]: o for o in whole.json()["reloaded"]}
    print(
        "RELIABILITY "
        + json.dumps(
            {
                "fault": "bad bundle folders (bad name, corrupt) on reload",
                "requests": len(statuses) + 3,
                "fault_status": [whole.status_code, one.status_code, bad.status_code],
                "others_non_200": sum(s != 200 for s in statuses),
            }
        )
    )
    assert whole.status_code == 200, whole.text
    assert "model name 'Bad_Name' refused" in outcomes["Bad_Name"]["refused"]
    assert "decoder.onnx" in outcomes["broken"]["refused"] and outcomes["broken"]["new_version"] is None
    assert outcomes["main"].get("refused") is None and outcomes["other"].get("refused") is None
    assert one.status_code == 200 and [o["name"] for o in one.json()["reloaded"]] == ["other"], one.text
    assert bad.status_code == 422 and "decoder.onnx" in bad.json()["message"], bad.text
    assert models == ["main", "other"] and set(statuses) == {200}
