from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    average_partition_entropy,
    evaluate_ranking,
    hr_at_k,
    label_groups,
    ndcg_at_k,
    recall_at_k,
)

RANKED = np.array([[3, 1, 7, 2], [5, 6, 0, 0]])
TARGETS = [np.array([1, 2, 9]), np.array([8])]


def test_recall_by_hand() -> None:
    assert recall_at_k(RANKED, TARGETS, 2) == pytest.approx((1 / 3 + 0) / 2)
    assert recall_at_k(RANKED, TARGETS, 4) == pytest.approx((2 / 3 + 0) / 2)


def test_hit_rate_by_hand() -> None:
    assert hr_at_k(RANKED, TARGETS, 1) == 0.0
    assert hr_at_k(RANKED, TARGETS, 2) == pytest.approx(0.5)


def test_ndcg_by_hand() -> None:
    # row 0: hits at ranks 1 and 3 (0-based); 3 targets -> ideal over min(3, k) positions
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg4 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RANKED, TARGETS, 4) == pytest.approx(dcg / idcg4 / 2)
    idcg2 = 1 + 1 / math.log2(3)
    assert ndcg_at_k(RANKED, TARGETS, 2) == pytest.approx((1 / math.log2(3)) / idcg2 / 2)


def test_perfect_ranking_scores_one() -> None:
    ranked = np.array([[4, 2, 0]])
    out = evaluate_ranking(ranked, [np.array([2, 4])], ks=(2, 3))
    assert out == {"recall@2": 1.0, "ndcg@2": 1.0, "hr@2": 1.0, "recall@3": 1.0, "ndcg@3": 1.0, "hr@3": 1.0}


def test_duplicates_padding_and_empty_targets_do_not_count() -> None:
    ranked = np.array([[2, 2, -1, 0], [1, 2, 3, 4]])
    targets = [np.array([2, 5]), np.array([], dtype=np.int64)]  # second row is left out of the mean
    assert recall_at_k(ranked, targets, 4) == pytest.approx(0.5)
    assert evaluate_ranking(ranked, targets, ks=(10,))["recall@10"] == pytest.approx(0.5)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        recall_at_k(np.array([1, 2]), [np.array([1])], 1)
    with pytest.raises(ValueError, match="2 ranked rows but 1 target"):
        recall_at_k(RANKED, TARGETS[:1], 1)


def test_ape_by_hand() -> None:
    leaf = np.array([-1, 0, 0, 1, 1])  # items 1,2 in leaf 0; 3,4 in leaf 1
    # query A: items {1, 2} -> one leaf, H = 0; query B: {1, 3} -> two leaves, H = ln 2
    assert average_partition_entropy(leaf, [np.array([1, 2]), np.array([1, 3, 3])]) == pytest.approx(
        math.log(2) / 2
    )


def test_ape_with_item_labels() -> None:
    leaf = np.array([-1, 0, 0, 1, 1])
    labels = np.array([-1, 7, 7, 7, 9])  # label 7: leaves {0,0,1} -> H(2/3,1/3); label 9: H = 0
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert average_partition_entropy(leaf, labels) == pytest.approx(h / 2)
    assert [g.tolist() for g in label_groups(labels)] == [[1, 2, 3], [4]]


def test_ape_of_planted_clusters_is_zero_for_the_planted_index(synthetic) -> None:
    leaf = synthetic.item_clusters[:, -1]
    assert average_partition_entropy(leaf, synthetic.item_clusters[:, -1]) == 0.0
    shuffled = leaf.copy()
    shuffled[1:] = np.random.default_rng(0).permutation(leaf[1:])
    assert average_partition_entropy(shuffled, leaf) > 1.0
