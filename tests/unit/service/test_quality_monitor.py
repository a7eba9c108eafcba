"""The quality monitor's staged run (service/shadow/quality_monitor.py): its exact list is brute-force
top-K over what the request may return, its leaves the beam's, and the moving average's window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.bundle.bundle import load_bundle
from models.catalogue.catalogue import Catalogue, Delta
from models.search.bruteforce import bruteforce_topk
from models.search.retriever import Retriever
from service.shadow import quality_monitor
from service.shadow.quality_monitor import ExactAndBeam, MovingAverage


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("quality") / "b"
    path = make_synthetic_bundle(out, 300, 4, 2, dim=16, seed=3, num_layers=1, backends=("torch",))
    return Retriever(load_bundle(path), "cpu", "torch")


def run(r: Retriever, history: np.ndarray, k: int, beam: int, exclude: np.ndarray, allow: np.ndarray | None = None) -> ExactAndBeam:  # fmt: skip
    staged = ExactAndBeam(r, r.encode([history]), k, beam, exclude, allow)
    names = []
    while not staged.done:
        names.append(staged.next_stage)
        staged.step()
    assert names[-1] == "exact" and names[0] == "level1"
    return staged


def test_exact_list_is_brute_force_and_leaves_are_the_beams(retriever: Retriever, monkeypatch) -> None:
    monkeypatch.setattr(quality_monitor, "CHUNK_ROWS", 64)  # several exact stages
    history, exclude = np.array([3, 7, 9]), np.array([5, 11, 200])
    staged = run(retriever, history, 10, 4, exclude)
    query = retriever.encode([history]).query.to(torch.float32)
    truth, _ = bruteforce_topk(query, retriever.item_emb, 10, [exclude])
    assert staged.result().items[0].tolist() == truth[0].tolist()
    served = retriever.retrieve([history], 10, 4, [exclude])
    assert sorted(staged.leaves.tolist()) == sorted(served.leaves[0].tolist())
    in_beam = np.isin(retriever.bundle.index.item_path[truth[0], -1], served.leaves[0])
    assert staged.coverage(truth[0]) == pytest.approx(in_beam.mean())
    wide = run(retriever, history, 10, 16, exclude)  # 16 leaves: the whole tree
    assert wide.coverage(wide.result().items[0]) == 1.0


def test_allow_list_and_removed_items(retriever: Retriever) -> None:
    history = np.array([1, 2])
    allow = np.arange(100, 140)
    staged = run(retriever, history, 5, 4, np.zeros(0, np.int64), allow)
    assert np.isin(staged.result().items[0], allow).all() and len(staged.result().items[0]) == 5
    top = int(run(retriever, history, 5, 4, np.zeros(0, np.int64)).result().items[0][0])
    raw = str(retriever.bundle.item_ids[top])
    cat, _ = Catalogue.from_bundle(retriever.bundle).apply(Delta.from_json({"remove": [raw]}))
    after = run(retriever.with_catalogue(cat), history, 5, 4, np.zeros(0, np.int64))
    assert top not in after.result().items[0].tolist()


def test_moving_average_keeps_the_last_window() -> None:
    avg = MovingAverage(window=3)
    assert [avg.add(v) for v in (1.0, 0.0, 0.5, 0.5)] == pytest.approx([1.0, 0.5, 0.5, 1.0 / 3])


class _Listeners:
    """The one engine call the monitor makes at construction: registering its listener."""

    def __init__(self) -> None:
        self.listeners: list[object] = []

    def on_primary_result(self, listener: object) -> None:
        self.listeners.append(listener)


def test_bad_share_is_refused_and_a_sampling_monitor_listens() -> None:
    engine = _Listeners()
    with pytest.raises(ValueError, match="quality sample"):
        quality_monitor.QualityMonitor(engine, 1.5)  # type: ignore[arg-type]
    quality_monitor.QualityMonitor(engine, 0.0)  # type: ignore[arg-type]
    assert engine.listeners == []  # sampling off: not on the primary path at all
    monitor = quality_monitor.QualityMonitor(engine, 0.5)  # type: ignore[arg-type]
    assert engine.listeners == [monitor.observe]


def test_the_exact_scoring_keeps_to_its_items_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 items a second and 600-item samples: one sample now, the next only after the bucket refilled."""
    clock = [100.0]
    monkeypatch.setattr(quality_monitor.time, "monotonic", lambda: clock[0])
    monitor = quality_monitor.QualityMonitor(_Listeners(), 0.5, max_items_per_s=1000.0)  # type: ignore[arg-type]
    clock[0] += 1.0
    assert monitor._spend(600) and not monitor._spend(600)
    clock[0] += 0.5
    assert monitor._spend(600)  # 400 left + 500 refilled
    clock[0] += 100.0
    assert monitor._spend(600) and not monitor._spend(600)  # the bucket holds one second, not 100
    clock[0] += 10.0
    assert monitor._spend(5000)  # one sample larger than a second's budget still runs once the bucket is full
    unbounded = quality_monitor.QualityMonitor(_Listeners(), 0.5)  # type: ignore[arg-type]
    assert all(unbounded._spend(10**9) for _ in range(3))
