"""The delta log on a Redis Stream (docs/live_catalogue.md "The log on Redis Streams"): two uvicorn
replicas and one real redis-server. Both write at once and converge (one order, no gap, nothing
lost), a replica started after others wrote (and after a hostile entry) catches up to the same
catalogue, and a Redis whose eviction policy could drop the stream is refused at start-up.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_HEADERS, RedisServer, ServiceFactory

ITEMS = 200
HISTORY = ["item001", "item002", "item003"]
DIM = 16


@pytest.fixture(scope="module")
def stream_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("stream-bundles") / "streamed"
    return make_synthetic_bundle(out, ITEMS, 8, 2, dim=DIM, seed=7, num_layers=1)


@pytest.fixture(scope="module")
def env(stream_bundle: Path, redis_server: RedisServer) -> dict[str, str]:
    return {
        "GENRET_BUNDLE_PATH": str(stream_bundle),
        "GENRET_CATALOGUE_LOG": "redis",
        "GENRET_CATALOGUE_REDIS_URL": redis_server.url,
        "GENRET_CATALOGUE_POLL_S": "0.2",
        "GENRET_DEFAULT_BEAM_SIZE": "128",
    }


def model_of(service: ServiceProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{service.url}/v1/models", timeout=10).json()["models"][0])


def wait_version(service: ServiceProcess, version: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while model_of(service)["catalogue_version"] < version:
        assert time.monotonic() < deadline, f"{service.url} stuck at {model_of(service)}"
        time.sleep(0.05)


def add(service: ServiceProcess, ids: list[str]) -> httpx.Response:
    body = {"add": [{"id": i, "vector": [0.01 * (hash(i) % 97)] * DIM} for i in ids]}
    return httpx.post(f"{service.admin_url}/admin/items", json=body, headers=ADMIN_HEADERS, timeout=60)


def items_of(service: ServiceProcess) -> list[str]:
    r = httpx.post(
        f"{service.url}/v1/retrieve", json={"history": HISTORY, "k": 50, "beam_size": 128}, timeout=30
    )
    assert r.status_code == 200, r.text
    return [item["id"] for item in r.json()["items"]]


def entry_ids(redis_server: RedisServer, name: str) -> list[int]:
    entries: Any = redis_server.client().xrange(f"genret:catalogue:{name}", "-", "+")
    return [int(entry_id.decode().split("-")[0]) for entry_id, _ in entries]


def test_two_replicas_writing_at_once_converge_on_one_order(
    start_service: ServiceFactory, env: dict[str, str], redis_server: RedisServer, stream_bundle: Path
) -> None:
    a, b = start_service(env), start_service(env)
    failures: list[str] = []

    def write(service: ServiceProcess, tag: str) -> None:
        for j in range(5):
            r = add(service, [f"{tag}-{j}"])
            if r.status_code != 200:
                failures.append(r.text)

    threads = [threading.Thread(target=write, args=(s, tag)) for s, tag in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert entry_ids(redis_server, stream_bundle.name) == list(range(1, 11))  # one order, no gap
    for service in (a, b):
        wait_version(service, 10)
    ma, mb = model_of(a), model_of(b)
    assert ma["num_live"] == mb["num_live"] == ITEMS + 10
    assert items_of(a) == items_of(b)
    lag = httpx.get(f"{a.url}/readyz", timeout=10).json()["catalogue_lag"]
    assert set(lag.values()) == {0}


def test_a_replica_restarted_mid_stream_loses_nothing(
    start_service: ServiceFactory, env: dict[str, str], redis_server: RedisServer, stream_bundle: Path
) -> None:
    writer = start_service(env)
    wait_version(writer, 10)
    r = add(writer, ["before-restart"])
    assert r.status_code == 200, r.text
    # a hostile entry published by something else: quarantined, the log goes on
    key = f"genret:catalogue:{stream_bundle.name}"
    last = entry_ids(redis_server, stream_bundle.name)[-1]
    hostile = b'{"base_fingerprint": "x", "version": 1e999, "delta": {"remove": ["item001"]}}'
    redis_server.client().xadd(key, {"record": hostile}, id=f"{last + 1}-0")
    for j in range(3):
        assert add(writer, [f"after-restart-{j}"]).status_code == 200
    late = start_service(env)  # starts on the stream as it is now
    version = model_of(writer)["catalogue_version"]
    wait_version(late, version)
    assert model_of(late)["num_live"] == model_of(writer)["num_live"] == ITEMS + 14
    assert items_of(late) == items_of(writer)
    metrics = httpx.get(f"{late.url}/metrics", timeout=10).text
    assert (
        f'genret_catalogue_quarantined_total{{model="{model_of(late)["name"]}",reason="bad_record"}} 1.0'
        in metrics
    )
    entries: Any = redis_server.client().xrange(key, f"{last}-0", f"{last}-0")
    record = json.loads(entries[0][1][b"record"])
    assert "placement" in record and record["delta"]["add"][0]["id"] == "before-restart"


def test_a_redis_that_could_evict_the_stream_is_refused(
    tmp_path: Path, start_service: ServiceFactory, env: dict[str, str]
) -> None:
    evicting = RedisServer(tmp_path).start()
    try:
        evicting.client().config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(RuntimeError) as err:
            start_service({**env, "GENRET_CATALOGUE_REDIS_URL": evicting.url})
        assert "maxmemory-policy" in str(err.value) and "allkeys-lru" in str(err.value)
    finally:
        evicting.stop()
