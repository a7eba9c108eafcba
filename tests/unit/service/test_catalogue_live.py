"""Deltas applied to serving models (service/catalogue/live.py) and the request mapping over a live
catalogue (service/engine/request_map.py), in process on a small torch-only bundle."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from models.catalogue.delta import DeltaError
from service.catalogue.live import LiveCatalogue
from service.catalogue.store import DeltaStore
from service.engine.request_map import RequestMapper
from service.errors import LimitExceeded
from service.registry.model_registry import ModelRegistry
from service.schemas import RetrieveRequest
from service.settings import Settings

ITEMS = 200


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("bundles") / "small"
    return make_synthetic_bundle(out, ITEMS, 8, 2, dim=16, seed=0, num_layers=1, backends=("torch",))


def serving(bundle: Path, deltas: Path, **extra: object) -> tuple[ModelRegistry, LiveCatalogue]:
    settings = Settings(bundle_path=bundle, decoder_backend="torch", catalogue_dir=deltas, **extra)  # type: ignore[arg-type]
    registry = ModelRegistry(settings)
    live = LiveCatalogue(settings, registry)
    registry.load_all()
    return registry, live


def new_item(i: int, dim: int = 16) -> dict[str, object]:
    return {"id": f"new-{i}", "vector": np.random.default_rng(i).normal(size=dim).tolist()}


def test_a_delta_makes_a_new_model_and_the_old_one_stays_as_it_was(bundle: Path, tmp_path: Path) -> None:
    registry, live = serving(bundle, tmp_path)
    old = registry.get()
    out = live.add(None, {"add": [new_item(1), new_item(2)], "remove": ["item001"]})
    assert out["version"] == 1 and out["added"] == 2 and out["removed"] == 1
    new = registry.get()
    assert new is not old and new.catalogue_version == 1 and new.num_live == ITEMS + 1
    assert new.dense_of["new-1"] == ITEMS + 1 and "item001" not in new.dense_of
    assert new.history_dense(["item001"]) == [1]  # a removed item still encodes
    assert 1 not in new.popular and ITEMS + 1 in new.popular
    assert old.catalogue_version == 0 and old.num_items == ITEMS and "item001" in old.dense_of
    assert new.describe()["catalogue_version"] == 1 and new.describe()["num_live"] == ITEMS + 1


def test_nothing_is_written_for_a_delta_that_cannot_apply(bundle: Path, tmp_path: Path) -> None:
    registry, live = serving(bundle, tmp_path, max_delta_items=3)
    with pytest.raises(DeltaError) as err:
        live.add(None, {"add": [{"id": "x", "vector": [1.0, 2.0]}]})
    assert err.value.field == "add[0].vector"
    with pytest.raises(LimitExceeded):
        live.add(None, {"remove": ["item001", "item002", "item003", "item004"]})
    assert registry.get().catalogue_version == 0 and not list(tmp_path.rglob("*.json"))


def test_replicas_writing_at_once_converge(bundle: Path, tmp_path: Path) -> None:
    replicas = [serving(bundle, tmp_path) for _ in range(3)]
    errors: list[BaseException] = []

    def write(r: int) -> None:
        try:
            for j in range(4):
                replicas[r][1].add(None, {"add": [new_item(100 * r + j)]})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for _, live in replicas:
        live.sync_all()
    models = [registry.get() for registry, _ in replicas]
    assert {m.catalogue_version for m in models} == {12}
    assert len({tuple(m.raw_ids) for m in models}) == 1  # the same dense ids everywhere
    emb = [m.item_emb.cpu().numpy() for m in models]
    assert all(np.array_equal(emb[0], e) for e in emb[1:])


def test_a_contradicting_file_is_skipped_alike_and_a_reload_keeps_the_deltas(
    bundle: Path, tmp_path: Path
) -> None:
    registry, live = serving(bundle, tmp_path)
    live.add(None, {"add": [new_item(1)]})
    model = registry.get()
    store = DeltaStore(next(tmp_path.iterdir()))
    from models.catalogue.delta import Delta

    store.claim(2, model.fingerprint, 2, Delta.from_json({"remove": ["no-such-item"]}))
    live.sync_all()
    assert registry.get().catalogue_version == 1 and registry.get().catalogue_seq == 2
    live.add(None, {"remove": ["new-1"]})
    assert registry.get().catalogue_version == 2 and registry.get().catalogue_seq == 3
    registry.reload()
    again = registry.get()
    assert again.catalogue_version == 2 and "new-1" not in again.dense_of and again.num_live == ITEMS


def test_the_mapping_skips_added_history_items_and_maps_filters(bundle: Path, tmp_path: Path) -> None:
    registry, live = serving(bundle, tmp_path)
    live.add(None, {"add": [new_item(1), new_item(2)], "remove": ["item005"]})
    mapper = RequestMapper(registry._settings, registry, None, lambda user, history: "x")
    request = RetrieveRequest(
        history=["item001", "new-1", "item005", "nope"],
        allow=["new-2", "item005", "item007", "nope"],
        exclude=["item007"],
    )
    mapped = mapper.map(request)
    assert list(mapped.history) == [1, 5] and mapped.added == 1 and mapped.unknown == 1
    assert (
        mapped.allow is not None and list(mapped.allow) == [7, ITEMS + 2] and mapped.available == 1
    )  # removed + unknown ignored
    plain_request = RetrieveRequest(history=["item001", "item005"])
    plain = mapper.map(plain_request)
    key = mapped.row_input().key
    assert key == plain.row_input().key  # keyed on what is encoded
    assert plain.available == ITEMS + 2 - 1
    with pytest.raises(LimitExceeded) as err:
        mapper.map(RetrieveRequest(history=["item001"], categories=["c1"]))
    assert err.value.loc == ("categories",)


def test_hostile_files_are_quarantined_and_the_log_goes_on(bundle: Path, tmp_path: Path) -> None:
    """Files no replica can apply ahead of good ones: the replica starts, applies the good ones,
    counts each bad one once by reason, and an add takes the next number."""
    from models.catalogue.delta import Delta
    from service.catalogue.store import delta_dir, file_name
    from service.metrics import REGISTRY

    registry, _ = serving(bundle, tmp_path)
    model = registry.get()
    folder = delta_dir(model.path, tmp_path)
    store = DeltaStore(folder)
    body = {"base_fingerprint": model.fingerprint, "version": 1, "delta": {"remove": ["item003"]}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file_name(1)).write_text(json.dumps(body).replace('"version": 1', '"version": 1e999'))
    nested = "[" * 200_000 + "]" * 200_000
    (folder / file_name(2)).write_text(f'{{"base_fingerprint": "{model.fingerprint}", "delta": {nested}}}')
    os.mkfifo(folder / file_name(3))
    store.claim(4, model.fingerprint, 1, Delta.from_json({"remove": ["item004"]}))
    store.claim(5, model.fingerprint, 2, Delta.from_json({"remove": ["item004"]}))  # contradicts 4

    def count(reason: str) -> float:
        value = REGISTRY.get_sample_value(
            "genret_catalogue_quarantined_total", {"model": model.name, "reason": reason}
        )
        return value or 0.0

    before = {r: count(r) for r in ("bad_record", "bad_json", "not_regular_file", "refused")}
    registry, live = serving(bundle, tmp_path)  # a new replica starts on this log
    served = registry.get()
    assert served.catalogue_version == 1 and served.catalogue_seq == 5 and "item004" not in served.dense_of
    assert {r: count(r) - before[r] for r in before} == {r: 1.0 for r in before}
    assert live.lags[served.name] == 0
    live.sync_all()  # polled again: nothing counted twice
    assert {r: count(r) - before[r] for r in before} == {r: 1.0 for r in before}
    out = live.add(None, {"remove": ["item005"]})
    assert out["version"] == 2 and registry.get().catalogue_seq == 6


def test_a_replica_that_cannot_install_its_deltas_starts_and_reports_its_lag(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the served version fails (as a device out of memory would): the replica starts on
    the version it has, its lag says how far behind it is, and the poller catches up once it can."""
    from models.search.retriever import Retriever
    from service.metrics import REGISTRY

    registry, live = serving(bundle, tmp_path)
    live.add(None, {"add": [new_item(1)]})
    live.add(None, {"remove": ["item002"]})

    def fails(self: Retriever, catalogue: object) -> Retriever:
        raise MemoryError("no room for the new item table")

    with monkeypatch.context() as patch:
        patch.setattr(Retriever, "with_catalogue", fails)
        registry, live = serving(bundle, tmp_path)  # starts
        model = registry.get()
        assert model.catalogue_version == 0 and live.lags[model.name] == 2
        assert REGISTRY.get_sample_value("genret_catalogue_lag_versions", {"model": model.name}) == 2
        live.sync_all()  # still failing: still serving version 0
        assert registry.get().catalogue_version == 0
    live.sync_all()
    assert registry.get().catalogue_version == 2 and live.lags[model.name] == 0
    assert REGISTRY.get_sample_value("genret_catalogue_lag_versions", {"model": model.name}) == 0


