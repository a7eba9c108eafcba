"""The live catalogue: deltas applied to a bundle, served by a Retriever without a reload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bundle.bundle import Bundle, load_bundle
from models.catalogue import descent
from models.catalogue.catalogue import Catalogue, Delta, DeltaError, NewItem
from models.search.retriever import Retriever

from .conftest import DIM, NUM_ITEMS, build_tiny_model, export_tiny

HISTORIES = [np.array([3, 17, 22]), np.array([8]), np.array([1, 2, 4, 5])]


@pytest.fixture(scope="module")
def bucket_bundle(tiny_bundle_dir: Path) -> Bundle:
    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def node_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The tiny model with one token per node (SEATER/TDR-like: the decoder knows the bundle's nodes only)."""
    m = build_tiny_model(seed=1, token_scheme="node")
    out = export_tiny(m, tmp_path_factory.mktemp("bundles") / "node", "node", max_history=6)
    return load_bundle(out)


def vec(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(DIM).astype(np.float32)


def test_delta_json_errors_name_the_field() -> None:
    cases = [
        ([], "body"),
        ({"add": [{"vector": [1.0]}]}, "add[0].id"),
        ({"add": [{"id": "x", "vector": [1.0, "a"]}]}, "add[0].vector"),
        ({"add": [{"id": "x", "vector": [float("nan")]}]}, "add[0].vector"),
        ({"remove": [None]}, "remove[0]"),
        ({"add": [{"id": "x", "colour": 1}]}, "add[0].colour"),
        ({}, "body"),
        ({"add": [{"id": "x", "vector": [1.0, True]}]}, "add[0].vector"),
        ({"add": [{"id": "x", "vector": [1e39]}]}, "add[0].vector"),
        ({"add": [{"id": "x", "vector_f32": "not base64!"}]}, "add[0].vector_f32"),
        ({"add": [{"id": "x", "vector_f32": "AAAA"}]}, "add[0].vector_f32"),  # 3 bytes
        ({"add": [{"id": "x", "vector": [1.0], "vector_f32": "AACAPw=="}]}, "add[0].vector_f32"),
    ]
    for body, field in cases:
        with pytest.raises(DeltaError) as err:
            Delta.from_json(body)
        assert err.value.field == field, body
    delta = Delta.from_json({"add": [{"id": 7, "vector": [1, 2]}], "remove": ["a"]})
    for compact in (False, True):  # vectors as lists, or as base64 float32 (what delta files hold)
        again = Delta.from_json(delta.to_json(compact=compact))
        assert again.remove == ("a",) and again.add[0].id == "7"
        np.testing.assert_array_equal(again.add[0].vector, [1.0, 2.0])
    assert "vector_f32" in Delta.from_json(delta.to_json()).to_json(compact=True)["add"][0]


def test_check_refuses_what_the_catalogue_contradicts(bucket_bundle: Bundle) -> None:
    cat = Catalogue.from_bundle(bucket_bundle)
    rng = np.random.default_rng(0)
    bad = [
        (Delta(add=(NewItem("sku-001", vec(rng)),)), "add[0].id"),
        (Delta(add=(NewItem("new", vec(rng)), NewItem("new", vec(rng)))), "add[1].id"),
        (Delta(add=(NewItem("new", np.ones(DIM + 1, np.float32)),)), "add[0].vector"),
        (Delta(add=(NewItem("new", None, ("a",)),)), "add[0].vector"),  # no content tower
        (Delta(remove=("nope",)), "remove[0]"),
    ]
    for delta, field in bad:
        with pytest.raises(DeltaError) as err:
            cat.apply(delta)
        assert err.value.field == field
    assert cat.version == 0 and cat.num_items == NUM_ITEMS  # nothing changed


@pytest.mark.parametrize("which", ["bucket_bundle", "node_bundle"])
def test_added_items_are_served_and_removed_ones_never(which: str, request: pytest.FixtureRequest) -> None:
    bundle: Bundle = request.getfixturevalue(which)
    base = Retriever(bundle, "cpu", "onnx", intra_op_threads=1)
    cat = Catalogue.from_bundle(bundle)
    states = base.encode(HISTORIES)
    query = states.query.numpy()
    # one added item per user, pointing along that user's query: the best item for it once added
    adds = tuple(NewItem(f"new-{r}", (query[r] * 10).astype(np.float32)) for r in range(len(HISTORIES)))
    removed = tuple(f"sku-{i:03d}" for i in (5, 6, 7))
    v1, report = cat.apply(Delta(add=adds, remove=removed))
    assert (v1.version, report.added, report.removed) == (1, 3, 3)
    assert report.dense_ids == (NUM_ITEMS + 1, NUM_ITEMS + 2, NUM_ITEMS + 3)
    assert cat.version == 0 and cat.num_items == NUM_ITEMS  # the old version is untouched
    served = base.with_catalogue(v1)
    assert served.catalogue_version == 1 and base.catalogue_version == 0
    full = served.search(states, k=5, beam_size=served.trie.num_nodes)  # every leaf
    removed_dense = {5, 6, 7}
    for r in range(len(HISTORIES)):
        assert full.items[r, 0] == NUM_ITEMS + 1 + r  # its own added item is its best match
        assert not set(full.items[r].tolist()) & removed_dense
    narrow = served.search(states, k=3, beam_size=2)
    assert not set(narrow.items.reshape(-1).tolist()) & removed_dense
    old = base.search(states, k=5, beam_size=base.trie.num_nodes)  # the old version still serves
    assert (old.items <= NUM_ITEMS).all()
    # removing an added item and every item of a leaf: dead leaves are never in a beam
    leaf = int(bundle.index.leaf_start)
    whole_leaf = tuple(v1.item_ids[int(d)] for d in bundle.index.items_of_leaf(0) if v1.live[int(d)])
    v2, _ = v1.apply(Delta(remove=("new-0", *whole_leaf)))
    again = base.with_catalogue(v2).search(states, k=5, beam_size=v2.index.num_nodes)
    assert NUM_ITEMS + 1 not in again.items and leaf not in again.leaves


@pytest.mark.parametrize("which", ["bucket_bundle", "node_bundle"])
def test_placement_is_deterministic_and_near_copies_join(which: str, request: pytest.FixtureRequest) -> None:
    bundle: Bundle = request.getfixturevalue(which)
    cat = Catalogue.from_bundle(bundle)
    rng = np.random.default_rng(5)
    copy_of_9 = bundle.item_emb[9] * 1.5  # cosine 1 with item 9
    delta = Delta(add=(NewItem("copy", copy_of_9), *(NewItem(f"n{i}", vec(rng)) for i in range(30))))
    a, report = cat.apply(delta)
    b, _ = cat.apply(delta)
    assert report.joined_copies >= 1
    assert a.leaf_of[NUM_ITEMS + 1] == a.leaf_of[9]  # the copy joined item 9's leaf
    for name in ("leaf_of", "decoder_node", "live_count"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.index.child_ids, b.index.child_ids)
    assert a.index.child_offsets.max() == a.index.num_nodes - 1
    counts = np.diff(a.index.child_offsets)
    assert counts.max() <= bundle.index.max_branching  # new leaves only where a parent has room
    # every node the decoder sees is one of the bundle's
    assert a.decoder_node.max() < bundle.index.num_nodes
    # each live item sits in exactly one leaf, and its path is a parent chain
    live = np.flatnonzero(a.live)
    np.testing.assert_array_equal(np.sort(a.index.leaf_items), live)
    path = a.index.item_path[live].astype(np.int64)
    assert (a.parent[path[:, 1:]] == path[:, :-1]).all() and (a.parent[path[:, 0]] == 0).all()
    # the centroid sums kept up to date equal the sums recomputed from scratch
    unit = a.item_emb[live] / np.linalg.norm(a.item_emb[live], axis=1, keepdims=True)
    for node in range(1, a.centroid_sum.shape[0]):
        below = (path == node).any(axis=1)
        np.testing.assert_allclose(a.centroid_sum[node], unit[below].sum(axis=0), atol=1e-4)


def test_allow_lists_hold_and_k_is_guaranteed(bucket_bundle: Bundle) -> None:
    """Property: every returned item is allowed and not excluded; k is met when k allowed items exist."""
    retriever = Retriever(bucket_bundle, "cpu", "onnx", intra_op_threads=1)
    rng = np.random.default_rng(7)
    for trial in range(25):
        B = int(rng.integers(1, 5))
        histories = [rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(1, 6))) for _ in range(B)]
        allow = [
            None if rng.random() < 0.25 else rng.choice(np.arange(1, NUM_ITEMS + 1), int(rng.integers(1, 15)))
            for _ in range(B)
        ]
        exclude = [rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(0, 4))) for _ in range(B)]
        k, beam = int(rng.integers(1, 12)), int(rng.integers(1, 4))
        result = retriever.retrieve(histories, k=k, beam_size=beam, exclude=exclude, allow=allow, fill=True)
        query = retriever.encode(histories).query.numpy()
        for r in range(B):
            got = result.items[r][result.items[r] > 0]
            assert len(set(got.tolist())) == len(got), trial
            assert not set(got.tolist()) & set(exclude[r].tolist()), trial
            allowed = allow[r]
            pool = set(range(1, NUM_ITEMS + 1)) if allowed is None else set(allowed.tolist())
            assert set(got.tolist()) <= pool, trial
            available = len(pool - set(exclude[r].tolist()))
            assert len(got) == min(k, available), trial
            assert result.dense_filled is not None and result.dense_filled[r] <= len(got)
            assert np.all(np.diff(result.scores[r][: len(got)]) <= 0)  # the fill is merged by score
            if allowed is not None:  # a small allow-list is scored exactly: the exact top-k over it
                pool_ids = np.array(sorted(pool - set(exclude[r].tolist())), np.int64)
                exact = pool_ids[np.argsort(-(bucket_bundle.item_emb[pool_ids] @ query[r]), kind="stable")][
                    :k
                ]
                np.testing.assert_allclose(
                    np.sort(bucket_bundle.item_emb[got] @ query[r]),
                    np.sort(bucket_bundle.item_emb[exact] @ query[r]),
                    rtol=1e-5,
                )


