"""The static-shape retrieval that CUDA graphs capture (models.search.graphs), run eagerly on the CPU.

It must return what :meth:`Retriever.retrieve` does although it pads the batch to a bucket, the
histories to ``max_history`` and the exclusions to a power-of-two table, and lays the rerank
candidates out per leaf instead of packed (the tiny bundle has multi-item leaves, so that layout
is exercised). The capture itself needs a GPU: test_torch_bundle.py holds graphs to the eager path
on ``cuda``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle.bundle import Bundle, load_bundle
from models.catalogue.catalogue import Catalogue, Delta, NewItem
from models.search.centroid_term import CentroidTerm
from models.search.graph_runner import GraphRunner
from models.search.graphs import (
    EXCLUDE_PAD,
    bucket,
    pack_requests,
    static_retrieve,
    unpack_result,
)
from models.search.retrieval_types import RetrievalResult
from models.search.retriever import Retriever

from .conftest import DIM, MAX_HISTORY, NUM_ITEMS, build_tiny_model, export_tiny


def static(retriever: Retriever, histories: list[np.ndarray], k: int, beam: int, exclude: list | None):
    packed = pack_requests(histories, exclude, bucket(len(histories)), MAX_HISTORY, retriever.encoder_items)
    with torch.inference_mode():
        ints, scores = static_retrieve(retriever, torch.from_numpy(packed), MAX_HISTORY, k, beam)
    return unpack_result(ints.numpy(), scores.numpy(), len(histories), k)


def assert_static_matches_eager(
    retriever: Retriever, histories: list, k: int, beam: int, exclude: list | None
):
    want = retriever.retrieve(histories, k=k, beam_size=beam, exclude=exclude)
    got = static(retriever, histories, k, beam, exclude)
    for row_got, row_want, scores in zip(got.items, want.items, want.scores, strict=True):
        finite = scores[np.isfinite(scores)]
        if len(np.unique(finite)) == len(finite):  # no ties: the same order
            np.testing.assert_array_equal(row_got, row_want)
        else:  # exact ties (an empty history scores every item 0): the same set
            np.testing.assert_array_equal(np.sort(row_got), np.sort(row_want))
    np.testing.assert_array_equal(got.leaves, want.leaves)
    np.testing.assert_array_equal(got.num_candidates, want.num_candidates)
    np.testing.assert_array_equal(got.num_scored, want.num_scored)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5, rtol=1e-5)
    return got


@pytest.mark.parametrize("path_weight", [0.0, 0.7])
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_static_retrieve_matches_eager_retrieve(
    tiny_bundle_dir: Path, backend: str, path_weight: float
) -> None:
    retriever = Retriever(load_bundle(tiny_bundle_dir), "cpu", backend, intra_op_threads=1)
    retriever.path_weight = path_weight  # the rerank fuses the leaves' path scores (models.search.rerank)
    rng = np.random.default_rng(11)
    cases = (((1,), 8, 5, False), ((1, 4, MAX_HISTORY, 9, 2), 8, 5, True), ((3, 0, 3), 30, 2, True))
    for sizes, k, beam, excluding in cases:
        histories = [rng.integers(1, NUM_ITEMS + 1, size=n) for n in sizes]
        exclude = None
        if excluding:  # the history and the two best items of each row: exclusion cuts candidates
            best = retriever.retrieve(histories, k=2, beam_size=beam).items
            exclude = [np.concatenate([h, best[i]]) for i, h in enumerate(histories)]
        got = assert_static_matches_eager(retriever, histories, k, beam, exclude)
        if excluding:  # the case is not vacuous
            assert (got.num_candidates < got.num_scored).any()


def grown_versions(bundle: Bundle) -> list[Catalogue]:
    """Versions 1..3 of the tiny catalogue: a whole leaf removed (a dead node), items far from every
    other added (new leaves: decoder aliases), items removed from other leaves, an added one removed,
    a leaf left with one live item (excluding its removed items must not empty it)."""
    rng = np.random.default_rng(3)
    v0 = Catalogue.from_bundle(bundle)
    leaf0 = tuple(v0.item_ids[int(d)] for d in bundle.index.items_of_leaf(0))
    far = tuple(NewItem(f"far-{i}", 40.0 * rng.standard_normal(DIM).astype(np.float32)) for i in range(12))
    v1, _ = v0.apply(Delta(add=far, remove=leaf0))
    v2, _ = v1.apply(Delta(add=(NewItem("near-9", bundle.item_emb[9] * 2),), remove=("sku-010", "sku-011")))
    leaf1 = [v0.item_ids[int(d)] for d in bundle.index.items_of_leaf(1)]
    v3, _ = v2.apply(Delta(remove=("far-0", *leaf1[:-1])))  # leaf 1 keeps one live item
    assert (v3.live_count == 0).any()  # not vacuous: a dead node
    return [v1, v2, v3]


@pytest.fixture(scope="module")
def node_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with one token per node and room under its parents: added items get new
    leaves, which the decoder sees as aliases of existing nodes."""
    m = build_tiny_model(seed=1, token_scheme="node")
    return export_tiny(m, tmp_path_factory.mktemp("bundles") / "node", "node")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("which", ["tiny_bundle_dir", "node_bundle_dir"])
