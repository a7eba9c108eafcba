"""TreeIndex: construction from codes, invariants, save/load round trip, stats."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.index import IndexValidationError, TreeIndex

CODES = np.array([[-1, -1], [0, 0], [0, 1], [1, 0], [0, 1], [2, 3]])  # items 2 and 4 share a leaf


def test_from_codes_layout() -> None:
    index = TreeIndex.from_codes(CODES, 4, "level")
    index.validate()
    assert index.levels == 2 and index.num_items == 5
    assert index.level_offsets.tolist() == [0, 1, 4, 8]  # root, 3 level-1 nodes, 4 leaves
    assert index.children(0).tolist() == [1, 2, 3]
    assert index.children(1).tolist() == [4, 5]
    assert index.node_token.tolist() == [0, 0, 1, 2, 0, 1, 0, 3]  # level-local codes
    assert index.num_tokens == 4 and index.max_branching == 4
    assert index.item_path.tolist() == [[-1, -1], [1, 4], [1, 5], [2, 6], [1, 5], [3, 7]]
    assert sorted(index.items_of_leaf(1).tolist()) == [2, 4]
    assert index.leaf_of_item().tolist() == [-1, 0, 1, 2, 1, 3]
    node = TreeIndex.from_codes(CODES, [3, 4], "node")
    assert node.node_token.tolist() == list(range(8)) and node.num_tokens == 8


@settings(max_examples=50, deadline=None)
@given(
    levels=st.integers(1, 4),
    k=st.integers(1, 5),
    n=st.integers(1, 60),
    seed=st.integers(0, 1000),
    scheme=st.sampled_from(["level", "node"]),
)
def test_random_codes_give_valid_index(levels: int, k: int, n: int, seed: int, scheme: str) -> None:
    codes = np.random.default_rng(seed).integers(0, k, (n + 1, levels))
    index = TreeIndex.from_codes(codes, k, scheme)
    index.validate()
    # items with the same code share a leaf, different codes never do
    leaf = index.leaf_of_item()[1:]
    _, code_group = np.unique(codes[1:], axis=0, return_inverse=True)
    assert len(np.unique(leaf)) == len(np.unique(code_group)) == index.num_leaves
    pairs = set(zip(leaf.tolist(), code_group.reshape(-1).tolist(), strict=True))
    assert len(pairs) == index.num_leaves
    if scheme == "level":  # the token of every node on an item's path is its code
        assert np.array_equal(index.node_token[index.item_path[1:]], codes[1:])


def test_save_load_round_trip(tmp_path: Path) -> None:
    index = TreeIndex.from_codes(CODES, 4, "node")
    path = index.save(tmp_path / "index.npz")
    loaded = TreeIndex.load(path)
    for field in dataclasses.fields(TreeIndex):
        a, b = getattr(index, field.name), getattr(loaded, field.name)
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, field.name
    with np.load(path, allow_pickle=False) as data:  # nothing needs unpickling
        assert "leaf_items" in data.files


def test_load_refuses_broken_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(IndexValidationError, match="cannot read"):
        TreeIndex.load(bad)
    index = TreeIndex.from_codes(CODES, 4, "level")
    arrays = {f.name: getattr(index, f.name) for f in dataclasses.fields(TreeIndex)}
    arrays["leaf_items"] = index.leaf_items[::-1].copy()  # leaves now disagree with item_path
    broken = TreeIndex(**arrays)
    broken.save(tmp_path / "broken.npz")
    with pytest.raises(IndexValidationError, match="leaf"):
        TreeIndex.load(tmp_path / "broken.npz")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("child_ids", np.array([1, 2, 3, 4, 5, 5, 7]), "exactly one"),
        ("item_path", np.array([[-1, -1], [1, 5], [1, 5], [2, 6], [1, 5], [3, 7]], np.int32), "leaf"),
        ("item_path", np.array([[-1, -1], [2, 4], [1, 5], [2, 6], [1, 5], [3, 7]], np.int32), "parent chain"),
        ("node_token", np.array([0, 0, 1, 2, 0, 1, 0, 9], np.int32), "node_token"),
        ("level_offsets", np.array([0, 1, 5, 8]), "leaf_offsets has shape"),
    ],
)
def test_validate_names_the_broken_invariant(field: str, value: np.ndarray, message: str) -> None:
    index = dataclasses.replace(TreeIndex.from_codes(CODES, 4, "level"), **{field: value})  # type: ignore[arg-type]
    with pytest.raises(IndexValidationError, match=message):
        index.validate()


def test_from_codes_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="outside"):
        TreeIndex.from_codes(np.array([[-1], [0], [3]]), 3)
    with pytest.raises(ValueError, match="token_scheme"):
        TreeIndex.from_codes(CODES, 4, "tokens")
    with pytest.raises(ValueError, match=r"\[N\+1, L\]"):
        TreeIndex.from_codes(np.array([0, 1]), 4)


def test_stats() -> None:
    stats = TreeIndex.from_codes(CODES, 4, "level").stats()
    assert stats["levels"] == 2 and stats["num_leaves"] == 4
    assert stats["leaf_size_max"] == 2 and stats["leaf_size_min"] == 1
    assert stats["per_level"][0] == {
        "level": 1,
        "nodes": 3,
        "branching_min": 3,
        "branching_max": 3,
        "branching_mean": 3.0,
    }
