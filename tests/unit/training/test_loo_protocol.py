"""Leave-one-out as the literature runs it: last item for test, second to last for validation, full
ranking with every earlier item of the user excluded, reported at 5 / 10 / 20; IVF at equal
candidates on the same users and exclusions."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import Dataset, ItemVocab
from training.evaluation import evaluate_recommender
from training.methods.sasrec.cache import sasrec_cache_key, sasrec_config
from training.metrics import LOO_KS, split_ks
from training.splits import EvalSet, Split, make_split, target_in_history_share


def _dataset(sequences: list[list[int]], num_items: int = 9) -> Dataset:
    return Dataset(
        name="loo",
        user_ids=[f"u{i}" for i in range(len(sequences))],
        sequences=[np.asarray(s, np.int64) for s in sequences],
        vocab=ItemVocab(["", *(str(i) for i in range(1, num_items + 1))]),
    )


class InOrder:
    """Recommends items 1, 2, 3, ... in that order, minus the excluded ones."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def recommend(self, histories: list[np.ndarray], k: int, exclude: list[np.ndarray] | None) -> np.ndarray:
        out = np.zeros((len(histories), k), np.int64)
        for row in range(len(histories)):
            items = np.arange(1, self.num_items + 1)
            if exclude is not None:
                items = items[~np.isin(items, exclude[row])]
            out[row, : min(k, len(items))] = items[:k]
        return out


def test_loo_excludes_every_earlier_item_not_only_the_window() -> None:
    split = make_split(_dataset([[1, 2, 3, 4, 5, 6, 7], [8, 9]]), "loo", max_len=3)
    assert split.test.user_ids == ["u0"] and split.train[1].tolist() == [8, 9]  # u1 only trains
    assert split.test.histories[0].tolist() == [4, 5, 6] and split.test.targets[0].tolist() == [7]
    assert split.valid.histories[0].tolist() == [3, 4, 5] and split.valid.targets[0].tolist() == [6]
    assert split.test.excluded()[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert split.valid.excluded()[0].tolist() == [1, 2, 3, 4, 5]
    # items 1-6 are out of the ranking, so the in-order recommender ranks the target 7 first
    metrics = evaluate_recommender(InOrder(9), split.test, LOO_KS)
    assert metrics["recall@5"] == metrics["ndcg@5"] == 1.0
    head = split.test.head(1)
    assert head.seen is not None and head.excluded()[0].tolist() == [1, 2, 3, 4, 5, 6]


def test_a_repeated_target_is_excluded_and_counts_as_a_miss() -> None:
    split = make_split(_dataset([[1, 2, 3, 2], [4, 5, 6, 7]]), "loo", max_len=50)
    assert target_in_history_share(split.test) == 0.5  # u0's last item 2 is also in its history
    assert target_in_history_share(split.valid) == 0.0
    ranked = evaluate_recommender(InOrder(9), split.test, (20,))
    assert ranked["recall@20"] == 0.5  # u1 hits (item 7 is ranked), u0 cannot


def test_the_user_split_keeps_excluding_the_history_it_reads(synthetic) -> None:
    split = make_split(synthetic, "user", max_len=5)
    assert split.test.seen is None and split.test.excluded() is split.test.histories
    assert split_ks("user") == (10, 20, 50) and split_ks("loo") == LOO_KS == (5, 10, 20)


def test_ivf_at_equal_candidates_reports_every_loo_metric(synthetic) -> None:
    pytest.importorskip("faiss")
    from training.comparison import ivf_sweep_metrics

    split = make_split(synthetic, "loo", max_len=10)
    rng = np.random.default_rng(0)
    items = rng.normal(size=(split.num_items + 1, 8)).astype(np.float32)
    users = rng.normal(size=(len(split.test), 8)).astype(np.float32)
    points = ivf_sweep_metrics(items, users, split.test, LOO_KS, seed=0)
    assert set(points[-1][1]) == {f"{m}@{k}" for m in ("recall", "ndcg", "hr") for k in LOO_KS}
    assert points[-1][0] == split.num_items  # every cell probed: exhaustive
    exact = users @ items[1:].T  # [U, N] the exhaustive ranking, earlier items excluded
    for row, seen in enumerate(split.test.excluded()):
        exact[row, seen - 1] = -np.inf
    top = np.argsort(-exact, axis=1)[:, :20] + 1
    hits = [t[0] in row for t, row in zip(split.test.targets, top, strict=True)]
    assert points[-1][1]["recall@20"] == pytest.approx(np.mean(hits))


def test_the_sasrec_yaml_states_the_dataclass_defaults() -> None:
    """The YAML is the documented default: it must not drift from the dataclass others construct."""
    from training.methods.sasrec.config import SASRecConfig

    assert SASRecConfig.load() == SASRecConfig()
    assert SASRecConfig.load({"sasrec.ffn_mult": 4}).ffn_mult == 4


def test_the_dropout_rule_reads_the_density_and_an_explicit_dropout_wins() -> None:
    def split(users: int) -> Split:  # 10 items, 3 training interactions per user
        none = EvalSet([], [], [])
        return Split("loo", 0, 5, [np.array([1, 2, 3])] * users, none, none, 10)

    sparse, dense = split(10), split(1000)  # 3 and 300 interactions per item
    rule = {"sasrec.sparse_dropout": "0.5", "sasrec.sparse_below": "30"}
    assert sasrec_config(rule, sparse).dropout == 0.5
    assert sasrec_config(rule, dense).dropout == 0.3
    assert sasrec_config({**rule, "sasrec.dropout": "0.2"}, sparse).dropout == 0.2
    # the rule's own fields are not in the cache key: the resolved model is the explicit one's
    explicit = sasrec_config({"sasrec.dropout": "0.5"}, sparse)
    key = sasrec_cache_key("fp", sparse, 0, sasrec_config(rule, sparse))
    assert key == sasrec_cache_key("fp", sparse, 0, explicit)
