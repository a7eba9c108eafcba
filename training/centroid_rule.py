"""The rule that sets a bundle's ``leaf_centroid_weights`` (:mod:`models.search.centroid_term`) on
validation users.

The beam scores a child ``c`` at level ``l`` by the decoder's logit plus ``w_l * (query ·
centroid[c])``. ``w_l = m * s_l``: ``s_l = std(logits) / std(query · centroid)`` over the validation
users' level-``l`` candidates without the term, so that a multiple ``m`` means the same on every
bundle whatever the two scores' scales. ``m`` is chosen as the path-weight rule chooses its weight
(:func:`training.path_weight.guarded_best`): the best validation Recall@k through the bundle (the
beam the service would use, the bundle's ``path_weight`` in the rerank) among the grid points that
gain at least 2 standard errors of the paired per-user difference over ``m = 0``; ``m = 0`` (no
term, no centroids held by a replica) is the default, and ties keep the smaller ``m``. Unlike the path-score rule, each grid point is a new beam search, so the grid
is short; past :data:`MAX_USERS` users the rule reads a random sample (a dataset's first users are
not a fair one). The choice and the figures behind it go into the manifest's ``config``
(``leaf_centroid_weights``, ``leaf_centroid_rule``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.bundle.bundle import load_bundle
from models.bundle.manifest import CENTROID_WEIGHTS
from models.search.centroid_term import CentroidTerm, node_centroids
from models.search.rerank import Candidates
from models.search.retriever import Retriever
from training.export.writer import record_config
from training.metrics import per_user_recall
from training.path_weight import guarded_best, ranked_at, validation_candidates
from training.splits import EvalSet

log = logging.getLogger(__name__)

MULTIPLES: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
"""The grid, in units of the per-level ``s_l``."""
MAX_USERS = 30_000
"""Validation users the rule reads, drawn at random (seed 0) when there are more: every
leave-one-out user of Beauty and Yelp. The gains it looks for are small, and a smaller sample can
leave a real one under the guard (docs/results.md, "The centroid term served")."""


@dataclass(frozen=True)
class CollectingTerm(CentroidTerm):
    """A term of weight 0 that keeps, per level, the real candidates' logits and centroid scores."""

    seen: dict[int, tuple[list[Tensor], list[Tensor]]] = field(default_factory=dict)

    def fused(
        self, scores: Tensor, query: Tensor, beam_query: Tensor, prefix: Tensor, candidates: Tensor
    ) -> Tensor:
        real = candidates >= 0  # [Bb, C]
        near = self.near(query, beam_query, candidates)  # [Bb, C]
        logits, nears = self.seen.setdefault(prefix.shape[1], ([], []))
        logits.append(scores[real].double())
        nears.append(near[real].double())
        return scores


@dataclass(frozen=True)
class CentroidChoice:
    weights: list[float]  # the chosen leaf_centroid_weights, one per level (all 0: no term)
    multiple: float  # the chosen grid point
    scales: list[float]  # s_l per level
    metric: str  # e.g. "recall@20"
    users: int
    valid: dict[str, float]  # grid point -> validation metric
    z: dict[str, float]  # grid point -> its gain over m = 0 / the gain's standard error

    def as_config(self) -> dict[str, Any]:
        return {CENTROID_WEIGHTS: self.weights, "leaf_centroid_rule": asdict(self)}


def sample_users(evalset: EvalSet, n: int, seed: int = 0) -> EvalSet:
    """``n`` users of ``evalset`` drawn at random (all of them when it has no more), in their order."""
    if n >= len(evalset):
        return evalset
    rows = np.sort(np.random.default_rng(seed).choice(len(evalset), n, replace=False))
    seen = None if evalset.seen is None else [evalset.seen[i] for i in rows]
    return EvalSet(
        [evalset.user_ids[i] for i in rows],
        [evalset.histories[i] for i in rows],
        [evalset.targets[i] for i in rows],
        seen,
    )


