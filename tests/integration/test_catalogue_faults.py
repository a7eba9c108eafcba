"""Hostile records in the shared delta log, against two real uvicorn processes (docs/live_catalogue.md
"A bad record"): each one is quarantined on both replicas (counted once by reason, the lag back to
0), a valid delta written after it through ``POST /admin/items`` still applies on both, requests
running meanwhile see no error, and a replica started on the log with every fault in it starts and
serves. Then empty answers: every allowed item removed, then every item removed, answer 200 with
``items: []`` and ``fewer: "catalogue"``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.launcher import ServiceProcess
from tests.integration.conftest import ADMIN_HEADERS, ServiceFactory

ITEMS = 300
HISTORY = ["item001", "item002", "item003"]
MAX_FILE_BYTES = 1_048_576  # the setting's least value
MAX_ITEMS = 50
ASYNC_ITEMS = 20  # a delta of more ids answers 202 with a job


@pytest.fixture(scope="module")
def fault_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("fault-bundles") / "faults"
    return make_synthetic_bundle(out, ITEMS, 8, 2, dim=16, seed=5, num_layers=1)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, fault_bundle: Path) -> dict[str, str]:
    """The settings of every replica here: one bundle, one delta directory."""
    return {
        "GENRET_BUNDLE_PATH": str(fault_bundle),
        "GENRET_CATALOGUE_DIR": str(tmp_path_factory.mktemp("fault-deltas")),
        "GENRET_CATALOGUE_POLL_S": "0.2",
        "GENRET_DEFAULT_BEAM_SIZE": "128",
        "GENRET_MAX_DELTA_ITEMS": str(MAX_ITEMS),
        "GENRET_CATALOGUE_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
        "GENRET_CATALOGUE_ASYNC_ITEMS": str(ASYNC_ITEMS),
    }


@pytest.fixture(scope="module")
def pair(start_service: ServiceFactory, shared: dict[str, str]) -> tuple[ServiceProcess, ServiceProcess]:
    return start_service(shared), start_service(shared)


def model_of(service: ServiceProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{service.url}/v1/models", timeout=10).json()["models"][0])


def deltas_of(shared: dict[str, str], bundle: Path) -> Path:
    return Path(shared["GENRET_CATALOGUE_DIR"]) / f"{bundle.name}.deltas"


def quarantined(service: ServiceProcess, reason: str) -> float:
    name = model_of(service)["name"]
    prefix = f'genret_catalogue_quarantined_total{{model="{name}",reason="{reason}"}} '
    for line in httpx.get(f"{service.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def at_version(service: ServiceProcess, version: int) -> bool:
    return bool(model_of(service)["catalogue_version"] == version)


def counted_as(service: ServiceProcess, reason: str, count: float) -> bool:
    return quarantined(service, reason) == count


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Load:
    """One client per service sending retrievals until stopped; every non-200 answer is kept."""

    def __init__(self, services: list[ServiceProcess]) -> None:
        self.failures: list[str] = []
        self.answers = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s,)) for s in services]

    def _run(self, service: ServiceProcess) -> None:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            while not self._stop.is_set():
                r = client.post("/v1/retrieve", json={"history": HISTORY, "k": 10})
                if r.status_code != 200:
                    self.failures.append(f"{service.url}: {r.status_code} {r.text[:200]}")
                self.answers += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def envelope(fingerprint: str, delta: Any, version: Any = 1) -> dict[str, Any]:
    return {"base_fingerprint": fingerprint, "version": version, "delta": delta}


def next_seq(folder: Path) -> int:
    names = [int(p.name[:-5]) for p in folder.glob("[0-9]*.json")] if folder.exists() else []
    return max(names, default=0) + 1


def write_version_1e999(path: Path, fp: str) -> None:
    path.write_text(
        json.dumps(envelope(fp, {"remove": ["item010"]}, version=7)).replace(
            '"version": 7', '"version": 1e999'
        )
    )


def write_nested(path: Path, fp: str) -> None:
    path.write_text(f'{{"base_fingerprint": "{fp}", "version": 1, "delta": {"[" * 200_000}{"]" * 200_000}}}')


def write_fifo(path: Path, fp: str) -> None:
    os.mkfifo(path)  # no writer ever opens it: a blocking open would hang the catalogue thread


def write_not_utf8(path: Path, fp: str) -> None:
    path.write_bytes(json.dumps(envelope(fp, {"remove": ["XX"]})).encode().replace(b"XX", b"\xff\xfe"))


def write_too_large(path: Path, fp: str) -> None:
    path.write_text(json.dumps(envelope(fp, {"remove": ["item010"]})) + " " * MAX_FILE_BYTES)


def write_wrong_types(path: Path, fp: str) -> None:
    path.write_text(json.dumps(envelope(fp, {"add": {"id": "x"}, "remove": "item010"}, version="2")))


def write_too_many(path: Path, fp: str) -> None:
    path.write_text(
        json.dumps(envelope(fp, {"remove": [f"item{i:03d}" for i in range(100, 100 + MAX_ITEMS + 1)]}))
    )


def write_contradicting(path: Path, fp: str) -> None:
    path.write_text(json.dumps(envelope(fp, {"remove": ["no-such-item"]})))


FAULTS: list[tuple[str, Callable[[Path, str], None], str]] = [
    ("version_1e999", write_version_1e999, "bad_record"),
    ("nested_200000", write_nested, "bad_json"),
    ("fifo", write_fifo, "not_regular_file"),
    ("not_utf8", write_not_utf8, "not_utf8"),
    ("too_large", write_too_large, "too_large"),
    ("wrong_types", write_wrong_types, "bad_record"),
    ("too_many_items", write_too_many, "too_many_items"),
    ("contradicting", write_contradicting, "refused"),
]


@pytest.mark.parametrize("name,write,reason", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_hostile_record_is_quarantined_and_a_later_delta_applies(
    pair: tuple[ServiceProcess, ServiceProcess],
    shared: dict[str, str],
    fault_bundle: Path,
    name: str,
    write: Callable[[Path, str], None],
    reason: str,
) -> None:
    a, b = pair
    folder = deltas_of(shared, fault_bundle)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(fault_bundle)
    counted = {s.url: quarantined(s, reason) for s in pair}
    with Load([a, b]) as load:
        write(folder / f"{next_seq(folder):06d}.json", fingerprint)
        r = httpx.post(
            f"{a.admin_url}/admin/items",
            json={"add": [{"id": f"after-{name}", "vector": [0.5] * 16}]},
            headers=ADMIN_HEADERS,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        for s in pair:
            wait_for(partial(at_version, s, version), f"{s.url} at version {version}")
            wait_for(partial(counted_as, s, reason, counted[s.url] + 1), f"{s.url} counting {reason}")
    assert not load.failures, load.failures[:3]
    assert load.answers > 0
    for s in pair:
        ready = httpx.get(f"{s.url}/readyz", timeout=10)
        assert ready.status_code == 200 and set(ready.json()["catalogue_lag"].values()) == {0}, ready.text
        assert [item["id"] for item in retrieve(s, allow=[f"after-{name}"])["items"]] == [f"after-{name}"]
    time.sleep(0.5)  # a few more polls: still counted once
    assert all(quarantined(s, reason) == counted[s.url] + 1 for s in pair)


def _fingerprint(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["fingerprint"])


def test_a_hostile_admin_body_is_a_4xx_and_nothing_is_written(
    pair: tuple[ServiceProcess, ServiceProcess], shared: dict[str, str], fault_bundle: Path
) -> None:
    a, _ = pair
    folder = deltas_of(shared, fault_bundle)
    before = sorted(p.name for p in folder.iterdir())
    version = model_of(a)["catalogue_version"]
    bodies = [
        b'{"add": [{"id": "x", "vector": [1e999' + b", 0.5" * 15 + b"]}]}",
        b'{"add": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"remove": ["\\ud800"]}',
        b'{"remove": ["\xff"]}',
    ]
    for body in bodies:
        r = httpx.post(
            f"{a.admin_url}/admin/items",
            content=body,
            headers={**ADMIN_HEADERS, "content-type": "application/json"},
            timeout=60,
        )
        assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text[:300])
    assert sorted(p.name for p in folder.iterdir()) == before
    assert model_of(a)["catalogue_version"] == version


def test_a_new_replica_starts_on_the_log_with_every_fault_in_it(
    start_service: ServiceFactory, pair: tuple[ServiceProcess, ServiceProcess], shared: dict[str, str]
) -> None:
    a, _ = pair
    late = start_service(shared)  # start_service waits for /readyz: it must start
    assert model_of(late)["catalogue_version"] == model_of(a)["catalogue_version"]
    for _, _, reason in FAULTS:
        assert quarantined(late, reason) >= 1, reason
    assert set(httpx.get(f"{late.url}/readyz", timeout=10).json()["catalogue_lag"].values()) == {0}
    request = {"history": HISTORY, "k": 10}
    one = httpx.post(f"{a.url}/v1/retrieve", json=request, timeout=10).json()["items"]
    assert httpx.post(f"{late.url}/v1/retrieve", json=request, timeout=10).json()["items"] == one


def test_a_large_delta_answers_202_and_its_job_tells_when_it_is_live(
    pair: tuple[ServiceProcess, ServiceProcess],
) -> None:
    a, b = pair
    before = model_of(a)["catalogue_version"]
    body = {"add": [{"id": f"bulk-{i}", "vector": [0.1 * (i % 7)] * 16} for i in range(ASYNC_ITEMS + 5)]}
    with Load([a, b]) as load, httpx.Client(base_url=a.admin_url, headers=ADMIN_HEADERS, timeout=30) as admin:
        r = admin.post("/admin/items", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] in ("queued", "running", "live") and job["base_version"] == before
        assert job["items"] == ASYNC_ITEMS + 5
        status: dict[str, Any] = {}

        def live_now() -> bool:
            status.update(admin.get(f"/admin/items/jobs/{job['job']}").json())
            return status["state"] == "live"

        wait_for(live_now, "the job to be live")
        assert status["version"] == before + 1 and status["added"] == ASYNC_ITEMS + 5
        wait_for(partial(at_version, b, before + 1), "the other replica")
        assert admin.get("/admin/items/jobs/no-such-job").status_code == 404
        bad = admin.post("/admin/items", json={"remove": ["no-such-item"] * (ASYNC_ITEMS + 1)})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "remove", 0]
    assert not load.failures, load.failures[:3]
    assert model_of(a)["num_live"] == model_of(b)["num_live"]


def retrieve(service: ServiceProcess, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{service.url}/v1/retrieve", json={"history": HISTORY, "k": 10, **body}, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_empty_results_are_answers(pair: tuple[ServiceProcess, ServiceProcess]) -> None:
    """Every allowed item removed, then every item removed: 200, no items, fewer "catalogue"."""
    a, b = pair
    gone = ["item030", "item031", "item032"]
    r = httpx.post(f"{a.admin_url}/admin/items", json={"remove": gone}, headers=ADMIN_HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    bodies: list[dict[str, Any]] = [
        {"allow": gone},
        {"allow": gone, "beam_size": 256},
        {"allow": gone, "history": []},
    ]
    for body in bodies:
        data = retrieve(a, **body)
        assert data["items"] == [] and data["fewer"] == "catalogue", (body, data)
    with httpx.Client(base_url=a.admin_url, headers=ADMIN_HEADERS, timeout=60) as admin:
        while found := retrieve(a, k=ASYNC_ITEMS, beam_size=256)["items"]:  # k is met while k items exist
            r = admin.post("/admin/items", json={"remove": [item["id"] for item in found]})
            assert r.status_code == 200, r.text
    version = model_of(a)["catalogue_version"]
    wait_for(partial(at_version, b, version), "the other replica")
    for service in (a, b):
        assert model_of(service)["num_live"] == 0
        empty: list[dict[str, Any]] = [
            {},
            {"beam_size": 256},
            {"allow": ["item040", "item041"]},
            {"history": []},
        ]
        for body in empty:
            data = retrieve(service, **body)
            assert data["items"] == [] and data["fewer"] == "catalogue", (body, data)
