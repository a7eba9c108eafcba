"""Train methods on one split and evaluate each on its test users: what ``genret compare`` and
``genret train`` print. Generative methods are evaluated through their exported bundle
(:class:`training.bundle_recommender.BundleRecommender`), which also counts the candidates they
scored; SASRec in faiss IVF is then measured at that budget (:mod:`training.frontier`).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.bundle_recommender import BundleRecommender
from training.evaluation import evaluate_recommender
from training.metrics import DEFAULT_KS
from training.registry import TrainContext, TrainedMethod, get_method

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
    metrics = evaluate_recommender(recommender, ctx.split.test, DEFAULT_KS)
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


def add_ivf_at_budget(ctx: TrainContext, results: list[MethodResult]) -> None:
    """For each generative method, SASRec-in-IVF Recall@20 at the candidates it scored (the same
    test users, history excluded; :mod:`training.frontier`). Skipped without faiss-cpu."""
    budgets = [r for r in results if r.candidates is not None]
    if not budgets:
        return
    if importlib.util.find_spec("faiss") is None:
        log.warning("faiss-cpu is not installed (pip install 'genret[bench]'): no IVF figures")
        return
    from training.frontier import ivf_at, sweep_ivf

    sasrec = ctx.sasrec()
    users = sasrec.encode(ctx.split.test.histories)  # [U, D]
    points, _ = sweep_ivf(sasrec.item_embeddings(), users, ctx.split.test, 0.0, seed=ctx.seed)
    for r in budgets:
        assert r.candidates is not None
        r.ivf_recall_at_budget = ivf_at(points, r.candidates)


def run_compare(ctx: TrainContext, methods: list[str]) -> list[MethodResult]:
    results = [train_and_evaluate(ctx, method)[1] for method in methods]
    add_ivf_at_budget(ctx, results)
    return results
