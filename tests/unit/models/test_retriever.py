"""Retriever: ONNX and torch backends agree; candidates, exclusion, padding and rerank are exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle.backend import TorchBackend
from models.bundle.bundle import Bundle, load_bundle
from models.index import TreeIndex
from models.nets.decoder import DecoderConfig, TokenDecoder
from models.nets.encoder import EncoderConfig, QueryEncoder
from models.search.retriever import EncoderStates, Retriever

from .conftest import DIM, MAX_HISTORY, NUM_ITEMS, TinyModel

HISTORIES = [
    np.array([3, 17, 5], np.int64),
    np.array([], np.int64),  # cold start
    np.arange(1, 25, dtype=np.int64),  # longer than max_history
    np.array([40], np.int64),
]


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir: Path) -> Bundle:
    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def onnx_retriever(bundle: Bundle) -> Retriever:
    return Retriever(bundle, device="cpu", backend="onnx", intra_op_threads=1)


@pytest.fixture(scope="module")
def torch_retriever(bundle: Bundle, tiny_model: TinyModel) -> Retriever:
    return Retriever(bundle, backend=TorchBackend(tiny_model.encoder, tiny_model.decoder))


def reference_topk(
    bundle: Bundle, query: np.ndarray, leaves: np.ndarray, k: int, exclude: set[int]
) -> np.ndarray:
    """Brute force over the items of ``leaves`` (numpy, one row): the top-``k`` scores, descending."""
    index = bundle.index
    items = [
        int(i)
        for leaf in leaves
        if leaf >= 0
        for i in index.items_of_leaf(int(leaf) - index.leaf_start)
        if int(i) not in exclude
    ]
    return np.sort(bundle.item_emb[items] @ query)[::-1][:k]


def assert_top_k(bundle: Bundle, query: np.ndarray, items: np.ndarray, expected_scores: np.ndarray) -> None:
    """``items`` (0 = pad) score exactly the expected top-k scores (ties may come in any order)."""
    got = items[items > 0]
    assert len(set(got.tolist())) == len(got)
    np.testing.assert_allclose(bundle.item_emb[got] @ query, expected_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3, 20])
def test_onnx_and_torch_backends_return_the_same_items(
    onnx_retriever: Retriever, torch_retriever: Retriever, beam_size: int
) -> None:
    a = onnx_retriever.retrieve(HISTORIES, k=10, beam_size=beam_size)
    b = torch_retriever.retrieve(HISTORIES, k=10, beam_size=beam_size)
    np.testing.assert_array_equal(a.leaves, b.leaves)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4, rtol=1e-4)


def test_rerank_is_the_exact_top_k_of_the_beam_leaves(onnx_retriever: Retriever, bundle: Bundle) -> None:
    states = onnx_retriever.encode(HISTORIES)
    result = onnx_retriever.search(states, k=8, beam_size=3, exclude=None)
    query = states.query.numpy()
    for row in range(len(HISTORIES)):
        expected = reference_topk(bundle, query[row], result.leaves[row], 8, set())
        assert_top_k(bundle, query[row], result.items[row], expected)
        assert result.num_candidates[row] == sum(
            len(bundle.index.items_of_leaf(int(leaf) - bundle.index.leaf_start))
            for leaf in result.leaves[row]
            if leaf >= 0
        )


def test_full_beam_equals_brute_force_over_the_catalogue(onnx_retriever: Retriever, bundle: Bundle) -> None:
    states = onnx_retriever.encode(HISTORIES)
    result = onnx_retriever.search(states, k=NUM_ITEMS, beam_size=bundle.index.num_leaves, exclude=None)
    query = states.query.numpy()
    assert (result.num_candidates == NUM_ITEMS).all()
    for row in range(len(HISTORIES)):
        expected = np.sort(bundle.item_emb[1:] @ query[row])[::-1]  # every item of the catalogue
        assert_top_k(bundle, query[row], result.items[row], expected)


def test_exclusion_removes_items_and_history(onnx_retriever: Retriever, bundle: Bundle) -> None:
    first = onnx_retriever.retrieve(HISTORIES, k=5, beam_size=4)
    banned = [first.items[i, :2] for i in range(len(HISTORIES))]
    second = onnx_retriever.retrieve(HISTORIES, k=5, beam_size=4, exclude=banned, exclude_history=True)
    index = bundle.index
    for row, history in enumerate(HISTORIES):
        returned = set(second.items[row].tolist()) - {0}
        excluded = set(banned[row].tolist()) | set(history.tolist())
        assert not returned & excluded
        for leaf in second.leaves[row][second.leaves[row] >= 0]:  # the beam skips fully excluded leaves
            assert set(index.items_of_leaf(int(leaf) - index.leaf_start).tolist()) - excluded


def test_fewer_candidates_than_k_are_padded(onnx_retriever: Retriever) -> None:
    result = onnx_retriever.retrieve(HISTORIES, k=NUM_ITEMS, beam_size=1)
    for row in range(len(HISTORIES)):
        n = int(result.num_candidates[row])
        assert 0 < n < NUM_ITEMS
        assert (result.items[row, :n] > 0).all() and (result.items[row, n:] == 0).all()
        assert np.isfinite(result.scores[row, :n]).all() and np.isneginf(result.scores[row, n:]).all()
        assert len(set(result.items[row, :n].tolist())) == n  # no duplicates


def test_states_survive_a_row_split_and_restack(onnx_retriever: Retriever) -> None:
    states = onnx_retriever.encode(HISTORIES)
    rows = [states.row(i) for i in range(states.batch_size)]
    assert rows[0][0].shape == (3, DIM) and rows[2][0].shape == (MAX_HISTORY, DIM)
    restacked = EncoderStates.stack(rows[::-1])
    a = onnx_retriever.search(states, k=6, beam_size=3, exclude=None)
    b = onnx_retriever.search(restacked, k=6, beam_size=3, exclude=None)
    np.testing.assert_array_equal(a.items[::-1], b.items)


def test_bad_inputs_are_rejected(onnx_retriever: Retriever, bundle: Bundle) -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.40"):
        onnx_retriever.encode([np.array([NUM_ITEMS + 1])])
    with pytest.raises(ValueError, match="k and beam_size"):
        onnx_retriever.retrieve(HISTORIES, k=0, beam_size=2)
    with pytest.raises(ValueError, match=r"choose one of \('onnx', 'torch'\)"):
        Retriever(bundle, backend="tensorrt")  # "torch" is a bundle backend now: test_torch_bundle.py


def test_single_item_leaves_use_the_plain_gather(bundle: Bundle) -> None:
    """SEATER/TDR-shaped index (one item per leaf, node tokens): torch backend, in-memory bundle."""
    torch.manual_seed(1)
    n = 12
    codes = np.zeros((n + 1, 2), np.int64)
    codes[1:, 0], codes[1:, 1] = np.arange(n) // 4, np.arange(n) % 4
    index = TreeIndex.from_codes(codes, 4, "node")
    encoder = QueryEncoder(EncoderConfig(num_items=n, dim=DIM, num_heads=2, max_len=4, dropout=0.0))
    decoder = TokenDecoder(
        DecoderConfig(dim=DIM, num_heads=2, dropout=0.0, token_scheme="node"),
        index.node_token,
        index.level_offsets,
    )
    item_emb = np.random.default_rng(1).standard_normal((n + 1, DIM)).astype(np.float32)
    manifest = dataclasses.replace(bundle.manifest, num_items=n, token_scheme="node", max_history=4)
    small = dataclasses.replace(bundle, manifest=manifest, index=index, item_emb=item_emb)
    retriever = Retriever(small, backend=TorchBackend(encoder, decoder))
    assert retriever.max_leaf_size == 1
    histories = [np.array([1, 5]), np.array([7])]
    result = retriever.retrieve(histories, k=5, beam_size=3, exclude_history=True)
    query = retriever.encode(histories).query.numpy()
    for row in range(2):
        expected = reference_topk(small, query[row], result.leaves[row], 5, set(histories[row].tolist()))
        assert_top_k(small, query[row], result.items[row], expected)
    assert result.num_candidates.tolist() == [
        3
        - len(
            set(histories[r].tolist())
            & set(
                int(small.index.items_of_leaf(int(leaf) - index.leaf_start)[0]) for leaf in result.leaves[r]
            )
        )
        for r in range(2)
    ]


def test_offline_evaluation_runs_the_serving_path(onnx_retriever: Retriever, bundle: Bundle) -> None:
    """`genret eval`'s core: with the beam over every leaf, coverage is 1 and candidates are all items."""
    from training.bundle_evaluation import beam_coverage, evaluate_retriever
    from training.splits import EvalSet

    histories = [np.array([3, 17]), np.array([8]), np.array([1, 2, 4])]
    targets = [np.array([5, 9]), np.array([40]), np.array([6])]
    evalset = EvalSet(user_ids=["a", "b", "c"], histories=histories, targets=targets)
    full = evaluate_retriever(onnx_retriever, evalset, beam_size=bundle.index.num_leaves, batch_size=2)
    assert full.users == 3 and full.metrics["beam_coverage"] == 1.0
    assert full.metrics["recall@50"] == 1.0  # 40 items, history excluded: every target is in the top 50
    index = bundle.index
    cut = [  # items of the leaves a history excludes whole: the beam never takes those leaves
        sum(
            len(items)
            for j in range(index.num_leaves)
            if set((items := index.items_of_leaf(j)).tolist()) <= set(h.tolist())
        )
        for h in histories
    ]
    assert full.metrics["mean_candidates"] == NUM_ITEMS - np.mean(cut)  # counted before exclusion
    assert full.metrics["mean_after_exclusion"] == NUM_ITEMS - np.mean([len(h) for h in histories])
    narrow = evaluate_retriever(onnx_retriever, evalset, beam_size=1, widen=False)  # one leaf, as given
    assert narrow.metrics["recall@50"] <= narrow.metrics["beam_coverage"] < 1.0
    leaves = np.full((1, 2), -1)
    leaves[0, 0] = bundle.index.item_path[5, -1]
    same_leaf = bundle.index.item_path[9, -1] == bundle.index.item_path[5, -1]
    assert beam_coverage(bundle, leaves, [np.array([5, 9])])[0] == (1.0 if same_leaf else 0.5)


