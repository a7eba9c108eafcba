"""The rerank's score (models.search.rerank): inner product plus path_weight x the leaf's beam score."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle.bundle import Bundle, load_bundle
from models.bundle.manifest import BundleError
from models.search.rerank import fill_offset, fused_scores
from models.search.retriever import Retriever

from .conftest import NUM_ITEMS

HISTORIES = [np.array([3, 17, 5]), np.array([9]), np.arange(1, 12), np.array([40, 2])]


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir: Path) -> Bundle:
    return load_bundle(tiny_bundle_dir)


def reference(
    bundle: Bundle, query: np.ndarray, leaves: np.ndarray, paths: np.ndarray, weight: float, exclude
):
    """Numpy, one row: (item, score) of every item of the beam's leaves not excluded, best first."""
    index = bundle.index
    scored = [
        (int(i), float(bundle.item_emb[int(i)] @ query) + weight * float(path))
        for leaf, path in zip(leaves, paths, strict=True)
        if leaf >= 0
        for i in index.items_of_leaf(int(leaf) - index.leaf_start)
        if int(i) not in exclude
    ]
    return sorted(scored, key=lambda t: -t[1])


@pytest.mark.parametrize("weight", [0.0, 0.5, 4.0])
def test_rerank_orders_the_leaf_items_by_inner_product_plus_weighted_path(
    bundle: Bundle, weight: float
) -> None:
    retriever = Retriever(bundle, "cpu", "onnx", intra_op_threads=1)
    retriever.path_weight = weight
    states = retriever.encode(HISTORIES)
    exclude = [np.asarray(h, np.int64) for h in HISTORIES]
    found = retriever.beam(states, 4, exclude)
    result = retriever.rerank(found, states.query, 6, exclude)
    changed = 0
    for row in range(len(HISTORIES)):
        want = reference(
            bundle,
            states.query[row].numpy(),
            found.leaves[row].numpy(),
            found.scores[row].numpy(),
            weight,
            set(HISTORIES[row].tolist()),
        )[:6]
        np.testing.assert_allclose(
            result.scores[row][: len(want)], [s for _, s in want], rtol=1e-5, atol=1e-5
        )
        assert set(result.items[row][: len(want)].tolist()) == {i for i, _ in want}
        plain = reference(
            bundle,
            states.query[row].numpy(),
            found.leaves[row].numpy(),
            found.scores[row].numpy(),
            0.0,
            set(HISTORIES[row].tolist()),
        )[:6]
        changed += [i for i, _ in want] != [i for i, _ in plain]
    if weight == 4.0:  # not vacuous: a large weight reorders what the inner product alone ranks
        assert changed > 0


def test_weight_zero_is_the_plain_inner_product_bit_for_bit() -> None:
    ip = torch.randn(3, 7)
    path = torch.randn(3, 7)
    path[0, 2] = float("-inf")
    assert fused_scores(ip, path, 0.0) is ip
    fused = fused_scores(ip, path, 0.5)
    assert fused[0, 2] == ip[0, 2]  # a padded leaf's -inf adds nothing
    torch.testing.assert_close(fused[1], ip[1] + 0.5 * path[1])


def test_fill_offset_is_the_weighted_lowest_finite_leaf_score() -> None:
    path = torch.tensor([[3.0, -1.0, float("-inf")], [float("-inf")] * 3, [0.5, 0.25, 2.0]])
    torch.testing.assert_close(fill_offset(path, 2.0), torch.tensor([-2.0, 0.0, 0.5]))
    torch.testing.assert_close(fill_offset(path, 0.0), torch.zeros(3))


def test_filled_items_score_as_if_in_the_lowest_leaf(bundle: Bundle) -> None:
    retriever = Retriever(bundle, "cpu", "onnx", intra_op_threads=1)
    retriever.path_weight = 0.8
    states = retriever.encode(HISTORIES[:1])
    found = retriever.beam(states, 1, None)  # one leaf: fewer items than k
    result = retriever.rerank(found, states.query, NUM_ITEMS // 2, None, fill=True)
    beam_items = set(bundle.index.items_of_leaf(int(found.leaves[0, 0]) - bundle.index.leaf_start).tolist())
    offset = 0.8 * float(found.scores[0, 0])
    query = states.query[0].numpy()
    filled = [i for i in result.items[0] if i > 0 and int(i) not in beam_items]
    assert result.dense_filled is not None
    assert len(filled) == int(result.dense_filled[0]) > 0
    for i, score in zip(result.items[0], result.scores[0], strict=True):
        if i in filled:
            assert score == pytest.approx(float(bundle.item_emb[i] @ query) + offset, rel=1e-5, abs=1e-5)
    assert np.all(np.diff(result.scores[0]) <= 0)  # one order: beam and fill merged by score


@pytest.mark.parametrize("bad", [-0.5, "0.5", True, 1e400])
def test_a_manifest_with_a_bad_path_weight_is_refused(
    tiny_bundle_dir: Path, tmp_path: Path, bad: object
) -> None:
    copy = tmp_path / "bad"
    shutil.copytree(tiny_bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["path_weight"] = bad
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"config\.path_weight"):
        load_bundle(copy)