@pytest.mark.parametrize("which", ["bucket_bundle", "node_bundle"])
def test_every_item_removed_is_an_empty_answer(which: str, request: pytest.FixtureRequest) -> None:
    """A catalogue with no live item (or no allowed live item) searches to nothing, not an error."""
    bundle: Bundle = request.getfixturevalue(which)
    base = Retriever(bundle, "cpu", "onnx", intra_op_threads=1)
    cat = Catalogue.from_bundle(bundle)
    states = base.encode(HISTORIES)
    half, _ = cat.apply(Delta(remove=tuple(cat.item_ids[1 : NUM_ITEMS // 2])))
    gone = np.arange(1, NUM_ITEMS // 2)  # dense ids removed in `half`
    allow = [gone[:3], gone[3:], gone]  # only removed items allowed
    empty, _ = half.apply(Delta(remove=tuple(half.dense_of)))
    for served, rows_allow in ((base.with_catalogue(half), allow), (base.with_catalogue(empty), None)):
        for fill in (False, True):
            found = served.search(states, 5, 4, None, allow=rows_allow, fill=fill)
            assert (found.items == 0).all() and np.isneginf(found.scores).all()
            assert (found.num_candidates == 0).all()


@pytest.mark.parametrize("which", ["bucket_bundle", "node_bundle"])
def test_a_carried_placement_installs_the_same_version(which: str, request: pytest.FixtureRequest) -> None:
    """The writer's placement, carried in the record, gives the version the replica would compute;
    one that does not fit the version (a hostile or stale record) is computed again, never trusted."""
    from dataclasses import replace

    from models.catalogue import carried

    bundle: Bundle = request.getfixturevalue(which)
    cat = Catalogue.from_bundle(bundle)
    rng = np.random.default_rng(11)
    delta = Delta(
        add=(NewItem("copy", bundle.item_emb[9] * 2), *(NewItem(f"n{i}", vec(rng)) for i in range(30)))
    )
    written, report = cat.apply(delta)
    assert not report.carried and len(report.placement) == 31
    placement = carried.from_json(carried.to_json(report.placement), 31)
    assert placement == list(report.placement)  # the record's form round-trips
    first = report.placement[0]
    wrong = [
        list(report.placement[:-1]),  # one short
        [replace(first, leaf=cat.index.num_nodes + 5, new_leaf=True), *report.placement[1:]],  # numbering
        [replace(first, parent=0), *report.placement[1:]],  # not the leaf's parent
        [replace(first, leaf=-3), *report.placement[1:]],
    ]
    if report.new_leaves:  # an alias the decoder does not know
        wrong.append([replace(p, alias=10**9) if p.new_leaf else p for p in report.placement])
    for given, expect_carried in [(placement, True), *((w, False) for w in wrong)]:
        again, used = cat.apply(delta, placement=given)
        assert used.carried is expect_carried
        for name in ("leaf_of", "decoder_node", "live_count", "parent", "centroid_sum"):
            np.testing.assert_array_equal(getattr(again, name), getattr(written, name))
        np.testing.assert_array_equal(again.index.node_token, written.index.node_token)
    bad_records: list[object] = [
        {"leaf": "AA=="},
        {**carried.to_json(report.placement), "flags": "!"},
        [],
        None,
    ]
    for bad in bad_records:
        assert carried.from_json(bad, 31) is None


def test_best_columns_hold_the_k_highest_scores_best_first() -> None:
    rng = np.random.default_rng(0)
    score = rng.standard_normal((64, 40)).astype(np.float32)
    score[:, 30:] = -np.inf
    for k in (1, 4, 40, 50):
        want = np.argsort(-score, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(descent.best_columns(score, k), want)
    ties = rng.integers(0, 5, size=(64, 40)).astype(np.float32)
    got = descent.best_columns(ties, 4)
    top4 = np.sort(ties, axis=1)[:, ::-1][:, :4]
    np.testing.assert_array_equal(np.take_along_axis(ties, got, 1), top4)  # the same scores, best first


def test_the_descent_scores_children_alike_grouped_or_gathered(
    node_bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Children scored node by node (few beam nodes in a chunk) or by one gather (many) and the whole
    level by one matmul (small levels): the same parents, best first."""
    tree = Catalogue.from_bundle(node_bundle)._tree()
    unit = descent.unit_rows(np.random.default_rng(1).standard_normal((300, DIM)).astype(np.float32))
    runs = []
    for grouped, dense in ((10**9, 0), (0, 0), (10**9, 10**9)):
        monkeypatch.setattr(descent, "GROUPED_NODES", grouped)
        monkeypatch.setattr(descent, "DENSE_LEVEL_FACTOR", dense)
        runs.append(descent.candidate_parents(tree.index, tree.centroid_sum, unit))
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    assert (runs[0][:, 0] >= 0).all()