def level_scales(seen: dict[int, tuple[list[Tensor], list[Tensor]]], levels: int) -> list[float]:
    """``s_l = std(logits) / std(centroid scores)`` per level ``1..levels`` (0 where either is flat)."""
    scales = []
    for level in range(1, levels + 1):
        logits, nears = seen.get(level, ([], []))
        if not logits:
            scales.append(0.0)
            continue
        a, b = torch.cat(logits), torch.cat(nears)
        ok = torch.isfinite(a) & torch.isfinite(b)
        a, b = a[ok], b[ok]
        flat = a.numel() < 2 or float(a.std()) == 0.0 or float(b.std()) == 0.0
        scales.append(0.0 if flat else float(a.std() / b.std()))
    return scales


@dataclass(frozen=True)
class Baseline:
    """What a grid of multiples is measured against: the bundle's centroids ``[num_nodes, Dr]``,
    the per-level scales ``s_l`` and the validation candidates without the term."""

    centroids: Tensor
    scales: list[float]
    batches: list[tuple[list[int], Candidates]]

    def weights(self, multiple: float) -> list[float]:
        """``leaf_centroid_weights`` at ``multiple``: ``multiple x s_l`` per level ``1..L``."""
        return [multiple * s for s in self.scales]

    def term(self, multiple: float) -> CentroidTerm | None:
        """The term at ``multiple`` x the scales (None at 0 or flat scales: the decoder alone)."""
        if not multiple or not any(self.scales):
            return None
        weights = [0.0, *self.weights(multiple)]
        return CentroidTerm(self.centroids, torch.tensor(weights, device=self.centroids.device))


def baseline(retriever: Retriever, users: EvalSet, k: int) -> Baseline:
    """``users``' candidates through ``retriever`` without the term, and the scales measured on
    them (:func:`level_scales`); ``retriever`` is left without a term."""
    levels = retriever.trie.levels
    centroids = torch.from_numpy(node_centroids(retriever.bundle.index, retriever.bundle.item_emb))
    collecting = CollectingTerm(
        centroids.to(retriever.device), torch.zeros(levels + 1, device=retriever.device)
    )
    retriever.centroid_term = collecting
    batches = validation_candidates(retriever, users, k)
    retriever.centroid_term = None
    return Baseline(collecting.centroids, level_scales(collecting.seen, levels), batches)


def choose_centroid_weights(retriever: Retriever, evalset: EvalSet, k: int = 20) -> CentroidChoice:
    """The rule (module docstring) on up to :data:`MAX_USERS` users of ``evalset``; leaves
    ``retriever`` serving the chosen term."""
    levels = retriever.trie.levels
    users = sample_users(evalset, MAX_USERS)
    if len(users) == 0:
        return CentroidChoice([0.0] * levels, 0.0, [0.0] * levels, f"recall@{k}", 0, {}, {})
    base = baseline(retriever, users, k)

    def recall_of(found: list[Any]) -> np.ndarray:
        return per_user_recall(ranked_at(found, len(users), k, retriever.path_weight), users.targets, k)

    recalls = {0.0: recall_of(base.batches)}
    for m in MULTIPLES[1:] if any(base.scales) else ():
        retriever.centroid_term = base.term(m)
        recalls[m] = recall_of(validation_candidates(retriever, users, k))
    best, valid, z = guarded_best(recalls)
    retriever.centroid_term = base.term(best)
    return CentroidChoice(base.weights(best), best, base.scales, f"recall@{k}", len(users), valid, z)


def tune_centroid_weights(
    bundle_dir: Path, evalset: EvalSet, k: int = 20, retriever: Retriever | None = None
) -> CentroidChoice:
    """Choose the bundle's ``leaf_centroid_weights`` on ``evalset`` (validation users) and write
    them into its manifest (after its ``path_weight``, which the rule's rerank reads: ``retriever``
    of that bundle serving it, or the bundle loaded again when None)."""
    retriever = Retriever(load_bundle(bundle_dir)) if retriever is None else retriever
    choice = choose_centroid_weights(retriever, evalset, k)
    record_config(bundle_dir, choice.as_config())
    log.info(
        "%s: leaf_centroid_weights %s (%g x scales %s); validation %s by multiple: %s (z %s)",
        bundle_dir,
        [round(w, 4) for w in choice.weights],
        choice.multiple,
        [round(s, 4) for s in choice.scales],
        choice.metric,
        choice.valid,
        choice.z,
    )
    return choice
