"""`genret index-report` rows: one APE column per query set (training and test users) and level."""

from __future__ import annotations

import numpy as np
import pytest

from training.index_report import ape_row, level_buckets, random_codes


def test_ape_row_has_a_column_per_query_set_and_level() -> None:
    codes = np.array([[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1]])  # 4 items, k = 2, L = 2
    queries = {"train": [np.array([1, 2])], "test": [np.array([1, 3])]}
    row = ape_row("x", level_buckets(codes), queries, labels=None)
    assert row["train_l1"] == 0.0  # items 1, 2 share the level-1 bucket
    assert row["test_l1"] == pytest.approx(np.log(2))  # items 1, 3 do not
    assert row["train_l2"] == row["test_l2"] == pytest.approx(np.log(2))
    assert (row["leaves"], row["leaf_min"], row["leaf_max"]) == (4, 1, 1)


def test_random_codes_are_balanced() -> None:
    codes = random_codes(num_items=64, k=4, levels=2, seed=0)
    assert np.bincount(level_buckets(codes)[1:, 1]).tolist() == [4] * 16
