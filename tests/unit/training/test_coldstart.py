"""Cold-start evaluation (training/coldstart.py): the held-out items never reach training, the
live path adds them back from their attributes, and users of their cluster get them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.bundle.bundle import load_bundle
from models.search.retriever import Retriever
from training.coldstart.holdout import add_held_out, hold_out_items, reduced_split
from training.coldstart.run import ColdstartConfig, _reusable, run_coldstart
from training.coldstart.scoring import ranked_top_k
from training.coldstart.vectors import attribute_knn_vectors, category_popularity_vectors, compare_vectors
from training.data import SyntheticDataset, synthetic_dataset
from training.splits import make_split


def clustered_with_attributes() -> SyntheticDataset:
    """Planted clusters; each item's attributes are its leaf and its level-1 cluster (and a
    per-item one nobody else has)."""
    ds = synthetic_dataset(num_users=300, num_items=64, branching=4, depth=2, seed=0)
    clusters = ds.item_clusters  # [N+1, 2]
    leaves = int(clusters[1:, 1].max()) + 1
    attrs = [np.zeros(0, np.int64)] + [
        np.asarray([1 + clusters[i, 1], 1 + leaves + clusters[i, 0]], np.int64)
        for i in range(1, ds.num_items + 1)
    ]
    return replace(ds, item_attributes=attrs, num_attributes=leaves + 4)


OVERRIDES = {
    "sasrec.max_epochs": "10",
    "seater.epochs": "2",
    "seater.batch_size": "64",
    "seater.branching": "4",
}


def test_holdout_removes_items_from_training() -> None:
    ds = clustered_with_attributes()
    holdout = hold_out_items(ds, 0.1, seed=0)
    assert len(holdout.items) == round(0.1 * ds.num_items)
    assert holdout.dataset.num_items == ds.num_items - len(holdout.items)
    held_raw = set(holdout.raw_ids(ds))
    assert held_raw.isdisjoint(holdout.dataset.vocab.raw_ids)
    full_split = make_split(ds, "user", seed=0, max_len=10)
    split = reduced_split(full_split, holdout)
    raw = holdout.dataset.vocab.raw_ids
    seen = {raw[i] for seq in split.train for i in seq} | {raw[i] for h in split.valid.histories for i in h}
    assert seen and seen.isdisjoint(held_raw)
    assert len(split.train) == len(full_split.train)  # the same training users
    # a kept item keeps its attributes
    item = int(np.flatnonzero(holdout.to_reduced)[3])
    reduced_attrs, attrs = holdout.dataset.item_attributes, ds.item_attributes
    assert reduced_attrs is not None and attrs is not None
    assert np.array_equal(reduced_attrs[holdout.to_reduced[item]], attrs[item])


@pytest.mark.slow
def test_coldstart_adds_held_out_items_and_serves_them(tmp_path: Path) -> None:
    """The whole path on planted clusters: held-out items are absent from the trained bundle, in
    the catalogue after the add (content-tower vectors), and served to users of their own cluster."""
    ds = clustered_with_attributes()
    overrides = {"cache_dir": str(tmp_path / "cache"), **OVERRIDES}
    result = run_coldstart(ColdstartConfig(ds, ("seater",), tmp_path, max_len=10, overrides=overrides))
    (row,) = result.methods
    holdout = hold_out_items(ds, 0.1, seed=0)
    reduced = load_bundle(row.bundles["reduced"])
    held_raw = set(holdout.raw_ids(ds))
    assert held_raw.isdisjoint(reduced.item_ids.tolist())  # absent from the trained bundle
    added = add_held_out(reduced, ds, holdout)
    assert added.added == len(holdout.items) == row.add["added"]  # every item has known attributes
    first_new = reduced.manifest.num_items + 1
    assert set(added.catalogue.item_ids[first_new:]) == held_raw  # present after the add
    assert result.sets["new_item_users"] > 0 and 0 <= result.sasrec_full_new["recall@20"] <= 1
    assert row.full_overall["recall@20"] > 0 and row.scores["overall"]["recall@20"] > 0

    # a user who has bought the other items of an added item's planted leaf gets the added item
    retriever = Retriever(reduced, "cpu", "onnx").with_catalogue(added.catalogue)
    leaf = ds.item_clusters[:, 1]  # [N+1] planted leaf of each full-data id
    full_id = {raw: i for i, raw in enumerate(ds.vocab.raw_ids)}
    cat_leaf = np.asarray([-1] + [leaf[full_id[raw]] for raw in added.catalogue.item_ids[1:]])
    new_ids = np.arange(first_new, added.catalogue.num_rows)
    histories = [np.flatnonzero(cat_leaf[:first_new] == cat_leaf[j]) for j in new_ids]
    served = ranked_top_k(retriever, histories, k=5)  # [H, 5], history excluded
    found = [j in top for j, top in zip(new_ids, served, strict=True)]
    assert np.mean(found) >= 0.8, (found, served)


def test_full_bundles_are_found_by_data_fingerprint(tmp_path: Path) -> None:
    """``--full-bundles``: ``<dir>/<method>`` of the same data set; TDR's rounds layout gives its best round."""
    ds = clustered_with_attributes()
    (tmp_path / "seater").mkdir()
    (tmp_path / "seater" / "manifest.json").write_text(json.dumps({"dataset_fingerprint": ds.fingerprint()}))
    for r in (0, 1):
        (tmp_path / "tdr" / f"round{r}").mkdir(parents=True)
        manifest = {"dataset_fingerprint": ds.fingerprint() if r == 1 else "other"}
        (tmp_path / "tdr" / f"round{r}" / "manifest.json").write_text(json.dumps(manifest))
    rounds = [{"bundle": f"elsewhere/tdr/round{r}", "valid_recall@20": 0.1 * r} for r in (0, 1)]
    (tmp_path / "tdr" / "rounds.json").write_text(json.dumps(rounds))
    assert _reusable(tmp_path, "seater", ds) == tmp_path / "seater"
    assert _reusable(tmp_path, "tdr", ds) == tmp_path / "tdr" / "round1"
    assert _reusable(tmp_path, "uri", ds) is None and _reusable(None, "seater", ds) is None


def test_content_only_vectors_are_compared_on_one_hold_out(tmp_path: Path) -> None:
    """Every source on the same users; leaving the items out never finds them; the two baselines'
    vectors are the weighted means of their neighbours, with the neighbours' mean norm."""
    ds = clustered_with_attributes()
    result = compare_vectors(ds, tmp_path, max_len=10, overrides={"sasrec.max_epochs": "2"})
    assert list(result.scores) == ["absent", "tower", "attribute_knn", "category_popularity"]
    assert result.held_out == 6 and result.no_attributes == 0 and result.new_users > 0
    assert result.scores["absent"]["new_recall@20"] == 0.0
    assert all(0.0 <= s["all_recall@20"] <= 1.0 for s in result.scores.values())
    known = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]  # four items: attributes a, a, b, c
    emb = np.asarray([[1, 0], [3, 0], [0, 1], [0, -1]], np.float32)
    new = np.eye(3, dtype=np.float32)[[0]]  # holds attribute a: its neighbours are items 0 and 1
    np.testing.assert_allclose(attribute_knn_vectors(known, emb, new, k=2), [[2.0, 0.0]])
    popular = category_popularity_vectors(known, emb, np.asarray([1, 3, 5, 5]), new)
    np.testing.assert_allclose(popular, [[2.5, 0.0]])  # direction of the mean, norm 0.25 * 1 + 0.75 * 3
