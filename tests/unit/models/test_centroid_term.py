"""The beam's centroid term (models.search.centroid_term): the node centroids, the fused step, the
manifest's check of the weights, and what a retriever holds with and without them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle.bundle import load_bundle
from models.bundle.manifest import CENTROID_WEIGHTS, MANIFEST, BundleError
from models.search.centroid_term import CentroidTerm, node_centroids
from models.search.retriever import Retriever

from .conftest import NUM_ITEMS


def test_node_centroids_are_the_mean_item_vector_below_each_node(tiny_bundle_dir: Path) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    index, emb = bundle.index, bundle.item_emb
    got = node_centroids(index, emb)  # [num_nodes, Dr]
    assert got.shape == (index.num_nodes, emb.shape[1]) and got.dtype == np.float32
    for node in range(1, index.num_nodes):
        below = [d for d in range(1, NUM_ITEMS + 1) if node in index.item_path[d]]
        want = emb[below].mean(axis=0) if below else np.zeros(emb.shape[1])
        np.testing.assert_allclose(got[node], want, rtol=1e-5, atol=1e-6)


def test_the_fused_step_adds_the_level_weight_times_the_centroid_score() -> None:
    centroids = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])  # [4 nodes, 2]
    term = CentroidTerm(centroids, torch.tensor([0.0, 0.5, 2.0]))  # levels 1 and 2
    query = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # [B=2, 2]
    beam_query = torch.tensor([0, 1])
    candidates = torch.tensor([[1, 2, -1], [3, 1, 2]])  # [Bb=2, C=3], -1 pads
    scores = torch.tensor([[0.1, 0.2, float("-inf")], [0.3, 0.4, 0.5]])
    near = torch.tensor([[1.0, 2.0, 0.0], [6.0, 2.0, 0.0]])  # q . c, 0 at the pad
    torch.testing.assert_close(term.near(query, beam_query, candidates), near)
    at_level_2 = term.fused(scores, query, beam_query, torch.zeros(2, 2, dtype=torch.int64), candidates)
    torch.testing.assert_close(at_level_2, scores + 2.0 * near)  # prefix of 2 tokens: level 2
    at_level_1 = term.fused(scores, query, beam_query, torch.zeros(2, 1, dtype=torch.int64), candidates)
    torch.testing.assert_close(at_level_1, scores + 0.5 * near)


def write_weights(src: Path, dst: Path, weights: object) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["config"][CENTROID_WEIGHTS] = weights
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "must be a list of 2 numbers (one per level), got [1.0]"),
        ([1.0, -0.5], "must hold finite numbers >= 0"),
        ([True, 1.0], "must hold finite numbers >= 0"),
        ("1.0", "must be a list of 2 numbers"),
    ],
)
def test_the_manifest_refuses_weights_it_cannot_serve(
    tiny_bundle_dir: Path, tmp_path: Path, weights: object, message: str
) -> None:
    bad = write_weights(tiny_bundle_dir, tmp_path / "bad", weights)
    with pytest.raises(BundleError, match=re.escape(f"config.{CENTROID_WEIGHTS} {message}")):
        load_bundle(bad)


def test_a_retriever_holds_centroids_only_for_nonzero_weights(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    plain = Retriever(load_bundle(tiny_bundle_dir), "cpu", "onnx", intra_op_threads=1)
    zeros = Retriever(
        load_bundle(write_weights(tiny_bundle_dir, tmp_path / "zeros", [0.0, 0.0])), "cpu", "onnx"
    )
    assert plain.centroid_term is None and zeros.centroid_term is None
    fused = Retriever(
        load_bundle(write_weights(tiny_bundle_dir, tmp_path / "big", [0.0, 1e4])), "cpu", "onnx"
    )
    assert fused.centroid_term is not None
    histories = [np.array([1, 2, 3]), np.array([7])]
    states = fused.encode(histories)
    found = fused.beam(states, 2, None)
    # at level 2 the term dominates: each beam's best leaf is the child with the best centroid score
    leaves = fused.trie.children(found.paths[:, 0, 0])  # [B, C] the first beam's parent's children
    near = torch.einsum("bd,bcd->bc", states.query, fused.centroid_term.centroids[leaves.clamp(min=0)])
    best = leaves.gather(1, near.masked_fill(leaves < 0, float("-inf")).argmax(1, keepdim=True))[:, 0]
    torch.testing.assert_close(found.leaves[:, 0], best)
    assert not torch.equal(plain.beam(plain.encode(histories), 2, None).leaves, found.leaves)
