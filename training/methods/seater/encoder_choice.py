"""The rule behind ``query_encoder: auto``: which of two trained SEATER bundles serves.

SEATER's decoder reads either its own encoder's states (the paper) or a frozen copy of the split's
SASRec's states. Which is better depends on the data and on who is served: SASRec was trained on
the training users' sequences, so its states are most familiar where the served users are those
same users (leave-one-out) and can mislead the decoder on users it never saw (docs/results.md,
"SEATER's decoder on the SASRec states"). The rule measures instead of guessing: both bundles answer
the validation users the way the service would, and the SASRec-memory bundle serves only if its
Recall@k beats the own encoder's by at least :data:`~training.path_weight.MIN_Z` standard errors of
the paired per-user difference (the path-weight rule's guard); otherwise the paper's own encoder.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.bundle_recommender import BundleRecommender
from training.metrics import per_user_recall
from training.path_weight import MAX_USERS, MIN_Z, gain_z
from training.splits import EvalSet

log = logging.getLogger(__name__)

BASELINE = "own"
CHALLENGER = "sasrec"


@dataclass(frozen=True)
class EncoderChoice:
    chosen: str  # "own" or "sasrec"
    metric: str  # e.g. "recall@20"
    users: int
    valid: dict[str, float]  # encoder -> validation metric of its bundle
    z: float  # the challenger's paired gain over the baseline / the gain's standard error

    def as_config(self) -> dict[str, Any]:
        return {"query_encoder_rule": asdict(self)}


def validation_recall(bundle_dir: Path, evalset: EvalSet, k: int) -> np.ndarray:
    """``[users with a target]`` per-user Recall@k of ``bundle_dir`` as served (its own beam and
    path weight, history excluded)."""
    ranked = BundleRecommender(bundle_dir).recommend(evalset.histories, k, evalset.excluded())
    return per_user_recall(ranked, evalset.targets, k)


def guarded_pick(baseline: np.ndarray, challenger: np.ndarray) -> tuple[str, float]:
    """Per-user recalls of the two bundles on the same users -> the encoder that serves and the
    challenger's paired z over the baseline."""
    z = round(gain_z(challenger, baseline), 2)
    return (CHALLENGER if z >= MIN_Z and challenger.mean() > baseline.mean() else BASELINE), z


def choose_query_encoder(bundles: dict[str, Path], evalset: EvalSet, k: int = 20) -> EncoderChoice:
    """The rule (module docstring) on the first :data:`MAX_USERS` users of ``evalset``.

    ``bundles`` maps ``"own"`` and ``"sasrec"`` to their exported, fusion-tuned bundles.
    """
    users = evalset.head(MAX_USERS)
    if len(users) == 0:  # nothing to measure on: the paper's encoder
        return EncoderChoice(BASELINE, f"recall@{k}", 0, {}, 0.0)
    recalls = {name: validation_recall(bundles[name], users, k) for name in (BASELINE, CHALLENGER)}
    chosen, z = guarded_pick(recalls[BASELINE], recalls[CHALLENGER])
    valid = {name: round(float(r.mean()), 5) for name, r in recalls.items()}
    log.info("seater query encoder: %s (validation recall@%d %s, z %.2f)", chosen, k, valid, z)
    return EncoderChoice(chosen, f"recall@{k}", len(recalls[BASELINE]), valid, z)
