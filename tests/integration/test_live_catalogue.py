"""The live catalogue against real uvicorn processes: ``POST /admin/items`` under load,
removed items never returned, versions advancing atomically, malformed deltas refused with nothing
changed, and two service processes sharing one delta directory converging to the same catalogue.

The bundle is small enough (300 items, 64 leaves of at most 5) that the served beam (128) covers
every leaf: the rerank is then exact, so "an item whose vector points along a user's query comes
first for that user" holds for any decoder, trained or not.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_HEADERS, ServiceFactory

ITEMS = 300
USERS = {f"u{i}": [f"item{j:03d}" for j in range(1 + 7 * i, 6 + 7 * i)] for i in range(6)}


@pytest.fixture(scope="module")
def live_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("live-bundles") / "live"
    return make_synthetic_bundle(out, ITEMS, 8, 2, dim=16, seed=3, num_layers=1)


@pytest.fixture(scope="module")
def queries(live_bundle: Path) -> dict[str, np.ndarray]:
    """Each user's query vector ``[Dr]``, as the service encodes it (the same ONNX encoder)."""
    from models.bundle.bundle import load_bundle
    from models.search.retriever import Retriever

    retriever = Retriever(load_bundle(live_bundle))
    dense = {raw: i for i, raw in enumerate(retriever.bundle.item_ids.tolist())}
    histories = [np.array([dense[raw] for raw in h], np.int64) for h in USERS.values()]
    query = retriever.encode(histories).query.numpy()  # [U, Dr]
    return {user: query[i] for i, user in enumerate(USERS)}


@pytest.fixture(scope="module")
def pair(
    start_service: ServiceFactory, live_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ServiceProcess, ServiceProcess, Path]:
    """Two service processes over one bundle and one delta directory."""
    deltas = tmp_path_factory.mktemp("shared-deltas")
    env = {
        "GENRET_BUNDLE_PATH": str(live_bundle),
        "GENRET_CATALOGUE_DIR": str(deltas),
        "GENRET_CATALOGUE_POLL_S": "0.2",
        "GENRET_DEFAULT_BEAM_SIZE": "128",
        "GENRET_MAX_DELTA_ITEMS": "50",
    }
    return start_service(env), start_service(env), deltas / f"{live_bundle.name}.deltas"


