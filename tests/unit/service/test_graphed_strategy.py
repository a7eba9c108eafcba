"""Primary batches go through the retriever's CUDA-graph runner when it has one (service/engine/
strategy.py): one ``"graph"`` stage answering what the eager staged search does, the eager stages
for allow-lists and for batches a graph cannot serve. The runner runs eagerly here
(``capture=False``: the CPU has no graphs); tests/unit/models/test_graph_search.py holds it to the
eager search, test_torch_bundle.py the captured graphs on ``cuda``."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from models.bundle.bundle import load_bundle
from models.search.graph_runner import GraphRunner
from models.search.retriever import Retriever
from service.engine.strategy import GenerativeSearch, StagedRun
from service.registry.model_registry import LoadedModel

ITEMS = 300


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("bundles") / "small"
    path = make_synthetic_bundle(out, ITEMS, 8, 2, dim=16, seed=0, num_layers=1, backends=("torch",))
    return Retriever(load_bundle(path), "cpu", "torch", intra_op_threads=1)


def as_model(retriever: Retriever) -> LoadedModel:
    """The strategy reads only a model's retriever."""
    return cast(LoadedModel, SimpleNamespace(retriever=retriever))


def run_all(run: StagedRun) -> tuple[list[str], Any]:
    stages = []
    while not run.done:
        stages.append(run.step())
    return stages, run.result()


def test_primary_batches_take_the_graph_stage_and_answer_as_eager(retriever: Retriever) -> None:
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, ITEMS + 1, size=n) for n in (3, 1, 7)]
    states = retriever.encode(histories)
    exclude = [np.asarray(h) for h in histories]
    eager_stages, want = run_all(
        GenerativeSearch().staged(as_model(retriever), states, 12, 3, exclude, fill=[12, 5, 12])
    )
    copied = copy.copy(retriever)  # the same retriever, with a runner of its own
    copied.graphs = GraphRunner(retriever, capture=False)
    graphed = as_model(copied)
    stages, got = run_all(GenerativeSearch().staged(graphed, states, 12, 3, exclude, fill=[12, 5, 12]))
    assert stages == ["graph"] and eager_stages[-1] == "rerank"
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_array_equal(got.dense_filled, want.dense_filled)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    # an allow-list, or a batch past the runner's max, runs the eager stages
    allow = [np.arange(1, 50), None, None]
    stages, _ = run_all(GenerativeSearch().staged(graphed, states, 12, 3, exclude, allow, fill=True))
    assert stages[-1] == "rerank"
    graphed.retriever.graphs = GraphRunner(retriever, max_batch=2, capture=False)
    stages, _ = run_all(GenerativeSearch().staged(graphed, states, 12, 3, exclude, fill=True))
    assert stages[-1] == "rerank"
    # a graph that cannot serve at replay time: the same stage answers eagerly
    runner = GraphRunner(retriever, capture=False)
    runner.search = lambda *a, **k: None  # type: ignore[method-assign]
    graphed.retriever.graphs = runner
    stages, got = run_all(GenerativeSearch().staged(graphed, states, 12, 3, exclude, fill=[12, 5, 12]))
    assert stages == ["graph"]
    np.testing.assert_array_equal(got.items, want.items)
