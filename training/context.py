"""What every method trains with and returns: the context (data, split, seed, work directory,
config overrides) and the trained method (a recommender, its bundle). Method packages import this
module, never :mod:`training.registry` (which loads them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.data import Dataset
    from training.evaluation import Recommender
    from training.splits import Split


@dataclass
class TrainedMethod:
    recommender: Recommender
    bundle_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainContext:
    dataset: Dataset
    split: Split
    seed: int
    workdir: Path
    config_overrides: dict[str, Any] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)
    """What is computed once per context and shared by the methods trained in it: ``"sasrec"``, the
    split's SASRec (:func:`training.methods.sasrec.cache.sasrec_for`)."""


TrainFn = Callable[[TrainContext], TrainedMethod]
