"""The rule that sets a bundle's ``path_weight`` (:mod:`models.search.rerank`) on validation users.

The rerank scores ``query · item + w × path(leaf)``. ``w`` is chosen, once per bundle, as the
multiple of ``std(inner products) / std(path scores)`` (both over the validation users' candidates,
so the grid means the same on every method and dataset whatever the two scores' scales) whose
validation Recall@k through the bundle is highest, among the grid points whose gain over the plain
inner product is at least :data:`MIN_Z` standard errors of the paired per-user difference. 0 is the
default: a bundle whose decoder adds nothing, or a validation set too small to tell (MovieLens-100k's
943 users), keeps the plain inner product; ties go to the smaller weight. The candidates are those
the service would score (the same beam, widened per user as the service widens it), computed once;
each weight only re-sorts them. The choice and the figures behind it go into the manifest's
``config`` (``path_weight``, ``path_weight_rule``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle.bundle import load_bundle
from models.search.rerank import Candidates
from models.search.retriever import Retriever
from training.bundle_evaluation import beam_groups
from training.export.writer import record_config
from training.metrics import per_user_recall
from training.splits import EvalSet

log = logging.getLogger(__name__)

MULTIPLES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""The grid, in units of ``std(inner products) / std(path scores)``."""
MAX_USERS = 30_000
"""Validation users the rule reads (the first ones): every leave-one-out user of Beauty and Yelp."""
MIN_Z = 2.0
"""A weight must gain at least this many standard errors of the paired per-user difference."""


@dataclass(frozen=True)
class PathWeightChoice:
    weight: float  # the chosen path_weight (0: the plain inner product)
    multiple: float  # the chosen grid point
    scale: float  # std(inner products) / std(path scores) over the candidates
    metric: str  # e.g. "recall@20"
    users: int
    valid: dict[str, float]  # grid point -> validation metric
    z: dict[str, float]  # grid point -> its gain over the plain inner product / the gain's standard error

    def as_config(self) -> dict[str, Any]:
        return {"path_weight": self.weight, "path_weight_rule": asdict(self)}


def validation_candidates(
    retriever: Retriever, evalset: EvalSet, k: int, batch_size: int = 256
) -> list[tuple[list[int], Candidates]]:
    """``(rows, candidates)`` per batch: the items each user's beam reaches (history excluded), with
    their inner products and path scores, at the beam the service would use for ``k`` items."""
    excluded = evalset.excluded()
    counts = [len(np.unique(items)) for items in excluded]
    groups = beam_groups(retriever, k, retriever.default_beam_size, counts)
    out = []
    for beam, rows in groups.items():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            exclude = [np.asarray(excluded[i], np.int64) for i in chunk]
            states = retriever.encode([evalset.histories[i] for i in chunk])
            found = retriever.beam(states, beam, exclude)
            query = states.query.to(retriever.device, torch.float32)
            out.append((chunk, retriever.candidates(found, query, exclude)))
    return out


def score_scale(batches: list[tuple[list[int], Candidates]]) -> float:
    """``std(inner products) / std(path scores)`` over every valid candidate (0 if the paths are flat)."""
    if not batches:
        return 0.0
    ips = [c.ip[c.valid & torch.isfinite(c.path)] for _, c in batches]
    paths = [c.path[c.valid & torch.isfinite(c.path)] for _, c in batches]
    ip, path = torch.cat(ips).double(), torch.cat(paths).double()
    if path.numel() < 2 or float(path.std()) == 0.0:
        return 0.0
    return float(ip.std() / path.std())


def ranked_at(batches: list[tuple[list[int], Candidates]], n: int, k: int, weight: float) -> np.ndarray:
    """``[n, k]`` each user's top ``k`` candidates by the rerank score at ``weight`` (0 = none)."""
    ranked = np.zeros((n, k), np.int64)
    for rows, cands in batches:
        scores = cands.scores(weight)  # [B, C]
        kk = min(k, scores.shape[1])
        top = torch.topk(scores, kk, dim=1)
        items = cands.items.gather(1, top.indices).masked_fill(~torch.isfinite(top.values), 0)
        ranked[rows, :kk] = items.cpu().numpy()
    return ranked


def gain_z(recall: np.ndarray, base: np.ndarray) -> float:
    """The paired gain of per-user ``recall`` over ``base`` in standard errors (0 where they never differ)."""
    diff = recall - base
    se = float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return float(diff.mean()) / se if se > 0 else 0.0


def guarded_best(recalls: dict[float, np.ndarray]) -> tuple[float, dict[str, float], dict[str, float]]:
    """``recalls``: grid point (ascending, ``0.0`` first) -> per-user validation recall. The grid
    point with the highest mean among those whose paired gain over ``0.0`` is at least :data:`MIN_Z`
    standard errors (``0.0`` when none; a tie keeps the smaller), and each point's mean and z."""
    base = recalls[0.0]
    valid = {f"{m:g}": round(float(r.mean()), 5) if len(r) else 0.0 for m, r in recalls.items()}
    z = {f"{m:g}": round(gain_z(r, base), 2) for m, r in recalls.items()}
    best = 0.0
    for m, r in recalls.items():
        if z[f"{m:g}"] >= MIN_Z and r.mean() > recalls[best].mean():
            best = m
    return best, valid, z


def choose_path_weight(retriever: Retriever, evalset: EvalSet, k: int = 20) -> PathWeightChoice:
    """The rule (module docstring) on the first :data:`MAX_USERS` users of ``evalset``."""
    users = evalset.head(MAX_USERS)
    if len(users) == 0:  # nothing to choose on: the plain inner product
        return PathWeightChoice(0.0, 0.0, 0.0, f"recall@{k}", 0, {}, {})
    batches = validation_candidates(retriever, users, k)
    scale = score_scale(batches)
    recalls = {
        m: per_user_recall(ranked_at(batches, len(users), k, m * scale), users.targets, k)
        for m in MULTIPLES
        if scale > 0 or m == 0.0
    }
    best, valid, z = guarded_best(recalls)
    return PathWeightChoice(best * scale, best, scale, f"recall@{k}", len(users), valid, z)


def tune_path_weight(
    bundle_dir: Path, evalset: EvalSet, k: int = 20, retriever: Retriever | None = None
) -> PathWeightChoice:
    """Choose the bundle's ``path_weight`` on ``evalset`` (validation users) and write it into its
    manifest; ``retriever`` (of that bundle, loaded when None) is left serving the choice."""
    retriever = Retriever(load_bundle(bundle_dir)) if retriever is None else retriever
    choice = choose_path_weight(retriever, evalset, k)
    record_config(bundle_dir, choice.as_config())
    retriever.path_weight = choice.weight
    log.info(
        "%s: path_weight %.4g (%g x scale %.4g); validation %s by multiple: %s",
        bundle_dir,
        choice.weight,
        choice.multiple,
        choice.scale,
        choice.metric,
        choice.valid,
    )
    return choice