def test_static_retrieve_matches_eager_across_catalogue_versions(
    which: str, backend: str, request: pytest.FixtureRequest
) -> None:
    """Every catalogue version's static search (dead nodes, decoder aliases, removed items in the
    exclusions) returns what that version's eager retriever does: the graphs a version captures
    serve it exactly as eager retrieval would."""
    bundle = load_bundle(request.getfixturevalue(which))
    base = Retriever(bundle, "cpu", backend, intra_op_threads=1)
    rng = np.random.default_rng(12)
    for cat in grown_versions(bundle):
        served = base.with_catalogue(cat)
        assert served.dead_nodes is not None
        assert (served.node_alias is not None) == (which == "node_bundle_dir")  # aliases exercised
        removed = np.flatnonzero(~cat.live[1:]) + 1
        for sizes, k, beam in (
            ((1, 4, MAX_HISTORY), 8, 6),
            ((3, 2), 20, 12),
            ((5,), 5, cat.index.num_leaves),
        ):
            histories = [rng.integers(1, NUM_ITEMS + 1, size=n) for n in sizes]
            best = served.retrieve(histories, k=3, beam_size=beam).items
            exclude = [np.concatenate([h, best[i], removed]) for i, h in enumerate(histories)]
            got = assert_static_matches_eager(served, histories, k, beam, exclude)
            assert not np.isin(got.items, removed).any()
            assert_static_matches_eager(served, histories, k, beam, None)


