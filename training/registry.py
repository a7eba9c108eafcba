"""Retrieval methods by name, for `genret compare` and `genret train`.

A method module calls :func:`register_method` at import time; :data:`METHOD_MODULES` says which
module holds which name so that only the methods asked for are imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.data import Dataset
    from training.evaluation import Recommender
    from training.methods.sasrec.model import SASRec
    from training.splits import Split

METHOD_MODULES: dict[str, str] = {
    "popular": "training.methods.popular",
    "sasrec": "training.methods.sasrec.cache",
    "uri": "training.methods.uri.train",
    "seater": "training.methods.seater.train",
    "tdr": "training.methods.tdr.train",
}
DATA_PARALLEL_METHODS: frozenset[str] = frozenset({"sasrec", "uri", "seater", "tdr"})
"""Methods whose trainers shard their data over the ranks of a torchrun job (each rank steps a
DDP-wrapped training module on its share; rank 0 evaluates, decides and exports)."""


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
    _sasrec: SASRec | None = None
    """The SASRec of this split once trained (:func:`training.methods.sasrec.cache.sasrec_for`)."""


TrainFn = Callable[[TrainContext], TrainedMethod]
_METHODS: dict[str, TrainFn] = {}


def register_method(name: str, train: TrainFn) -> None:
    _METHODS[name] = train


def get_method(name: str) -> TrainFn:
    if name not in _METHODS:
        module = METHOD_MODULES.get(name)
        if module is None:
            raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHOD_MODULES))}")
        importlib.import_module(module)
    return _METHODS[name]