@pytest.mark.parametrize("beam_size", [1, 3, 20])
def test_staged_search_equals_one_shot(onnx_retriever: Retriever, beam_size: int) -> None:
    """Stage by stage (each level, then the rerank), interleaved with another search, the result is
    exactly :meth:`Retriever.search`'s (the shadow lane serves through the staged path)."""
    states = onnx_retriever.encode(HISTORIES)
    exclude = [np.array([17, 3], np.int64), np.zeros(0, np.int64), np.array([1, 2, 3]), np.array([40])]
    expected = onnx_retriever.search(states, k=7, beam_size=beam_size, exclude=exclude)
    other_states = onnx_retriever.encode(HISTORIES[:2])
    other_expected = onnx_retriever.search(other_states, k=3, beam_size=2)

    staged = onnx_retriever.staged_search(states, k=7, beam_size=beam_size, exclude=exclude)
    other = onnx_retriever.staged_search(other_states, k=3, beam_size=2)
    names = []
    while not staged.done:
        names.append(staged.step())
        if not other.done:
            other.step()
    assert names == [f"level{i + 1}" for i in range(onnx_retriever.trie.levels)] + ["rerank"]
    assert len(names) == staged.num_stages
    for got, want in ((staged.result(), expected), (other.run(), other_expected)):
        np.testing.assert_array_equal(got.leaves, want.leaves)
        np.testing.assert_array_equal(got.items, want.items)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.num_candidates, want.num_candidates)
    with pytest.raises(RuntimeError, match="already done"):
        staged.step()
    with pytest.raises(RuntimeError, match="not done"):
        onnx_retriever.staged_search(states, k=7, beam_size=beam_size).result()
