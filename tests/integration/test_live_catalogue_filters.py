"""Per-request filters and the guaranteed K against real uvicorn processes.

Property tests (hypothesis): whatever the allow-list, exclusions, k and beam, every returned item
is allowed, live and not excluded, and K is met whenever K such items exist (else ``fewer:
catalogue``); what the beam did not reach is filled by exact search and flagged
(``fallback: dense`` with ``fallback_items``). The brute-force mode answers exactly the exact
top-K over the allowed items. ``categories`` filters by raw attribute ids, added items included.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_HEADERS, BUNDLE_ITEMS, ServiceFactory

CATEGORIES = 20  # item i holds attribute "c{i % 20}" (and "even"/"odd")
HISTORY = [3, 40, 500, 77]


def ids(i: int) -> str:
    return f"item{i:0{len(str(BUNDLE_ITEMS))}d}"


def with_attributes(src: Path, dst: Path) -> Path:
    """A copy of the bundle at ``src`` whose items.npz carries attributes, re-signed as the exporter would."""
    from models.bundle.attributes import ItemAttributes
    from models.bundle.manifest import bundle_fingerprint, file_sha256

    shutil.copytree(src, dst)
    with np.load(dst / "items.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    rows: list[list[str]] = [[]] + [
        [f"c{i % CATEGORIES}", "even" if i % 2 == 0 else "odd"] for i in range(1, BUNDLE_ITEMS + 1)
    ]
    arrays.update(ItemAttributes.from_rows(rows).arrays())
    with open(dst / "items.npz", "wb") as fh:
        np.savez(fh, **arrays)
    manifest = json.loads((dst / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"] = file_sha256(dst / name)
        entry["bytes"] = (dst / name).stat().st_size
    manifest["fingerprint"] = bundle_fingerprint({n: e["sha256"] for n, e in manifest["files"].items()})
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


@pytest.fixture(scope="module")
def services(
    start_service: ServiceFactory, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ServiceProcess]:
    """generative (beam 10 over 1000 single-item leaves, bundle with attributes) and brute force."""
    tagged = with_attributes(bundle_dir, tmp_path_factory.mktemp("tagged") / "tagged")
    base = {"GENRET_CATALOGUE_POLL_S": "0"}
    return {
        "generative": start_service({**base, "GENRET_BUNDLE_PATH": str(tagged)}),
        "bruteforce": start_service(
            {**base, "GENRET_BUNDLE_PATH": str(bundle_dir), "GENRET_SEARCH_MODE": "bruteforce"}
        ),
    }


@pytest.fixture(scope="module")
def exact(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(query [Dr] of HISTORY, item_emb [N+1, Dr])``: the exact top-K reference."""
    from models.bundle.bundle import load_bundle
    from models.search.retriever import Retriever

    retriever = Retriever(load_bundle(bundle_dir))
    query = retriever.encode([np.array(HISTORY, np.int64)]).query[0].numpy()
    return query, np.asarray(retriever.bundle.item_emb)


def served(service: ServiceProcess, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{service.url}/v1/retrieve", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def check_answer(data: dict[str, Any], k: int, may: set[str]) -> None:
    """Every item allowed; k met when k allowed items exist; the dense fill flagged."""
    got = [item["id"] for item in data["items"]]
    assert set(got) <= may and len(set(got)) == len(got)
    assert len(got) == min(k, len(may)), (k, len(may), data)
    assert (data.get("fewer") == "catalogue") == (len(may) < k)
    assert (data.get("fallback") == "dense") == (data.get("fallback_items") is not None)
    if data.get("fallback") == "dense":
        assert 1 <= data["fallback_items"] <= len(got)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    allow=st.lists(st.integers(1, BUNDLE_ITEMS), min_size=0, max_size=80),
    exclude=st.lists(st.integers(1, BUNDLE_ITEMS), max_size=10),
    k=st.integers(1, 40),
    beam=st.sampled_from([1, 2, 10, 50]),
    unknown=st.booleans(),
)
def test_every_item_is_allowed_and_k_is_met_when_it_can_be(
    services: dict[str, ServiceProcess],
    exact: tuple[np.ndarray, np.ndarray],
    allow: list[int],
    exclude: list[int],
    k: int,
    beam: int,
    unknown: bool,
) -> None:
    may = {ids(i) for i in allow} - {ids(i) for i in exclude}
    body = {
        "history": [ids(i) for i in HISTORY],
        "k": k,
        "beam_size": beam,
        "allow": [ids(i) for i in allow] + (["no-such-item"] if unknown else []),
        "exclude": [ids(i) for i in exclude],
    }
    for mode, service in services.items():
        data = served(service, body)
        check_answer(data, k, may)
        if mode == "bruteforce":  # exact over the allowed items, in order
            query, emb = exact
            cands = np.array(sorted({i for i in allow} - set(exclude)), np.int64)
            best = cands[np.argsort(-(emb[cands] @ query), kind="stable")][:k] if len(cands) else cands
            assert [item["id"] for item in data["items"]] == [ids(int(i)) for i in best]


