"""The rule that sets a bundle's path_weight on validation users (training/path_weight.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle.bundle import load_bundle
from models.search.retriever import Retriever
from tests.unit.models.conftest import NUM_ITEMS, build_tiny_model, export_tiny
from training.path_weight import MULTIPLES, choose_path_weight, tune_path_weight, validation_candidates
from training.splits import EvalSet


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(build_tiny_model(seed=2), tmp_path_factory.mktemp("bundles") / "pw", "pw")


def users(n: int = 60) -> EvalSet:
    rng = np.random.default_rng(5)
    histories = [rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(1, 6))) for _ in range(n)]
    return EvalSet([f"u{i}" for i in range(n)], histories, [np.zeros(0, np.int64)] * n)


def with_targets(evalset: EvalSet, retriever: Retriever, by: str) -> EvalSet:
    """``evalset`` whose target is each user's best candidate by inner product (``by="ip"``) or by
    the beam's path score, ties to the higher inner product (``by="path"``)."""
    targets = [np.zeros(0, np.int64)] * len(evalset)
    for rows, cands in validation_candidates(retriever, evalset, k=1):
        key = cands.ip if by == "ip" else cands.path * 1e3 + cands.ip
        best = key.masked_fill(~cands.valid, float("-inf")).argmax(dim=1)
        for j, row in enumerate(rows):
            targets[row] = np.array([int(cands.items[j, best[j]])])
    return EvalSet(evalset.user_ids, evalset.histories, targets)


def test_the_rule_keeps_the_inner_product_when_the_path_adds_nothing(bundle_dir: Path) -> None:
    retriever = Retriever(load_bundle(bundle_dir), "cpu", "onnx", intra_op_threads=1)
    choice = choose_path_weight(retriever, with_targets(users(), retriever, "ip"), k=1)
    assert set(choice.valid) == {f"{m:g}" for m in MULTIPLES}
    assert choice.valid["0"] == 1.0 and choice.multiple == 0.0 and choice.weight == 0.0  # ties: the smaller


def test_the_rule_weighs_the_path_when_validation_users_follow_it(bundle_dir: Path) -> None:
    retriever = Retriever(load_bundle(bundle_dir), "cpu", "onnx", intra_op_threads=1)
    choice = choose_path_weight(retriever, with_targets(users(), retriever, "path"), k=1)
    assert choice.multiple > 0 and choice.scale > 0
    assert choice.weight == pytest.approx(choice.multiple * choice.scale)
    assert choice.valid[f"{choice.multiple:g}"] == max(choice.valid.values()) > choice.valid["0"]


def test_tune_writes_the_weight_into_the_manifest_and_the_retriever_serves_it(
    bundle_dir: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "tuned"
    shutil.copytree(bundle_dir, copy)
    before = load_bundle(copy).manifest.fingerprint
    retriever = Retriever(load_bundle(copy), "cpu", "onnx", intra_op_threads=1)
    choice = tune_path_weight(copy, with_targets(users(), retriever, "path"), k=1)
    bundle = load_bundle(copy)
    assert bundle.manifest.fingerprint == before  # the manifest is not checksummed
    assert bundle.manifest.config["path_weight"] == pytest.approx(choice.weight) and choice.weight > 0
    assert bundle.manifest.config["path_weight_rule"]["valid"] == choice.valid
    served = Retriever(bundle, "cpu", "onnx", intra_op_threads=1)
    assert served.path_weight == pytest.approx(choice.weight)
    states = served.encode([np.array([1, 2])])
    found = served.beam(states, 4, None)
    got = served.rerank(found, states.query, 3, None)
    cands = served.candidates(found, states.query, None)
    want = torch.topk(cands.scores(choice.weight), 3, dim=1).values[0].numpy()
    np.testing.assert_allclose(got.scores[0], want, rtol=1e-5)


def test_no_validation_users_keep_the_plain_inner_product(bundle_dir: Path) -> None:
    retriever = Retriever(load_bundle(bundle_dir), "cpu", "onnx", intra_op_threads=1)
    choice = choose_path_weight(retriever, EvalSet([], [], []), k=5)
    assert choice.weight == 0.0 and choice.users == 0
