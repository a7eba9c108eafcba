"""The two validation-user rules a trained bundle goes through before it serves, in their order.

First the rerank's ``path_weight`` (:mod:`training.path_weight`), then the beam's centroid term
(:mod:`training.centroid_rule`), whose own rerank reads the chosen ``path_weight``. Each writes
its choice into the bundle's manifest; a rule that is off leaves that part of the bundle at its
default (the plain inner product, no term).
"""

from __future__ import annotations

from pathlib import Path

from models.bundle.bundle import load_bundle
from models.search.retriever import Retriever
from training.centroid_rule import tune_centroid_weights
from training.path_weight import tune_path_weight
from training.splits import EvalSet


def tune_fusions(
    bundle_dir: Path, valid: EvalSet, *, path_score: bool, leaf_centroids: bool
) -> dict[str, float]:
    """Run the rules that are on for ``bundle_dir`` on ``valid`` users; returns the training info
    entries ``path_weight`` and ``leaf_centroid_multiple`` (0 for a rule that is off)."""
    info = {"path_weight": 0.0, "leaf_centroid_multiple": 0.0}
    if not (path_score or leaf_centroids):
        return info
    retriever = Retriever(load_bundle(bundle_dir))  # one load: the first rule leaves it serving its choice
    if path_score:
        info["path_weight"] = tune_path_weight(bundle_dir, valid, retriever=retriever).weight
    if leaf_centroids:
        info["leaf_centroid_multiple"] = tune_centroid_weights(
            bundle_dir, valid, retriever=retriever
        ).multiple
    return info
