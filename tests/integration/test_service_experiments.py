"""The experiment hooks wired into the engine: sticky A/B variants choose the bundle, and sampled
requests are copied to a shadow bundle whose answers land in the JSONL log, never in responses."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ServiceFactory, resign_bundle

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experiment")
    bundles = root / "bundles"
    bundles.mkdir()
    (bundles / "control").symlink_to(bundle_dir)
    resign_bundle(bundle_dir, bundles / "treatment", version="t1", negate_items=True)
    (bundles / "candidate").symlink_to(bundle_dir)
    experiment = root / "experiment.yaml"
    experiment.write_text(
        "name: ab-test\nsalt: s1\n"
        "variants:\n  - {name: a, bundle: control, weight: 0.5}\n  - {name: b, bundle: treatment, weight: 0.5}\n"
        "shadows:\n  - {bundle: candidate, sample_rate: 1.0}\n"
    )
    return {"bundles": bundles, "experiment": experiment, "log": root / "shadow.jsonl"}


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory, setup: dict[str, Path]) -> ServiceProcess:
    return start_service(
        {
            "GENRET_BUNDLE_PATH": str(setup["bundles"]),
            "GENRET_DEFAULT_MODEL": "control",
            "GENRET_EXPERIMENTS_FILE": str(setup["experiment"]),
            "GENRET_SHADOW_LOG": str(setup["log"]),
        }
    )


def test_variants_are_sticky_and_choose_the_bundle(service: ServiceProcess, setup: dict[str, Path]) -> None:
    bundle_of = {"a": "control", "b": "treatment"}
    seen: dict[str, str] = {}
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for round_ in range(2):
            for u in range(24):
                got = client.post(
                    "/v1/retrieve", json={"user_id": f"user-{u}", "history": ["item0003"], "k": 5}
                )
                assert got.status_code == 200, got.text
                data = got.json()
                assert data["model"]["name"] == bundle_of[data["variant"]]
                if round_ == 0:
                    seen[f"user-{u}"] = data["variant"]
                else:
                    assert seen[f"user-{u}"] == data["variant"]  # sticky
        assert set(seen.values()) == {"a", "b"}
        explicit = client.post(
            "/v1/retrieve", json={"user_id": "user-0", "history": ["item0003"], "model": "candidate"}
        )
        assert explicit.json()["model"]["name"] == "candidate" and explicit.json()["variant"] == "default"

        deadline = time.monotonic() + 30
        records: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(records) < 5:
            time.sleep(0.2)
            if setup["log"].exists():
                records = [json.loads(line) for line in setup["log"].read_text().splitlines() if line.strip()]
        assert len(records) >= 5, "shadow copies never reached the log"
        assert all(r["shadow"]["bundle"] == "candidate" and r["shadow"]["error"] is None for r in records)
        assert "genret_shadow_requests_total" in client.get("/metrics").text
