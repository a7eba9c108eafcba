"""Train methods on one split and evaluate each on its test users: what ``genret compare`` and
``genret train`` print. Generative methods are evaluated through their exported bundle
(:class:`training.bundle_recommender.BundleRecommender`), which also counts the candidates they
scored; SASRec in faiss IVF is then measured at that budget (:mod:`training.frontier`).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.bundle_recommender import BundleRecommender
from training.context import TrainContext, TrainedMethod
from training.evaluation import evaluate_recommender
from training.methods.sasrec.cache import sasrec_for
from training.metrics import evaluate_ranking, split_ks
from training.registry import get_method
from training.splits import EvalSet

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    method: str
    metrics: dict[str, float]
    train_seconds: float
    eval_seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    bundle_dir: Path | None = None
    candidates: float | None = None  # generative methods: mean items scored per test user (before exclusion)
    ivf_recall_at_budget: float | None = None  # SASRec in faiss IVF, Recall@20 at those candidates
    ivf_at_budget: dict[str, float] = field(default_factory=dict)  # every test metric of IVF there


def train_and_evaluate(ctx: TrainContext, method: str) -> tuple[TrainedMethod, MethodResult]:
    """Train one method in ``ctx`` and evaluate it on the test users (history excluded)."""
    train_fn = get_method(method)
    start = time.perf_counter()
    trained = train_fn(ctx)
    train_seconds = time.perf_counter() - start
    recommender = trained.recommender
    if isinstance(recommender, BundleRecommender):  # count the test evaluation's candidates only
        recommender.scored = recommender.queries = 0
    start = time.perf_counter()
    metrics = evaluate_recommender(recommender, ctx.split.test, split_ks(ctx.split.kind))
    eval_seconds = time.perf_counter() - start
    log.info(
        "%s: test recall@20 %.4f (train %.1fs, eval %.1fs)",
        method,
        metrics["recall@20"],
        train_seconds,
        eval_seconds,
    )
    result = MethodResult(
        method, metrics, train_seconds, eval_seconds, dict(trained.info), trained.bundle_dir
    )
    if isinstance(recommender, BundleRecommender):
        result.candidates = recommender.mean_candidates
    return trained, result


def ivf_sweep_metrics(
    item_emb: np.ndarray, users: np.ndarray, evalset: EvalSet, ks: Sequence[int], seed: int
) -> list[tuple[float, dict[str, float]]]:
    """SASRec vectors in faiss IVF over the nprobe sweep: ``(candidates, test metrics at ks)`` per
    point, each user's :meth:`EvalSet.excluded` items left out (:mod:`training.ivf`)."""
    from training.ivf import IvfIndex, nprobe_sweep

    index = IvfIndex(item_emb, seed=seed)
    points = []
    for nprobe in nprobe_sweep(index.nlist):
        result = index.search(users, max(ks), nprobe, evalset.excluded())
        points.append((float(result.num_scored.mean()), evaluate_ranking(result.items, evalset.targets, ks)))
    return points


def add_ivf_at_budget(ctx: TrainContext, results: list[MethodResult]) -> None:
    """For each generative method, SASRec in IVF at the candidates it scored: every test metric of
    the split's cut-offs (the same test users and exclusions), interpolated in log(candidates)
    between nprobe points (:func:`training.ivf.interpolate_at`). Skipped without faiss-cpu."""
    budgets = [r for r in results if r.candidates is not None]
    if not budgets:
        return
    if importlib.util.find_spec("faiss") is None:
        log.warning("faiss-cpu is not installed (pip install 'genret[bench]'): no IVF figures")
        return
    from training.ivf import interpolate_at

    sasrec = sasrec_for(ctx)
    users = sasrec.encode(ctx.split.test.histories)  # [U, D]
    ks = split_ks(ctx.split.kind)
    points = ivf_sweep_metrics(sasrec.item_embeddings(), users, ctx.split.test, ks, ctx.seed)
    cands = [c for c, _ in points]
    for r in budgets:
        assert r.candidates is not None
        r.ivf_at_budget = {
            name: interpolate_at(cands, [m[name] for _, m in points], r.candidates) for name in points[0][1]
        }
        r.ivf_recall_at_budget = r.ivf_at_budget["recall@20"]


def run_compare(ctx: TrainContext, methods: list[str]) -> list[MethodResult]:
    results = [train_and_evaluate(ctx, method)[1] for method in methods]
    add_ivf_at_budget(ctx, results)
    return results
