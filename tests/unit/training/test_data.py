from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data import (
    DatasetError,
    ItemVocab,
    SyntheticDataset,
    dataset_stats,
    default_dataset,
    load_dataset,
    open_dataset,
    synthetic_dataset,
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _raw_sequences(ds) -> dict[str, list[str]]:
    return {u: [ds.vocab.raw_ids[i] for i in seq] for u, seq in zip(ds.user_ids, ds.sequences, strict=True)}


def test_seq_format_keeps_order_and_maps_numeric_ids_in_order(tmp_path: Path) -> None:
    ds = load_dataset(_write(tmp_path, "s.txt", "1 3 1 2\n2 10 3\n\n"), "seq")
    assert ds.vocab.raw_ids == ["", "1", "2", "3", "10"]
    assert _raw_sequences(ds) == {"1": ["3", "1", "2"], "2": ["10", "3"]}
    assert all(s.dtype == np.int64 and s.min() >= 1 for s in ds.sequences)
    assert ds.num_interactions == 5 and ds.skipped_lines == 0 and ds.item_attributes is None


def test_seq_format_rejects_a_line_without_items_naming_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "s.txt", "1 3 1\n2\n3 4 5\n")
    with pytest.raises(DatasetError, match=r"s\.txt:2: expected 'user item1") as info:
        load_dataset(path, "seq")
    assert info.value.line == 2


def test_seq_format_rejects_a_repeated_user(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r":3: user '1' already has a sequence at line 1"):
        load_dataset(_write(tmp_path, "s.txt", "1 3 1\n2 4\n1 5\n"), "seq")


def test_skip_bad_lines_counts_and_keeps_the_good_ones(tmp_path: Path) -> None:
    ds = load_dataset(_write(tmp_path, "s.txt", "1 3 1\nbad\n2 4 5\nalso\n"), "seq", skip_bad_lines=True)
    assert ds.skipped_lines == 2
    assert ds.user_ids == ["1", "2"]
    assert dataset_stats(ds)["skipped_lines"] == 2


def test_pairs_format_groups_by_user(tmp_path: Path) -> None:
    ds = load_dataset(_write(tmp_path, "p.txt", "a x\na y\nb y\nb z\n"), "pairs")
    assert _raw_sequences(ds) == {"a": ["x", "y"], "b": ["y", "z"]}


def test_pairs_format_rejects_ungrouped_users_and_bad_field_counts(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r":3: user 'a' is not grouped"):
        load_dataset(_write(tmp_path, "p.txt", "a x\nb y\na z\n"), "pairs")
    with pytest.raises(DatasetError, match=r":2: expected 'user item', got 3 field"):
        load_dataset(_write(tmp_path, "q.txt", "a x\na y z\n"), "pairs")


def test_movielens_sorts_by_timestamp_in_both_layouts(tmp_path: Path) -> None:
    tab = load_dataset(
        _write(tmp_path, "u.data", "1\t10\t5\t300\n1\t20\t3\t100\n2\t10\t4\t50\n"), "movielens"
    )
    colons = load_dataset(
        _write(tmp_path, "ratings.dat", "1::10::5::300\n1::20::3::100\n2::10::4::50\n"), "movielens"
    )
    for ds in (tab, colons):
        assert _raw_sequences(ds) == {"1": ["20", "10"], "2": ["10"]}


def test_movielens_rejects_a_non_numeric_timestamp(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"u\.data:2: timestamp 'soon' is not a number"):
        load_dataset(_write(tmp_path, "u.data", "1\t10\t5\t300\n1\t20\t3\tsoon\n"), "movielens")


def test_recbole_reads_the_header_and_sorts_by_time(tmp_path: Path) -> None:
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu\ta\t3\t9\nu\tb\t3\t1\n"
    ds = load_dataset(_write(tmp_path, "x.inter", text), "recbole")
    assert _raw_sequences(ds) == {"u": ["b", "a"]}
    with pytest.raises(DatasetError, match=r"y\.inter:4: expected 4 tab-separated fields, got 2"):
        load_dataset(_write(tmp_path, "y.inter", text + "u\tc\n"), "recbole")
    with pytest.raises(DatasetError, match=r":1: header has no 'item_id' field"):
        load_dataset(_write(tmp_path, "z.inter", "user_id:token\tthing:token\nu\ta\n"), "recbole")