def test_an_allow_list_of_one_percent_still_returns_k(
    services: dict[str, ServiceProcess], exact: tuple[np.ndarray, np.ndarray]
) -> None:
    rng = np.random.default_rng(0)
    query, emb = exact
    for trial in range(5):
        allow = rng.choice(np.arange(1, BUNDLE_ITEMS + 1), BUNDLE_ITEMS // 100, replace=False)
        body = {"history": [ids(i) for i in HISTORY], "k": 10, "allow": [ids(int(i)) for i in allow]}
        data = served(services["generative"], body)
        check_answer(data, 10, {ids(int(i)) for i in allow})
        best = allow[np.argsort(-(emb[allow] @ query))]
        got = [item["id"] for item in data["items"]]
        assert got == [ids(int(i)) for i in best], trial  # all 10 allowed, in exact order


def test_categories_filter_by_attribute_added_items_included(
    services: dict[str, ServiceProcess], exact: tuple[np.ndarray, np.ndarray]
) -> None:
    service = services["generative"]
    body = {"history": [ids(i) for i in HISTORY], "k": 15, "categories": ["c3", "c7"]}
    holding = {ids(i) for i in range(1, BUNDLE_ITEMS + 1) if i % CATEGORIES in (3, 7)}
    check_answer(served(service, body), 15, holding)
    both = served(service, {**body, "allow": [ids(i) for i in range(1, 200)]})  # allow AND categories
    check_answer(both, 15, holding & {ids(i) for i in range(1, 200)})
    query, _ = exact
    vector = [float(x) for x in query / np.linalg.norm(query) * 100.0]
    added = {"add": [{"id": "tagged-new", "vector": vector, "attributes": ["c3"]}]}
    r = httpx.post(f"{service.admin_url}/admin/items", json=added, headers=ADMIN_HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    data = served(service, body)
    assert data["model"]["catalogue_version"] == 1
    check_answer(data, 15, holding | {"tagged-new"})
    pinned = {**body, "k": 2, "allow": ["tagged-new", ids(3)], "categories": ["c3"]}
    data = served(service, pinned)  # the added item holds c3: both allowed, k met
    assert {item["id"] for item in data["items"]} == {"tagged-new", ids(3)}
    assert data["items"][0]["id"] == "tagged-new"  # the best by far
    data = served(service, {**pinned, "allow": ["tagged-new", ids(4)], "categories": ["c4"]})
    assert [item["id"] for item in data["items"]] == [ids(4)] and data["fewer"] == "catalogue"
    r = httpx.post(
        f"{service.admin_url}/admin/items", json={"remove": ["tagged-new"]}, headers=ADMIN_HEADERS, timeout=60
    )
    assert r.status_code == 200, r.text
    check_answer(served(service, body), 15, holding)


def test_categories_need_item_attributes(services: dict[str, ServiceProcess]) -> None:
    r = httpx.post(
        f"{services['bruteforce'].url}/v1/retrieve",
        json={"history": [ids(1)], "categories": ["c1"]},
        timeout=30,
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "categories"]


def test_removed_items_leave_the_popular_fallback_too(services: dict[str, ServiceProcess]) -> None:
    service = services["bruteforce"]
    body = {"history": ["no-such-item"], "k": 5}
    first = served(service, body)
    assert first["fallback"] == "popular"
    gone = [item["id"] for item in first["items"][:2]]
    r = httpx.post(
        f"{service.admin_url}/admin/items", json={"remove": gone}, headers=ADMIN_HEADERS, timeout=60
    )
    assert r.status_code == 200, r.text
    after = served(service, body)
    assert len(after["items"]) == 5 and not set(gone) & {item["id"] for item in after["items"]}
    exact = served(service, {"history": [ids(i) for i in HISTORY], "k": 50})
    assert not set(gone) & {item["id"] for item in exact["items"]}
