"""What the public port says, against a real uvicorn and a real redis-server: strict request types
(422 naming the field, for every field), no admin activity on the public ``/metrics`` (the admin port
has its own), ``/readyz`` with states and no address, ``debug`` with no time that depends on the
cache, and the committed OpenAPI document equal to the one the app serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_HEADERS, RedisServer, ServiceFactory

pytestmark = pytest.mark.integration

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
GOOD = {"history": ["item0001", "item0002"], "k": 3}
# field -> values of the wrong JSON type (each must be a 422 naming the field)
WRONG_TYPES: dict[str, list[object]] = {
    "k": ["5", True, 5.0, 5.5],
    "beam_size": ["10", False, 10.0],
    "deadline_ms": ["1000", True, 1000.5],
    "debug": ["true", 1, 0],
    "exclude_history": ["false", 0, 1],
    "user_id": [7, True, ["u"]],
    "model": [1, False],
    "history": ["item0001", {"a": 1}, [True], [1.5]],
    "exclude": ["item0001", [False], [2.5]],
    "allow": ["item0001", [True]],
    "categories": ["1", [1], [True]],
}


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, bundle_dir: Path, redis_server: RedisServer) -> ServiceProcess:
    return start_service(
        {"GENRET_BUNDLE_PATH": str(bundle_dir), "GENRET_REDIS_URL": redis_server.url, "GENRET_ENV": "dev"}
    )


def test_wrong_json_types_are_422_naming_the_field(service: ServiceProcess) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as client:
        assert client.post("/v1/retrieve", json=GOOD).status_code == 200
        for field, values in WRONG_TYPES.items():
            for value in values:
                got = client.post("/v1/retrieve", json={**GOOD, field: value})
                assert got.status_code == 422, (field, value, got.text)
                locs = [e["loc"] for e in got.json()["detail"]]
                assert all(loc[:2] == ["body", field] for loc in locs), (field, value, locs)
                batch = client.post("/v1/retrieve/batch", json={"requests": [GOOD, {**GOOD, field: value}]})
                assert batch.status_code == 422, (field, value, batch.text)
                assert all(e["loc"][:4] == ["body", "requests", 1, field] for e in batch.json()["detail"])
        # integers as item ids keep meaning their decimal string (documented in the schema)
        assert client.post("/v1/retrieve", json={**GOOD, "exclude": [12]}).status_code == 200
        assert client.post("/v1/retrieve/batch", json={"requests": "x"}).status_code == 422
        assert client.post("/v1/retrieve", json={**GOOD, "k": 5}).status_code == 200


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


def test_admin_activity_is_counted_on_the_admin_port_only(service: ServiceProcess) -> None:
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{service.admin_url}/admin/models").status_code == 401
        wrong = {"Authorization": "Bearer not-the-token-but-long-enough"}
        assert client.post(f"{service.admin_url}/admin/reload", headers=wrong).status_code == 403
        assert client.get(f"{service.admin_url}/admin/models", headers=ADMIN_HEADERS).status_code == 200
        public = client.get(f"{service.url}/metrics").text
        admin = client.get(f"{service.admin_url}/admin/metrics", headers=ADMIN_HEADERS).text
        assert client.get(f"{service.admin_url}/admin/metrics").status_code == 401
    assert "/admin" not in public and "genret_admin_" not in public
    assert not [line for line in metric_lines(public, "genret_errors_total") if "forbidden" in line]
    assert not [line for line in metric_lines(public, "genret_errors_total") if "unauthorized" in line]
    assert re.search(r'genret_admin_errors_total\{kind="forbidden"\} [1-9]', admin), admin
    assert re.search(r'genret_admin_errors_total\{kind="unauthorized"\} [1-9]', admin), admin
    assert 'genret_admin_request_duration_seconds_count{route="/admin/models",status="200"}' in admin


def test_readyz_gives_states_and_no_address(
    start_service: ServiceFactory, bundle_dir: Path, redis_server: RedisServer
) -> None:
    # a Redis that refuses connections: the breaker opens, /readyz says so without host or port
    dead = f"redis://127.0.0.1:{redis_server.port + 1 if redis_server.port < 65535 else 1}/0"
    service = start_service({"GENRET_BUNDLE_PATH": str(bundle_dir), "GENRET_REDIS_URL": dead})
    with httpx.Client(base_url=service.url, timeout=10) as client:
        for i in range(5):
            assert client.post("/v1/retrieve", json={**GOOD, "user_id": f"u{i}"}).status_code == 200
        ready = client.get("/readyz")
    body = ready.json()
    assert body["cache"]["kind"] == "redis" and body["cache"]["last_error"] is not None
    assert body["cache"]["breaker"] in ("open", "half_open")
    text = ready.text
    assert "127.0.0.1" not in text and str(redis_server.port + 1) not in text, text
    assert re.fullmatch(r"[A-Za-z]+", body["cache"]["last_error"]), body["cache"]


def test_debug_carries_no_time_after_the_cache_lookup(service: ServiceProcess) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as client:
        req = {**GOOD, "user_id": "debug-user", "debug": True}
        miss = client.post("/v1/retrieve", json=req).json()["debug"]
        hit = client.post("/v1/retrieve", json=req).json()["debug"]
    assert set(miss["timings_ms"]) == set(hit["timings_ms"]) == {"queue"}
    assert set(miss) == set(hit) and "cache" not in miss


def test_committed_openapi_equals_what_the_app_serves(service: ServiceProcess) -> None:
    served = httpx.get(f"{service.url}/openapi.json", timeout=10).json()
    committed = json.loads(OPENAPI.read_text())
    assert served == committed, (
        "docs/openapi.json is stale: regenerate it with "
        "`.venv/bin/python -m service.openapi > docs/openapi.json`"
    )