def test_csv_with_custom_columns_dates_and_a_bad_row(tmp_path: Path) -> None:
    text = "who,what,when\nu,a,2024-01-02\nu,b,2024-01-01\nv,a,2024-01-03\n"
    ds = load_dataset(
        _write(tmp_path, "x.csv", text), "csv", user_col="who", item_col="what", time_col="when"
    )
    assert _raw_sequences(ds) == {"u": ["b", "a"], "v": ["a"]}
    bad = _write(tmp_path, "bad.csv", "user,item,timestamp\nu,a,1\nu,,2\n")
    with pytest.raises(DatasetError, match=r"bad\.csv:3: empty 'user' or 'item'"):
        load_dataset(bad, "csv")
    with pytest.raises(DatasetError, match="missing column"):
        load_dataset(bad, "csv", time_col="ts")


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pd.DataFrame({"user": ["u", "u", "v"], "item": ["a", "b", "c"], "timestamp": [2, 1, 5]}).to_parquet(path)
    assert _raw_sequences(load_dataset(path, "parquet")) == {"u": ["b", "a"], "v": ["c"]}


def test_item_attributes_beside_the_file_get_dense_ids_from_one(tmp_path: Path) -> None:
    path = _write(tmp_path, "Shop.txt", "1 1 2\n2 2 3\n")
    (tmp_path / "Shop_item2attributes.json").write_text(json.dumps({"1": [7, 9], "3": [9], "99": [4]}))
    ds = load_dataset(path, "seq")
    assert ds.num_attributes == 3  # 4, 7, 9 -> 1, 2, 3
    assert ds.item_attributes is not None and len(ds.item_attributes) == ds.num_items + 1
    assert ds.item_attributes[1].tolist() == [2, 3]
    assert ds.item_attributes[2].tolist() == []
    assert ds.item_attributes[3].tolist() == [3]


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data format 'xml'"):
        load_dataset(tmp_path / "x", "xml")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "missing.txt", "seq")


def test_item_vocab() -> None:
    vocab = ItemVocab(["", "a", "b"])
    assert vocab.dense("b") == 2 and vocab.dense("zzz") is None and vocab.num_items == 2
    with pytest.raises(ValueError, match="padding"):
        ItemVocab(["a"])


def test_fingerprint_is_stable_and_sensitive(tmp_path: Path) -> None:
    a = load_dataset(_write(tmp_path, "a.txt", "1 1 2\n2 2 3\n"), "seq")
    b = load_dataset(_write(tmp_path, "b.txt", "1 1 2\n2 2 3\n"), "seq")
    c = load_dataset(_write(tmp_path, "c.txt", "1 2 1\n2 2 3\n"), "seq")
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_default_dataset_is_movielens_100k() -> None:
    ds = default_dataset()
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100_000)
    assert open_dataset("default") is ds


def test_synthetic_dataset_plants_a_cluster_path_per_item(synthetic: SyntheticDataset) -> None:
    clusters = synthetic.item_clusters
    assert clusters.shape == (synthetic.num_items + 1, 2)
    assert (clusters[0] == -1).all() and (clusters[1:] >= 0).all()
    assert clusters[1:, 0].max() == 3 and clusters[1:, 1].max() == 15
    assert (clusters[1:, 1] // 4 == clusters[1:, 0]).all()  # a leaf lies under its level-1 cluster
    assert synthetic.num_users == 1000
    again = synthetic_dataset(num_users=1000, num_items=200, branching=4, depth=2, seed=0)
    assert again.fingerprint() == synthetic.fingerprint()
    # users stay within one level-1 subtree
    tops = [np.unique(clusters[seq, 0]) for seq in synthetic.sequences[:50]]
    assert all(len(t) == 1 for t in tops)
