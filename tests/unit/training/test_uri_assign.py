"""URI's assignment pieces (:mod:`training.methods.uri.assign`): query evidence, the k-means warm
start inside parents, and the planted check that a warm-started, evidence-assigned URI recovers the
planted partition at both levels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.context import TrainContext
from training.data import synthetic_dataset
from training.index_report import level_buckets
from training.methods.uri.assign import QueryEvidence, kmeans_within_parents
from training.methods.uri.config import URIConfig
from training.methods.uri.layerwise import URITrainer
from training.metrics import average_partition_entropy
from training.splits import make_split


def test_evidence_is_the_mean_query_distribution_blended_with_the_item_prior() -> None:
    ev = QueryEvidence(num_items=3, k=2)
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]]))
    ev.add(np.array([1, 1, 2]), logits)  # item 1: two queries, item 2: one, item 3: none
    p_i = np.array([[0.1, 0.9], [0.5, 0.5], [0.3, 0.7]])  # [N, k] the items' own P_I
    np.testing.assert_allclose(ev.scores(p_i, prior=0.0)[:2], [[0.8, 0.2], [0.2, 0.8]])
    np.testing.assert_allclose(ev.scores(p_i, prior=0.0)[2], p_i[2])  # no query: keeps P_I
    np.testing.assert_allclose(ev.scores(p_i, prior=1.0)[0], [(1.6 + 0.1) / 3, (0.4 + 0.9) / 3])
    assert ev.coverage() == pytest.approx(2 / 3)
    ev.reset()
    assert ev.coverage() == 0.0


def test_kmeans_within_parents_is_balanced_inside_each_parent() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60, 4)).astype(np.float32)
    parents = np.repeat([0, 1, 2], [30, 20, 10])
    tokens = kmeans_within_parents(vectors, parents, k=4, seed=0)
    for group, n in ((0, 30), (1, 20), (2, 10)):
        sizes = np.bincount(tokens[parents == group], minlength=4)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n


PLANTED = {
    "uri.k": 4,
    "uri.levels": 2,
    "uri.dim": 32,
    "uri.batch_size": 128,
    "uri.level_max_epochs": 8,
    "uri.ranker_epochs": 1,
    "uri.query_encoder": "sasrec",
    "sasrec.dim": "32",
    "sasrec.max_epochs": "20",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        {"uri.warm_start": "all", "uri.em_levels": "2"},  # k-means start, evidence moves items at both levels
        {"uri.warm_start": "none", "uri.assign_from": "queries"},  # URI's soft losses, evidence assignment
    ],
    ids=["warm-em", "soft-evidence"],
)
def test_planted_partition_is_recovered_at_both_levels(tmp_path: Path, variant: dict[str, str]) -> None:
    """Users read items of two planted leaves under one top cluster. With evidence-based assignment
    the level-1 APE must come within 10% of the planted partition's (from random), on training and
    on held-out test users. Level 2 is recovered only in part (measured: APE 1.16 warm-em, 1.23
    soft-evidence vs planted 0.66, random 1.92), so it is held to better than halfway."""
    ds = synthetic_dataset(num_users=800, num_items=160, branching=4, depth=2, seed=0, follow_prob=0.0)
    split = make_split(ds, "user", seed=0, max_len=20)
    overrides = {**PLANTED, **variant, "cache_dir": str(tmp_path / "cache")}
    ctx = TrainContext(ds, split, 0, tmp_path, overrides)
    trainer = URITrainer(URIConfig.load(overrides=overrides), ctx)
    trainer.fit()
    uri = level_buckets(trainer.codes)
    planted = level_buckets(ds.item_clusters[:, :2])
    test = [np.concatenate([h, t]) for h, t in zip(split.test.histories, split.test.targets, strict=True)]
    for queries in ([s for s in split.train if len(s) > 1], test):
        for level in range(2):
            got = average_partition_entropy(uri[:, level], queries)
            target = average_partition_entropy(planted[:, level], queries)
            shuffled = np.r_[-1, np.random.default_rng(0).permutation(uri[1:, level])]
            random = average_partition_entropy(shuffled, queries)
            share = 0.1 if level == 0 else 0.5
            assert got <= target + share * (random - target), (level, got, target, random)
