"""One cold-start run (:func:`run_coldstart`): every step of :mod:`training.coldstart` for each
method, reusing a bundle trained before on the same data when one is there."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.bundle.bundle import load_bundle
from models.search.retriever import Retriever
from training.coldstart.holdout import add_held_out, hold_out_items, reduced_split
from training.coldstart.scoring import bundle_overall, catalogue_eval, cold_eval_sets, sasrec_new_items
from training.context import TrainContext
from training.data import Dataset
from training.methods.sasrec.cache import sasrec_for
from training.registry import check_overrides, get_method
from training.splits import make_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColdstartConfig:
    dataset: Dataset
    methods: tuple[str, ...]
    workdir: Path
    kind: str = "user"
    seed: int = 0
    max_len: int = 50
    share: float = 0.1
    overrides: dict[str, Any] = field(default_factory=dict)
    full_bundle_dir: Path | None = None  # <dir>/<method>: full-data bundles to reuse (same data set)


@dataclass
class MethodCold:
    method: str
    beam: int  # the bundle's default beam (widened per user)
    scores: dict[str, dict[str, float]]  # "new_items", "overall" on the catalogue with the items added
    full_overall: dict[str, float]  # the bundle trained on the full data, overall
    add: dict[str, Any]
    bundles: dict[str, str]  # "reduced", "full"
    train_seconds: float  # reduced bundle (0: reused)


@dataclass
class ColdstartResult:
    data: dict[str, Any]
    held_out: int
    sets: dict[str, int]
    sasrec_full_new: dict[str, float]
    methods: list[MethodCold]


def run_coldstart(cfg: ColdstartConfig) -> ColdstartResult:
    """Every step of the module docstring, for each method of ``cfg``."""
    check_overrides(cfg.overrides)
    full = cfg.dataset
    holdout = hold_out_items(full, cfg.share, cfg.seed)
    full_split = make_split(full, kind=cfg.kind, seed=cfg.seed, max_len=cfg.max_len)
    split = reduced_split(full_split, holdout)
    reduced = TrainContext(holdout.dataset, split, cfg.seed, cfg.workdir / "reduced", dict(cfg.overrides))
    full_ctx = TrainContext(full, full_split, cfg.seed, cfg.workdir / "full", dict(cfg.overrides))
    log.info("cold start: %d of %d items held out; %s", len(holdout.items), full.num_items, split.describe())
    rows, sets_stats = [], {}
    for method in cfg.methods:
        start = time.perf_counter()
        reduced_dir = trained_bundle(reduced, method, cfg.workdir / "bundles" / "reduced")
        train_seconds = time.perf_counter() - start
        bundle = load_bundle(reduced_dir)
        added = add_held_out(bundle, full, holdout)
        retriever = Retriever(bundle, "cpu", "onnx", intra_op_threads=1)
        sets = cold_eval_sets(full_split.test, full, holdout, added.catalogue, retriever.encoder_items)
        sets_stats = sets.stats
        scores = catalogue_eval(retriever.with_catalogue(added.catalogue), sets)
        full_dir = _reusable(cfg.full_bundle_dir, method, full) or trained_bundle(
            full_ctx, method, cfg.workdir / "bundles" / "full"
        )
        full_retriever = Retriever(load_bundle(full_dir), "cpu", "onnx", intra_op_threads=1)
        rows.append(
            MethodCold(
                method=method,
                beam=retriever.default_beam_size,
                scores=scores,
                full_overall=bundle_overall(full_retriever, full, full_split.test),
                add=added.summary(),
                bundles={"reduced": str(reduced_dir), "full": str(full_dir)},
                train_seconds=train_seconds,
            )
        )
        log.info("%s: %s", method, rows[-1])
    data = {"name": full.name, "items": full.num_items, "users": full.num_users, "split": cfg.kind}
    return ColdstartResult(
        data=data | {"seed": cfg.seed},
        held_out=len(holdout.items),
        sets=sets_stats,
        sasrec_full_new=sasrec_new_items(sasrec_for(full_ctx), full_split.test, holdout),
        methods=rows,
    )


def trained_bundle(ctx: TrainContext, method: str, store: Path) -> Path:
    """``store/<method>``: a bundle of ``method`` trained in ``ctx`` (reused when one for the same
    data set is already there, so an interrupted run resumes)."""
    out = store / method
    if _same_data(out, ctx.dataset):
        log.info("%s: reusing %s", method, out)
        return out
    trained = get_method(method)(ctx)
    if trained.bundle_dir is None:
        raise ValueError(f"method {method!r} writes no bundle: cold start needs a generative method")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(trained.bundle_dir, out)
    return out


def _reusable(directory: Path | None, method: str, ds: Dataset) -> Path | None:
    """``directory/<method>`` when it is a bundle of ``ds`` (TDR's rounds layout: its best round)."""
    if directory is None:
        return None
    path, rounds = directory / method, directory / method / "rounds.json"
    if rounds.is_file():
        best = max(json.loads(rounds.read_text()), key=lambda r: r["valid_recall@20"])
        path = path / Path(best["bundle"]).name
    if _same_data(path, ds):
        return path
    log.warning("%s: not a bundle of this data set; training the full-data bundle", path)
    return None


def _same_data(bundle_dir: Path, ds: Dataset) -> bool:
    m = bundle_dir / "manifest.json"
    return m.is_file() and json.loads(m.read_text()).get("dataset_fingerprint") == ds.fingerprint()
