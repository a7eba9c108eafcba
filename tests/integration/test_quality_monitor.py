"""The live quality monitor against a real uvicorn (service/shadow/quality_monitor.py): with every request
sampled, ``genret_quality_overlap`` / ``genret_quality_beam_coverage`` appear in /metrics in [0, 1],
and a beam that reaches every leaf gives overlap and coverage 1."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.launcher import ServiceProcess
from benchmarks.shadow import metric_samples
from tests.integration.conftest import ADMIN_HEADERS, ServiceFactory

OVERLAP = "genret_quality_overlap"
COVERAGE = "genret_quality_beam_coverage"
SAMPLES = "genret_quality_samples_total"


def item_ids(bundle: Path) -> list[str]:
    with np.load(bundle / "items.npz", allow_pickle=False) as data:
        return [str(x) for x in data["item_ids"][1:]]


def drive(service: ServiceProcess, ids: list[str], n: int, beam_size: int, k: int = 10) -> set[str]:
    """``n`` requests with random histories; every item id served."""
    rng = np.random.default_rng(0)
    served: set[str] = set()
    with httpx.Client(base_url=service.url, timeout=30.0) as client:
        for _ in range(n):
            history = [ids[int(i)] for i in rng.choice(len(ids), 5, replace=False)]
            r = client.post("/v1/retrieve", json={"history": history, "k": k, "beam_size": beam_size})
            assert r.status_code == 200, r.text
            served.update(item["id"] for item in r.json()["items"])
    return served


def wait_gauges(service: ServiceProcess, samples: int, timeout_s: float = 60.0) -> dict[str, float]:
    """The monitor's gauges for the one model once ``samples`` samples ran ok."""
    deadline = time.monotonic() + timeout_s
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        text = httpx.get(f"{service.url}/metrics", timeout=5.0).text
        values = {}
        ok = 0.0
        for name, labels, value in metric_samples(text):
            if name in (OVERLAP, COVERAGE):
                values[name] = value
            if name == SAMPLES and labels.get("result") == "ok":
                ok += value
        if ok >= samples and len(values) == 2:
            return values
        time.sleep(0.2)
    pytest.fail(f"monitor gauges not there after {timeout_s}s: {values}\n{service.log_tail()}")


@pytest.fixture(scope="module")
def covered_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 items in 16 leaves: a beam of 16 reaches every leaf."""
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("quality") / "covered"
    return make_synthetic_bundle(out, 200, 4, 2, dim=32, seed=1, num_layers=1)


def test_gauges_in_range_under_a_narrow_beam(start_service: ServiceFactory, bundle_dir: Path) -> None:
    service = start_service({"GENRET_BUNDLE_PATH": str(bundle_dir), "GENRET_QUALITY_SAMPLE": "1.0"})
    drive(service, item_ids(bundle_dir), 12, beam_size=10)
    values = wait_gauges(service, 12)
    assert 0.0 <= values[OVERLAP] <= 1.0
    assert 0.0 <= values[COVERAGE] <= 1.0


def test_a_beam_over_every_leaf_gives_overlap_one(
    start_service: ServiceFactory, covered_bundle: Path
) -> None:
    service = start_service({"GENRET_BUNDLE_PATH": str(covered_bundle), "GENRET_QUALITY_SAMPLE": "1.0"})
    drive(service, item_ids(covered_bundle), 8, beam_size=16)
    values = wait_gauges(service, 8)
    assert values[OVERLAP] == pytest.approx(1.0)
    assert values[COVERAGE] == pytest.approx(1.0)


def test_off_exports_no_sample(start_service: ServiceFactory, covered_bundle: Path) -> None:
    service = start_service({"GENRET_BUNDLE_PATH": str(covered_bundle), "GENRET_QUALITY_SAMPLE": "0"})
    drive(service, item_ids(covered_bundle), 4, beam_size=16)
    names = {name for name, _, _ in metric_samples(httpx.get(f"{service.url}/metrics").text)}
    assert SAMPLES not in names and OVERLAP not in names


def test_overlap_one_on_a_newer_catalogue_version(
    start_service: ServiceFactory, covered_bundle: Path, tmp_path: Path
) -> None:
    """Added items (vectors 3x existing ones: high inner products) and removed items: the exact list
    is over the version's live items, and a beam over every leaf (new leaves included) still gives 1."""
    service = start_service(
        {
            "GENRET_BUNDLE_PATH": str(covered_bundle),
            "GENRET_QUALITY_SAMPLE": "1.0",
            "GENRET_CATALOGUE_DIR": str(tmp_path / "deltas"),
        }
    )
    ids = item_ids(covered_bundle)
    with np.load(covered_bundle / "items.npz", allow_pickle=False) as data:
        emb = data["item_emb"]
    add = [{"id": f"hot-{i}", "vector": [3.0 * float(x) for x in emb[1 + 17 * i]]} for i in range(6)]
    r = httpx.post(
        f"{service.admin_url}/admin/items",
        json={"add": add, "remove": ids[:3]},
        headers=ADMIN_HEADERS,
        timeout=60.0,
    )
    assert r.status_code == 200, r.text
    served = drive(service, ids[3:], 8, beam_size=64)
    assert any(i.startswith("hot-") for i in served) and not served & set(ids[:3])
    values = wait_gauges(service, 8)
    assert values[OVERLAP] == pytest.approx(1.0)
    assert values[COVERAGE] == pytest.approx(1.0)