def model_of(service: ServiceProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{service.url}/v1/models", timeout=10).json()["models"][0])


def post_delta(service: ServiceProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{service.admin_url}/admin/items", json=body, headers=ADMIN_HEADERS, timeout=60)


def retrieve(client: httpx.Client, user: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/retrieve", json={"user_id": user, "history": USERS[user], "k": 10, **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_version(service: ServiceProcess, version: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while model_of(service)["catalogue_version"] < version:
        assert time.monotonic() < deadline, f"{service.url} stuck at {model_of(service)}"
        time.sleep(0.05)


def vector_along(query: np.ndarray, norm: float = 100.0) -> list[float]:
    """A vector in the direction of ``query``, longer than every item (so it scores first)."""
    return [float(x) for x in query / np.linalg.norm(query) * norm]


def test_a_malformed_or_contradicting_delta_is_refused_and_changes_nothing(
    pair: tuple[ServiceProcess, ServiceProcess, Path], queries: dict[str, np.ndarray]
) -> None:
    a, _, deltas = pair
    before = model_of(a)
    files = sorted(deltas.glob("*.json")) if deltas.exists() else []
    good = vector_along(queries["u0"])
    cases: list[tuple[dict[str, Any], list[Any]]] = [
        ({"add": [{"id": "x", "vector": good[:3]}]}, ["body", "add", 0, "vector"]),
        ({"add": [{"id": "x", "vector": [*good[:-1], "a"]}]}, ["body", "add", 0, "vector"]),
        ({"add": [{"id": "item001", "vector": good}]}, ["body", "add", 0, "id"]),
        ({"add": [{"id": "y", "vector": good}, {"id": "y", "vector": good}]}, ["body", "add", 1, "id"]),
        ({"add": [{"id": "z"}]}, ["body", "add", 0, "vector"]),  # no content tower: a vector is required
        ({"remove": ["no-such-item"]}, ["body", "remove", 0]),
        ({"remove": ["item002", "item002"]}, ["body", "remove", 1]),
        ({"add": [{"id": "w", "vector": good, "colour": "red"}]}, ["body", "add", 0, "colour"]),
        ({"add": [], "remove": []}, ["body"]),
        ({"remove": [f"item{i:03d}" for i in range(1, 60)]}, ["body", "remove"]),  # > GENRET_MAX_DELTA_ITEMS
    ]
    for body, loc in cases:
        r = post_delta(a, body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"][0]["loc"] == loc, (body, r.json())
    r = httpx.post(f"{a.admin_url}/admin/items", json={"remove": ["item001"]}, timeout=10)
    assert r.status_code == 401  # the admin token, as every admin route
    r = post_delta(a, {"remove": ["item001"], "model": "no-such-model"})
    assert r.status_code == 404
    assert model_of(a) == before
    assert (sorted(deltas.glob("*.json")) if deltas.exists() else []) == files


def test_items_added_and_removed_under_load_version_by_version(
    pair: tuple[ServiceProcess, ServiceProcess, Path], queries: dict[str, np.ndarray]
) -> None:
    a, b, _ = pair
    start = model_of(a)["catalogue_version"]
    added: dict[int, set[str]] = {start: set()}  # catalogue version -> items added up to it
    removed: dict[int, set[str]] = {start: set()}
    answers: list[tuple[str, dict[str, Any]]] = []
    failures: list[str] = []
    stop = threading.Event()

    def load(user: str) -> None:
        with httpx.Client(base_url=a.url, timeout=30) as client:
            while not stop.is_set():
                r = client.post("/v1/retrieve", json={"user_id": user, "history": USERS[user], "k": 10})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    answers.append((user, r.json()))

    threads = [threading.Thread(target=load, args=(u,)) for u in USERS]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=a.url, timeout=30) as client:
            top_u1 = [item["id"] for item in retrieve(client, "u1")["items"][:4]]
        steps: list[dict[str, Any]] = [
            {"add": [{"id": "new-u0", "vector": vector_along(queries["u0"])}]},
            {"remove": top_u1},
            {"add": [{"id": f"new-u{i}", "vector": vector_along(queries[f"u{i}"])} for i in (2, 3)]},
            {"remove": ["new-u2"], "add": [{"id": "new-u4", "vector": vector_along(queries["u4"])}]},
        ]
        for delta in steps:
            time.sleep(0.3)
            r = post_delta(a, delta)
            assert r.status_code == 200, r.text
            v = r.json()["version"]
            assert r.json()["added"] == len(delta.get("add", [])) and r.json()["removed"] == len(
                delta.get("remove", [])
            )
            added[v] = added[v - 1] | {item["id"] for item in delta.get("add", [])}
            removed[v] = removed[v - 1] | set(delta.get("remove", []))
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    last = max(added)
    seen = {data["model"]["catalogue_version"] for _, data in answers}
    assert {start, last} <= seen
    for user, data in answers:
        v = data["model"]["catalogue_version"]
        ids = [item["id"] for item in data["items"]]
        assert len(ids) == 10
        assert not set(ids) & removed[v], (v, ids)  # nothing removed at its version
        new = {i for i in ids if i.startswith("new-")}
        assert new <= added[v] - removed[v], (v, ids)  # never an item of a later version
        mine = f"new-{user}"
        assert (ids[0] == mine) == (mine in added[v] - removed[v]), (user, v, ids)
    wait_version(b, last)  # the other process applies the same files
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        for user in USERS:
            assert retrieve(ca, user)["items"] == retrieve(cb, user)["items"]


def test_a_delta_written_by_another_process_reaches_both(
    pair: tuple[ServiceProcess, ServiceProcess, Path], queries: dict[str, np.ndarray], live_bundle: Path
) -> None:
    from models.catalogue.delta import Delta
    from service.catalogue.store import DeltaStore

    a, b, deltas = pair
    version = model_of(a)["catalogue_version"]
    fingerprint = json.loads((live_bundle / "manifest.json").read_text())["fingerprint"]
    store = DeltaStore(deltas)
    seq = max(store.sequences(), default=0) + 1
    delta = Delta.from_json({"add": [{"id": "new-u5", "vector": vector_along(queries["u5"])}]})
    store.claim(seq, fingerprint, version + 1, delta)  # as a third replica, or a rollout, would
    for service in (a, b):
        wait_version(service, version + 1)
        with httpx.Client(base_url=service.url, timeout=30) as client:
            assert retrieve(client, "u5")["items"][0]["id"] == "new-u5"
    models = httpx.get(f"{b.admin_url}/admin/models", headers=ADMIN_HEADERS, timeout=10).json()["models"]
    assert models[0]["catalogue_version"] == version + 1
    assert models[0]["num_live"] == model_of(a)["num_live"]
    metrics = httpx.get(f"{b.url}/metrics", timeout=10).text
    assert f'genret_catalogue_version{{model="{models[0]["name"]}"}} {float(version + 1)}' in metrics
    # a file of another bundle version is skipped, not applied
    store.claim(seq + 1, "0" * 64, version + 2, Delta.from_json({"remove": ["item100"]}))
    time.sleep(1.0)
    assert model_of(a)["catalogue_version"] == version + 1


def test_added_history_items_are_skipped_and_counted(
    pair: tuple[ServiceProcess, ServiceProcess, Path],
) -> None:
    a, _, _ = pair
    wait_version(a, 1)
    with httpx.Client(base_url=a.url, timeout=30) as client:
        plain = retrieve(client, "u1")
        r = client.post(
            "/v1/retrieve",
            json={"user_id": "u1", "history": [*USERS["u1"], "new-u0"], "k": 10, "debug": True},
        )
        data = r.json()
    assert data["added_history_items"] == 1 and data["debug"]["history_used"] == len(USERS["u1"])
    assert data["items"] == plain["items"]  # the same states: what is encoded is the same
    assert 'genret_history_skipped_total{reason="added_item"}' in httpx.get(f"{a.url}/metrics").text


def test_a_reload_keeps_the_deltas(pair: tuple[ServiceProcess, ServiceProcess, Path]) -> None:
    a, _, _ = pair
    before = model_of(a)
    r = httpx.post(f"{a.admin_url}/admin/reload", headers=ADMIN_HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    after = model_of(a)
    assert after["catalogue_version"] == before["catalogue_version"] > 0
    assert after["num_live"] == before["num_live"]
