"""The service answers a request with no beam at the bundle's own default beam (manifest
``config.beam_size``, the catalogue rule), exactly as the offline evaluation does; a request for k
items gets k items (the beam widens for k and the excluded ids) or says why it has fewer.

Real uvicorn process started without GENRET_DEFAULT_BEAM_SIZE; the offline side is
:class:`training.bundle_recommender.BundleRecommender`, the evaluator's recommender.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_TOKEN, BUNDLE_ITEMS

pytestmark = pytest.mark.integration


def ids(n: int) -> str:
    return f"item{n:04d}"


@pytest.fixture(scope="module")
def service(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    assert "GENRET_DEFAULT_BEAM_SIZE" not in os.environ  # the service must fall back to the bundle's own
    env = {
        "GENRET_ENV": "test",
        "GENRET_ADMIN_TOKEN": ADMIN_TOKEN,
        "GENRET_BUNDLE_PATH": str(bundle_dir),
        "GENRET_MAX_K": "200",
        "OMP_NUM_THREADS": "1",
    }
    proc = ServiceProcess(env, tmp_path_factory.mktemp("default-beam") / "service.log").start(
        ready_timeout_s=180
    )
    yield proc
    proc.stop(timeout_s=20)


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60.0) as c:
        yield c


def served(client: httpx.Client, body: dict) -> dict:
    response = client.post("/v1/retrieve", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("k", [20, 50, 200])
def test_no_beam_given_serves_what_the_offline_evaluation_measures(
    client: httpx.Client, bundle_dir: Path, k: int
) -> None:
    from training.bundle_recommender import BundleRecommender

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    offline = BundleRecommender(bundle_dir)  # no beam: the bundle's default, as `genret eval`
    assert offline.beam_size == manifest["config"]["beam_size"] == 100  # 1000 items -> the 100 floor
    rng = np.random.default_rng(k)
    histories = [
        rng.choice(np.arange(1, BUNDLE_ITEMS + 1), int(n), replace=False) for n in (1, 5, 12, 30, 45)
    ]
    expected = offline.recommend(histories, k, histories)  # [5, k], history excluded
    for row, history in enumerate(histories):
        body = {"user_id": f"beam-{k}-{row}", "history": [ids(int(h)) for h in history], "k": k}
        data = served(client, {**body, "exclude_history": True})
        got = [item["id"] for item in data["items"]]
        assert got == [ids(int(i)) for i in expected[row] if i > 0]
        assert len(got) == k and data.get("fewer") is None  # k=200 needs a beam twice the default


def test_fewer_items_say_why(client: httpx.Client, bundle_dir: Path) -> None:
    from models.bundle.bundle import load_bundle
    from models.search.retriever import Retriever

    history = [ids(i) for i in (3, 40, 500)]
    # the catalogue: 900 of 1000 items excluded leaves 100 < k
    data = served(client, {"history": history, "k": 150, "exclude": [ids(i) for i in range(101, 1001)]})
    assert len(data["items"]) < 150 and data["fewer"] == "catalogue"
    # the beam bound: exclude the best items of the widest beam (256 single-item leaves), so that
    # its leaves keep fewer than k items although the catalogue holds enough
    retriever = Retriever(load_bundle(bundle_dir))
    dense = np.array([[3, 40, 500]])
    widest = retriever.retrieve(list(dense), k=256, beam_size=256).items[0]
    exclude = [ids(int(i)) for i in widest[:150]]
    data = served(client, {"history": history, "k": 200, "exclude": exclude})
    # the beam skips leaves with nothing left to return, and the dense fill completes
    # what it still misses (`fallback: dense`): k is met, never `beam_limit`
    assert len(data["items"]) == 200 and data.get("fewer") is None
    assert not set(exclude) & {item["id"] for item in data["items"]}
