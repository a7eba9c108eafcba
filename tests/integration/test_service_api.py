"""The HTTP API against a real uvicorn process (in-process LRU cache): parity with the offline
Retriever, cache hit = miss, request semantics, limits, admin auth on the admin port, OpenAPI,
generated requests (malformed ones and valid ones with known ids). Each test creates the state it
asserts on, so any one of them passes when run alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_HEADERS, ServiceFactory, admin_client

pytestmark = pytest.mark.integration

MAX_K = 50
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, bundle_dir: Path) -> ServiceProcess:
    return start_service(
        {
            "GENRET_BUNDLE_PATH": str(bundle_dir),
            "GENRET_MAX_K": str(MAX_K),
            "GENRET_MAX_BODY_BYTES": str(MAX_BODY),
            "GENRET_MAX_BATCH_REQUESTS": "8",
            "GENRET_MAX_HISTORY_ITEMS": "500",
        }
    )


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30.0) as c:
        yield c


def ids(n: int) -> str:
    return f"item{n:04d}"


def test_results_equal_the_offline_retriever(client: httpx.Client, bundle_dir: Path) -> None:
    from models.bundle.bundle import load_bundle
    from models.search.retriever import Retriever

    retriever = Retriever(load_bundle(bundle_dir))
    rng = np.random.default_rng(1)
    histories = [rng.integers(1, 1001, size=int(n)) for n in (1, 3, 8, 20, 60)]  # 60 > max_history 50
    offline = retriever.retrieve(histories, k=10, beam_size=10)
    for row, history in enumerate(histories):
        body = {
            "user_id": f"parity-{row}",
            "history": [ids(int(h)) for h in history],
            "k": 10,
            "beam_size": 10,
        }
        got = client.post("/v1/retrieve", json=body)
        assert got.status_code == 200, got.text
        data = got.json()
        expected = [ids(int(i)) for i in offline.items[row] if i > 0]
        assert [it["id"] for it in data["items"]] == expected
        np.testing.assert_allclose(
            [it["score"] for it in data["items"]], offline.scores[row][: len(expected)], rtol=1e-4, atol=1e-5
        )
        assert data["truncated"] == (len(history) > 50)


def test_cache_hit_returns_the_same_items_as_the_miss(client: httpx.Client) -> None:
    body = {"user_id": "cache-user", "history": [ids(i) for i in (5, 17, 400, 999)], "k": 10, "debug": True}
    hits = 'genret_cache_results_total{result="hit"}'

    def hit_count() -> float:
        lines = [x for x in client.get("/metrics").text.splitlines() if x.startswith(hits)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    first = client.post("/v1/retrieve", json=body).json()
    before = hit_count()
    second = client.post("/v1/retrieve", json=body).json()
    assert hit_count() - before == 1  # debug says nothing about the cache (a chosen user_id's entry)
    assert "cache" not in first["debug"] and "cache" not in second["debug"]
    assert [i["id"] for i in second["items"]] == [i["id"] for i in first["items"]]
    np.testing.assert_allclose(
        [i["score"] for i in second["items"]], [i["score"] for i in first["items"]], rtol=1e-6
    )


def test_unknown_ids_are_skipped_and_counted_and_exclusions_hold(client: httpx.Client) -> None:
    history = ["nope-1", ids(10), "nope-2", ids(11)]
    plain = client.post("/v1/retrieve", json={"history": history, "k": 5}).json()
    assert plain["unknown_history_items"] == 2
    assert plain["model"]["name"] == "synthetic-1000" and plain["variant"] == "default"
    assert "fallback" not in plain
    banned = [plain["items"][0]["id"], plain["items"][1]["id"]]
    again = client.post(
        "/v1/retrieve", json={"history": history, "k": 5, "exclude": banned, "exclude_history": True}
    ).json()
    returned = {i["id"] for i in again["items"]}
    assert not returned & set(banned)
    assert not returned & {ids(10), ids(11)}


def test_empty_usable_history_falls_back_to_popular_items(client: httpx.Client) -> None:
    data = client.post("/v1/retrieve", json={"history": ["unknown"], "k": 3, "exclude": [ids(1)]}).json()
    assert data["fallback"] == "popular"
    assert [i["id"] for i in data["items"]] == [ids(2), ids(3), ids(4)]  # Zipf popularity by dense id


def test_batch_endpoint_answers_each_request(client: httpx.Client) -> None:
    reqs = [{"history": [ids(i)], "k": 3} for i in (1, 2, 3)]
    got = client.post("/v1/retrieve/batch", json={"requests": reqs})
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    assert len(results) == 3
    single = client.post("/v1/retrieve", json=reqs[1]).json()
    assert [i["id"] for i in results[1]["items"]] == [i["id"] for i in single["items"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"history": ["item0001"], "k": MAX_K + 1}, "k"),
        ({"history": ["item0001"], "beam_size": 100_000}, "beam_size"),
        ({"history": ["item0001"] * 501}, "history"),
        ({"history": ["item0001"], "deadline_ms": 10**9}, "deadline_ms"),
        ({"history": ["item0001"], "k": 0}, "k"),
        ({"history": ["item0001"], "surprise": 1}, "surprise"),
    ],
)
def test_limits_answer_422_naming_the_field(
    client: httpx.Client, body: dict[str, object], field: str
) -> None:
    got = client.post("/v1/retrieve", json=body)
    assert got.status_code == 422, got.text
    assert any(d["loc"][-1] == field for d in got.json()["detail"]), got.text


def test_batch_size_limit_names_the_field(client: httpx.Client) -> None:
    got = client.post("/v1/retrieve/batch", json={"requests": [{"history": ["item0001"]}] * 9})
    assert got.status_code == 422
    assert got.json()["detail"][0]["loc"] == ["body", "requests"]
    nested = client.post("/v1/retrieve/batch", json={"requests": [{"history": ["item0001"], "k": 999}]})
    assert nested.json()["detail"][0]["loc"] == ["body", "requests", 0, "k"]


def test_unknown_model_is_404(client: httpx.Client) -> None:
    got = client.post("/v1/retrieve", json={"history": ["item0001"], "model": "no-such-model"})
    assert got.status_code == 404 and got.json()["kind"] == "unknown_model"


def test_bodies_past_the_limit_get_413(client: httpx.Client) -> None:
    big = json.dumps({"history": ["x" * 200] * 400}).encode()
    assert len(big) > MAX_BODY
    assert (
        client.post("/v1/retrieve", content=big, headers={"content-type": "application/json"}).status_code
        == 413
    )

    def chunks():  # no Content-Length: the body is counted while read
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    got = client.post("/v1/retrieve", content=chunks(), headers={"content-type": "application/json"})
    assert got.status_code == 413


def test_models_health_and_readiness(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["synthetic-1000"] and models[0]["default"] is True
    assert "path" not in models[0]  # where bundles live on disk: admin port only
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] and body["decoder_backend"] == "onnx" and body["cache"]["kind"] == "local"
    assert "CPUExecutionProvider" in body["backend_devices"]["synthetic-1000"]


def test_metrics_expose_the_genret_families(client: httpx.Client) -> None:
    # the state each family below needs: a computed request, then the same one again (cache hit),
    # one over a limit, one with an unknown history id
    repeated = {"user_id": "metrics-user", "history": ["item0001", "item0002"], "k": 2}
    for body in (
        repeated,
        repeated,
        {"history": ["item0001"], "k": MAX_K + 1},
        {"history": ["nope", "item0003"]},
    ):
        client.post("/v1/retrieve", json=body)
    text = client.get("/metrics").text
    for family in (
        "genret_request_duration_seconds_bucket",
        'genret_stage_duration_seconds_bucket{le="0.0005",stage="encode"}',
        'stage="queue"',
        'stage="search"',
        "genret_batch_size_bucket",
        "genret_queue_depth",
        'genret_cache_results_total{result="hit"}',
        'genret_errors_total{kind="limit"}',
        "genret_model_info{",
        "genret_unknown_history_items_total",
    ):
        assert family in text, family
    assert 'route="/v1/retrieve"' in text


def test_admin_api_is_on_its_own_port_and_needs_the_bearer_token(
    client: httpx.Client, service: ServiceProcess, bundle_dir: Path
) -> None:
    assert client.post("/admin/reload", headers=ADMIN_HEADERS).status_code == 404  # not on the public port
    assert client.get("/admin/models", headers=ADMIN_HEADERS).status_code == 404
    assert httpx.post(f"{service.admin_url}/admin/reload").status_code == 401
    wrong = httpx.post(f"{service.admin_url}/admin/reload", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 403
    with admin_client(service) as admin:
        ok = admin.post("/admin/reload")
        assert ok.status_code == 200, ok.text
        assert ok.json()["reloaded"][0]["changed"] is False  # same files, same fingerprint
        models = admin.get("/admin/models").json()["models"]
        assert models[0]["path"] == str(bundle_dir)
        assert admin.post("/v1/retrieve", json={"history": ["item0001"]}).status_code == 404


def test_openapi_schema_describes_the_routes(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/retrieve", "/v1/retrieve/batch", "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
    retrieve = paths["/v1/retrieve"]["post"]
    assert {"200", "422", "429", "504"} <= set(retrieve["responses"])
    request_schema = schema["components"]["schemas"]["RetrieveRequest"]
    assert {"history", "k", "beam_size", "exclude", "deadline_ms", "model"} <= set(
        request_schema["properties"]
    )
    assert not [p for p in paths if p.startswith("/admin")]
    assert "path" not in schema["components"]["schemas"]["ModelDescription"]["properties"]


def test_admin_openapi_describes_the_admin_routes(service: ServiceProcess) -> None:
    paths = httpx.get(f"{service.admin_url}/openapi.json").json()["paths"]
    assert set(paths) == {
        "/admin/reload",
        "/admin/models",
        "/admin/items",
        "/admin/items/jobs/{job}",
        "/admin/metrics",
    }
    assert "security" in paths["/admin/reload"]["post"] and "security" in paths["/admin/items"]["post"]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "user_id": json_values,
        "history": st.lists(st.one_of(st.sampled_from(["item0001", "item0500"]), json_values), max_size=6)
        | json_values,
        "k": st.integers(min_value=-5, max_value=10**6) | json_values,
        "beam_size": st.integers(min_value=-5, max_value=10**6) | json_values,
        "exclude": st.lists(json_values, max_size=3) | json_values,
        "exclude_history": json_values,
        "debug": json_values,
        "deadline_ms": st.integers(min_value=-5, max_value=10**7) | json_values,
        "model": json_values,
        "extra": json_values,
    },
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=request_like | json_values)
def test_generated_malformed_requests_get_4xx_never_5xx(client: httpx.Client, body: object) -> None:
    got = client.post("/v1/retrieve", json=body)
    tiny_deadline = isinstance(body, dict) and "deadline_ms" in body  # 504 is the right answer then
    assert got.status_code < 500 or (got.status_code == 504 and tiny_deadline), (
        body,
        got.status_code,
        got.text,
    )
    assert got.status_code in (200, 404, 422, 504), (body, got.status_code, got.text)


known_id = st.integers(min_value=1, max_value=1000).map(ids)
valid_request = st.fixed_dictionaries(
    {"history": st.lists(known_id, min_size=1, max_size=60)},  # past max_history 50: truncated
    optional={
        "user_id": st.text(max_size=12),
        "k": st.integers(min_value=1, max_value=MAX_K),
        "beam_size": st.integers(min_value=1, max_value=64),
        "exclude": st.lists(known_id, max_size=5),
        "exclude_history": st.booleans(),
        "deadline_ms": st.integers(min_value=1, max_value=5000),
        "debug": st.booleans(),
    },
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=valid_request)
def test_generated_valid_requests_reach_the_model(client: httpx.Client, body: dict[str, object]) -> None:
    """Every body carries known ids, so each one runs encode + beam search + rerank (no fallback)."""
    got = client.post("/v1/retrieve", json=body)
    assert got.status_code in (200, 504), (body, got.status_code, got.text)
    if got.status_code == 504:
        assert got.json()["kind"] == "deadline"
        return
    data = got.json()
    assert "fallback" not in data and data["unknown_history_items"] == 0, data
    returned = [i["id"] for i in data["items"]]
    assert returned or data.get("fewer"), data  # fewer than k only with the reason given
    assert len(returned) <= body.get("k", 10) and len(set(returned)) == len(returned)  # type: ignore[operator]
    assert not set(returned) & set(body.get("exclude", []))  # type: ignore[call-overload]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_random_bytes_get_4xx_never_5xx(client: httpx.Client, raw: bytes) -> None:
    got = client.post("/v1/retrieve", content=raw, headers={"content-type": "application/json"})
    assert 400 <= got.status_code < 500 or got.status_code == 200, (raw, got.status_code, got.text)