def test_replicas_install_the_writers_placement(bundle: Path, tmp_path: Path) -> None:
    """The published file carries the writer's placement and vectors: another replica installs it
    without placing again, and holds the same catalogue."""
    (ra, a), (rb, b) = serving(bundle, tmp_path), serving(bundle, tmp_path)
    out = a.add(None, {"add": [new_item(i) for i in range(20)], "remove": ["item009"]})
    record = json.loads(next(tmp_path.rglob("000001.json")).read_text())
    assert len(record["placement"]["leaf"]) > 0 and all("vector_f32" in x for x in record["delta"]["add"])
    _, reports = b.sync(rb.get().name)
    assert reports[1].carried and reports[1].version == out["version"] == 1
    ma, mb = ra.get(), rb.get()
    assert ma.raw_ids == mb.raw_ids
    cat_a, cat_b = ma.retriever.catalogue, mb.retriever.catalogue
    assert cat_a is not None and cat_b is not None
    for name in ("leaf_of", "decoder_node", "parent"):
        np.testing.assert_array_equal(getattr(cat_a, name), getattr(cat_b, name))


def test_a_large_delta_is_a_job_that_ends_live_or_refused(bundle: Path, tmp_path: Path) -> None:
    registry, live = serving(bundle, tmp_path, catalogue_async_items=3)
    big = {"add": [new_item(i) for i in range(4)]}
    assert live.deferred(big) and not live.deferred({"remove": ["item001"]})
    with pytest.raises(DeltaError):  # checked when accepted: nothing queued
        live.accept(None, {"remove": ["no-such-item", "item001", "item002", "item003"]})
    job, delta = live.accept(None, big)
    assert job.state == "queued" and job.base_version == 0 and registry.get().catalogue_version == 0
    live.complete(job, delta)
    assert job.state == "live" and job.describe()["version"] == 1 and registry.get().catalogue_version == 1
    assert live.jobs.get(job.id) is job
    late, late_delta = live.accept(None, {"remove": ["item001", "item002", "item003", "item004"]})
    live.add(None, {"remove": ["item002"]})  # another delta takes one of its items first
    live.complete(late, late_delta)
    assert late.state == "refused" and late.error["field"] == "remove[1]"
    assert registry.get().catalogue_version == 2 and "item001" in registry.get().dense_of  # nothing written
