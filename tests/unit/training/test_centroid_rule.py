"""The rule that sets a bundle's leaf_centroid_weights on validation users (training/centroid_rule.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle.bundle import load_bundle
from models.bundle.manifest import CENTROID_WEIGHTS
from models.search.centroid_term import CentroidTerm, node_centroids
from models.search.retriever import Retriever
from tests.unit.models.conftest import NUM_ITEMS, build_tiny_model, export_tiny
from training.centroid_rule import MULTIPLES, choose_centroid_weights, tune_centroid_weights
from training.export.writer import record_config
from training.fusion_rules import tune_fusions
from training.path_weight import validation_candidates
from training.splits import EvalSet


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle served with a beam of one leaf (its default beam reaches every item: no
    choice of leaves would matter)."""
    out = export_tiny(build_tiny_model(seed=2), tmp_path_factory.mktemp("bundles") / "cr", "cr")
    record_config(out, {"beam_size": 1})
    return out


def users(n: int = 200) -> EvalSet:
    rng = np.random.default_rng(7)
    histories = [rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(1, 6))) for _ in range(n)]
    return EvalSet([f"u{i}" for i in range(n)], histories, [np.zeros(0, np.int64)] * n)


def targets_through(retriever: Retriever, evalset: EvalSet, weight: float) -> EvalSet:
    """``evalset`` whose target is each user's best item (by inner product) in the leaves the beam
    reaches with the centroid term at ``weight`` per level (0: the decoder alone)."""
    if weight:
        b = retriever.bundle
        retriever.centroid_term = CentroidTerm.of(
            b.index, b.item_emb, [weight] * b.index.levels, retriever.device
        )
    targets = [np.zeros(0, np.int64)] * len(evalset)
    for rows, cands in validation_candidates(retriever, evalset, k=1):
        best = cands.ip.masked_fill(~cands.valid, float("-inf")).argmax(dim=1)
        for j, row in enumerate(rows):
            targets[row] = np.array([int(cands.items[j, best[j]])])
    retriever.centroid_term = None
    return EvalSet(evalset.user_ids, evalset.histories, targets)


def test_the_rule_keeps_the_decoder_alone_when_the_centroids_add_nothing(bundle_dir: Path) -> None:
    retriever = Retriever(load_bundle(bundle_dir), "cpu", "onnx", intra_op_threads=1)
    choice = choose_centroid_weights(retriever, targets_through(retriever, users(), 0.0), k=1)
    assert set(choice.valid) == {f"{m:g}" for m in MULTIPLES} and all(s > 0 for s in choice.scales)
    assert choice.valid["0"] == 1.0 and choice.multiple == 0.0 and choice.weights == [0.0, 0.0]
    assert retriever.centroid_term is None  # a replica of this bundle holds no centroids


def test_the_rule_weighs_the_centroids_when_validation_users_follow_them(bundle_dir: Path) -> None:
    retriever = Retriever(load_bundle(bundle_dir), "cpu", "onnx", intra_op_threads=1)
    choice = choose_centroid_weights(retriever, targets_through(retriever, users(), 1e4), k=1)
    assert choice.multiple > 0 and choice.z[f"{choice.multiple:g}"] >= 2.0
    assert choice.weights == pytest.approx([choice.multiple * s for s in choice.scales])
    assert choice.valid[f"{choice.multiple:g}"] == max(choice.valid.values()) > choice.valid["0"]
    assert retriever.centroid_term is not None  # left serving the choice


def test_tune_writes_the_weights_into_the_manifest_and_the_retriever_serves_them(
    bundle_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "tuned"
    shutil.copytree(bundle_dir, copy)
    before = load_bundle(copy).manifest.fingerprint
    probe = Retriever(load_bundle(copy), "cpu", "onnx", intra_op_threads=1)
    choice = tune_centroid_weights(copy, targets_through(probe, users(), 1e4), k=1)
    bundle = load_bundle(copy)
    assert bundle.manifest.fingerprint == before  # the manifest is not checksummed
    assert bundle.manifest.config[CENTROID_WEIGHTS] == pytest.approx(choice.weights)
    assert bundle.manifest.config["leaf_centroid_rule"]["valid"] == choice.valid
    served = Retriever(bundle, "cpu", "onnx", intra_op_threads=1)
    assert served.centroid_term is not None
    want = torch.tensor([0.0, *choice.weights])
    torch.testing.assert_close(served.centroid_term.weights, want)
    torch.testing.assert_close(
        served.centroid_term.centroids, torch.from_numpy(node_centroids(bundle.index, bundle.item_emb))
    )


def test_no_validation_users_keep_the_decoder_alone(bundle_dir: Path) -> None:
    retriever = Retriever(load_bundle(bundle_dir), "cpu", "onnx", intra_op_threads=1)
    choice = choose_centroid_weights(retriever, EvalSet([], [], []), k=1)
    assert choice.weights == [0.0, 0.0] and choice.users == 0


def test_fusions_run_the_rules_that_are_on_and_record_both(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "fused"
    shutil.copytree(bundle_dir, copy)
    probe = Retriever(load_bundle(copy), "cpu", "onnx", intra_op_threads=1)
    evalset = targets_through(probe, users(), 1e4)
    off = tune_fusions(copy, evalset, path_score=False, leaf_centroids=False)
    assert off == {"path_weight": 0.0, "leaf_centroid_multiple": 0.0}
    assert not {"path_weight_rule", "leaf_centroid_rule"} & set(load_bundle(copy).manifest.config)
    on = tune_fusions(copy, evalset, path_score=True, leaf_centroids=True)
    config = load_bundle(copy).manifest.config
    assert on["path_weight"] == config["path_weight"]
    assert on["leaf_centroid_multiple"] == config["leaf_centroid_rule"]["multiple"] > 0
    assert {"path_weight_rule", "leaf_centroid_rule"} <= set(config)
