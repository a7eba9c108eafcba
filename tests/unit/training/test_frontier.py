"""The frontier pieces on synthetic bundles: a request for k items gets k items (the beam widens to
what k needs given the leaf sizes), candidates counted are the items actually scored, the decoder-alone
ranking, and the bundle's default beam from the catalogue rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.synthetic_bundle import make_synthetic_bundle
from models.bundle.bundle import load_bundle
from models.search.beam_policy import default_beam
from models.search.retriever import Retriever
from training.bundle_recommender import BundleRecommender
from training.frontier import K, decoder_rank, sweep_bundle
from training.splits import EvalSet

ITEMS = 1000


@pytest.fixture(scope="module")
def leaf_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One item per leaf (as SEATER and TDR): 1000 leaves under 10 x 10 x 10."""
    out = tmp_path_factory.mktemp("frontier") / "leaves"
    return make_synthetic_bundle(out, ITEMS, 10, 3, dim=16, seed=0, num_layers=1, backends=("onnx",))


@pytest.fixture(scope="module")
def bucket_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Buckets of 10 items per leaf (as URI): 100 leaves under 10 x 10."""
    out = tmp_path_factory.mktemp("frontier") / "buckets"
    return make_synthetic_bundle(out, ITEMS, 10, 2, dim=16, seed=1, num_layers=1, backends=("onnx",))


def histories(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.choice(np.arange(1, ITEMS + 1), size=int(rng.integers(1, 40)), replace=False) for _ in range(n)
    ]


def test_the_manifest_carries_the_rule_default_beam(leaf_bundle: Path, bucket_bundle: Path) -> None:
    for path, leaf_size in ((leaf_bundle, 1), (bucket_bundle, 10)):
        bundle = load_bundle(path)
        sizes = np.diff(bundle.index.leaf_offsets)
        assert (sizes == leaf_size).all()
        assert bundle.manifest.config["beam_size"] == default_beam(ITEMS, sizes)
        assert Retriever(bundle).default_beam_size == bundle.manifest.config["beam_size"]
    assert load_bundle(leaf_bundle).manifest.config["beam_size"] == 100  # 1000 items: the 100 floor
    assert load_bundle(bucket_bundle).manifest.config["beam_size"] == 10  # 100 candidates / 10 per leaf


@pytest.mark.parametrize("k", [50, 200])
def test_a_request_for_k_items_gets_k_items(leaf_bundle: Path, bucket_bundle: Path, k: int) -> None:
    for path in (leaf_bundle, bucket_bundle):
        retriever = Retriever(load_bundle(path))
        rows = histories(12, seed=k)
        for history in rows:
            beam = retriever.beam_for(k, None, len(np.unique(history)))
            result = retriever.retrieve([history], k=k, beam_size=beam, exclude_history=True)
            items = result.items[0][result.items[0] > 0]
            assert len(items) == k and len(np.unique(items)) == k
            assert not np.isin(items, history).any()
        # where the beam was widened, the default beam alone would have answered fewer than k
        default = retriever.default_beam_size
        widened = [retriever.beam_for(k, None, len(np.unique(h))) > default for h in rows]
        assert any(widened) or k == 50  # k=200 is beyond every default here: the widening is exercised
        narrow = retriever.retrieve(rows, k=k, beam_size=default, exclude_history=True)
        found = (narrow.items > 0).sum(axis=1)
        assert (found[widened] < k).all()


def test_candidates_counted_are_the_items_scored(bucket_bundle: Path) -> None:
    bundle = load_bundle(bucket_bundle)
    retriever = Retriever(bundle)
    rows = histories(20, seed=3)
    result = retriever.retrieve(rows, k=K, beam_size=7, exclude_history=True)
    sizes = np.diff(bundle.index.leaf_offsets)
    for row, leaves in enumerate(result.leaves):
        leaves = leaves[leaves >= 0] - bundle.index.leaf_start
        in_leaves = np.concatenate([bundle.index.items_of_leaf(int(leaf)) for leaf in leaves])
        assert result.num_scored[row] == sizes[leaves].sum() == len(in_leaves)  # before exclusion
        assert result.num_candidates[row] == len(np.setdiff1d(in_leaves, rows[row]))  # after it
    recommender = BundleRecommender(bucket_bundle, beam_size=7)
    recommender.recommend(rows, K, rows)
    expected = np.mean([7 * 10 if retriever.beam_for(K, 7, len(np.unique(h))) == 7 else 0 for h in rows])
    widened = [retriever.beam_for(K, 7, len(np.unique(h))) * 10 for h in rows]
    assert recommender.mean_candidates == pytest.approx(np.mean(widened))
    assert recommender.mean_candidates >= expected


def test_decoder_alone_ranks_by_leaf_then_popularity(bucket_bundle: Path) -> None:
    bundle = load_bundle(bucket_bundle)
    retriever = Retriever(bundle)
    rows = histories(5, seed=4)
    states = retriever.encode(rows)
    beam = retriever.beam(states, 4)
    ranked = decoder_rank(retriever, beam.leaves.cpu().numpy(), rows, 25)
    for row, history in enumerate(rows):
        expected = []
        for leaf in beam.leaves[row].tolist():  # best path score first
            items = bundle.index.items_of_leaf(leaf - bundle.index.leaf_start)
            items = items[~np.isin(items, history)]
            expected += sorted(items.tolist(), key=lambda i: -bundle.popularity[i])
        assert ranked[row][ranked[row] > 0].tolist() == expected[:25]


def test_sweep_points_count_candidates_per_beam(leaf_bundle: Path) -> None:
    retriever = Retriever(load_bundle(leaf_bundle))
    rows = histories(30, seed=5)
    evalset = EvalSet([str(u) for u in range(30)], rows, [np.array([h[0] % ITEMS + 1]) for h in rows])
    points = sweep_bundle("synthetic", retriever, evalset, [4, 32])
    assert [p.method for p in points] == ["synthetic", "synthetic/decoder"] * 2
    assert [p.candidates for p in points] == [4.0, 4.0, 32.0, 32.0]  # one item per leaf, before exclusion
    assert all(0.0 <= p.recall <= 1.0 and p.cpu_ms > 0 for p in points)