def test_pack_requests_pads_rows_histories_and_exclusions() -> None:
    packed = pack_requests([np.array([3, 4]), np.array([5])], [np.array([9, 2, 9]), np.array([])], 4, 3, 10)
    assert packed.shape == (4, 3 + 2)
    np.testing.assert_array_equal(packed[:, :3], [[0, 3, 4], [0, 0, 5], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(packed[0, 3:], [2, 9])  # sorted, deduplicated
    assert (packed[1:, 3:] == EXCLUDE_PAD).all()
    assert [bucket(n) for n in (0, 1, 2, 3, 5, 64, 65)] == [1, 1, 2, 4, 8, 64, 128]
    with pytest.raises(ValueError, match=r"outside 0\.\.10"):
        pack_requests([np.array([11])], None, 1, 3, 10)
    with pytest.raises(ValueError, match="exclude has 1 rows"):
        pack_requests([np.array([1]), np.array([2])], [np.array([1])], 2, 3, 10)


def test_graphs_are_refused_off_cuda_and_ignored_by_the_cpu_retriever(tiny_bundle_dir: Path) -> None:
    retriever = Retriever(load_bundle(tiny_bundle_dir), "cpu", "torch", cuda_graphs=True)
    assert retriever.graphs is None  # the option only takes effect with torch on cuda
    with pytest.raises(ValueError, match="torch backend on a cuda device"):
        GraphRunner(retriever)


def assert_same_result(got: RetrievalResult, want: RetrievalResult) -> None:
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got.leaves, want.leaves)
    np.testing.assert_array_equal(got.num_candidates, want.num_candidates)
    np.testing.assert_array_equal(got.num_scored, want.num_scored)
    np.testing.assert_array_equal(got.dense_filled, want.dense_filled)


@pytest.mark.parametrize(
    ("backend", "path_weight", "centroids"),
    [("torch", 0.0, False), ("onnx", 0.0, False), ("torch", 0.7, False), ("torch", 0.7, True)],
)
def test_runner_from_encoder_states_matches_eager_search_with_the_fill(
    node_bundle_dir: Path, backend: str, path_weight: float, centroids: bool
) -> None:
    """The service's graphed path (GraphRunner.search: states padded to static shapes, the static
    search, the dense fill after it) returns what the eager Retriever.search does, on version 0 and
    on a grown catalogue version (new leaves seen as aliases: their centroid is the alias's), with
    and without the path score in the rerank (the fill's offset included) and the centroid term in
    the beam; run eagerly (capture=False), as the CPU allows."""
    bundle = load_bundle(node_bundle_dir)
    base = Retriever(bundle, "cpu", backend, intra_op_threads=1)
    base.path_weight = path_weight
    if centroids:
        weights = [0.8] * bundle.index.levels
        base.centroid_term = CentroidTerm.of(bundle.index, bundle.item_emb, weights, torch.device("cpu"))
    rng = np.random.default_rng(21)
    filled_rows = 0
    for served in (base, base.with_catalogue(grown_versions(bundle)[-1])):
        runner = GraphRunner(served, capture=False)
        for sizes, k, beam in (((1, 4, MAX_HISTORY), 8, 2), ((3, 2, 5, 1, 6), 12, 1), ((2,), 5, 8)):
            histories = [rng.integers(1, NUM_ITEMS + 1, size=n) for n in sizes]
            states = served.encode(histories)  # T = the longest history here, not max_history
            exclude = [np.concatenate([h, rng.integers(1, NUM_ITEMS + 1, size=3)]) for h in histories]
            targets = [k - i % 3 for i in range(len(histories))]
            for fill in (False, True, targets):
                got = runner.search(states, k, beam, exclude, fill)
                assert got is not None
                want = served.search(states, k, beam, exclude, fill=fill)
                assert_same_result(got, want)
                filled_rows += int(np.count_nonzero(np.asarray(want.dense_filled)))
            plain = runner.retrieve(histories, k, beam, exclude)
            assert plain is not None
            np.testing.assert_array_equal(plain.items, served.retrieve(histories, k, beam, exclude).items)
    assert filled_rows > 0  # the fill after the static search was exercised


def test_runner_declines_what_static_shapes_cannot_hold(tiny_bundle_dir: Path) -> None:
    retriever = Retriever(load_bundle(tiny_bundle_dir), "cpu", "torch", intra_op_threads=1)
    runner = GraphRunner(retriever, max_batch=2, capture=False)
    states = retriever.encode([np.array([1, 2]), np.array([3]), np.array([4])])
    assert not runner.serves(3, 4) and runner.search(states, 5, 4, None) is None  # batch over max_batch
    wide = [np.arange(1, 700)]  # an exclusion table past MAX_STATIC_EXCLUDE
    assert runner.search(retriever.encode([np.array([1])]), 5, 4, wide) is None
    assert runner.search(retriever.encode([np.array([1])]), 5, 4, [np.arange(1, 30)]) is not None
