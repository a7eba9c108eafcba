"""SASRec trained once per data set, split, seed and config, and cached on disk.

``train_sasrec(ctx)`` caches its weights under ``<cache root>/sasrec/<key>/`` where the key hashes
the dataset fingerprint, the split (kind, seed, max_len), the seed and the config, so that every
method and every compare run on the same data and split reuses one training. The cache root is
``config_overrides["cache_dir"]``, else ``$GENRET_CACHE_DIR``, else ``runs/cache`` in the repository.
``sasrec.cache=false`` trains without the cache; the other overrides follow :mod:`training.config`.

Under ``torchrun`` rank 0 decides whether the cache is usable and only rank 0 writes it. The world
size joins the cache key when it is above 1 (a data-parallel run takes other steps), so
single-process keys are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from training import distributed
from training.config import coerce
from training.context import TrainContext, TrainedMethod
from training.methods.sasrec.config import SASRecConfig
from training.methods.sasrec.model import SASRec
from training.methods.sasrec.train import fit_sasrec
from training.splits import Split

log = logging.getLogger(__name__)

CACHE_VERSION = 2
RUN_CONTROL_FIELDS: frozenset[str] = frozenset({"threads", "max_train_seconds", "device"})
"""Not in the cache key: how and where a run trains, not what it trains."""
RULE_FIELDS: frozenset[str] = frozenset({"sparse_dropout", "sparse_below"})
"""Not in the cache key either: :meth:`SASRecConfig.for_data` resolves them into ``dropout``."""
KEY_OMITTED_AT: dict[str, object] = {"ffn_mult": 1}
"""Fields added after CACHE_VERSION 2, left out of the key at the value that reproduces the model
trained before they existed, so that the keys (and cached models) from before stay valid."""


# --------------------------------------------------------------------------------------------
# The disk cache


def cache_root(overrides: dict[str, Any] | None = None) -> Path:
    """Where cached models live (see the module docstring)."""
    if overrides and overrides.get("cache_dir"):
        return Path(str(overrides["cache_dir"]))
    env = os.environ.get("GENRET_CACHE_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    base = repo if (repo / "pyproject.toml").is_file() else Path.cwd()
    return base / "runs" / "cache"


def sasrec_cache_key(
    dataset_fingerprint: str, split: Split, seed: int, config: SASRecConfig, world_size: int = 1
) -> str:
    material: dict[str, Any] = {
        "version": CACHE_VERSION,
        "dataset": dataset_fingerprint,
        "split": {"kind": split.kind, "seed": split.seed, "max_len": split.max_len},
        "seed": seed,
        "config": {
            k: v
            for k, v in dataclasses.asdict(config).items()
            if k not in RUN_CONTROL_FIELDS | RULE_FIELDS
            and not (k in KEY_OMITTED_AT and KEY_OMITTED_AT[k] == v)
        },
    }
    if world_size > 1:  # absent for one process, so that single-process keys stay what they were
        material["world_size"] = world_size
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def sasrec_config(overrides: dict[str, Any], split: Split | None = None) -> SASRecConfig:
    """The config from the YAML and ``overrides``, resolved for ``split``'s density (the dropout
    rule of :meth:`SASRecConfig.for_data`) when one is given."""
    config = SASRecConfig.load(overrides)
    if split is None:
        return config
    explicit = "sasrec.dropout" in overrides or "dropout" in overrides
    return config.for_data(interactions_per_item(split), explicit_dropout=explicit)


def interactions_per_item(split: Split) -> float:
    """Training interactions per catalogue item (the data density the dropout rule reads)."""
    return sum(len(s) for s in split.train) / max(1, split.num_items)


def train_sasrec(ctx: TrainContext) -> SASRec:
    """SASRec for this context: loaded from the disk cache, or trained and then cached.

    Under torchrun rank 0 decides whether the cache is usable (every rank then loads it, or every
    rank trains: the collective steps must match) and only rank 0 writes it.
    """
    dist = distributed.current()
    config = sasrec_config(ctx.config_overrides, ctx.split)
    use_cache = coerce("sasrec.cache", ctx.config_overrides.get("sasrec.cache", True), True)
    key = sasrec_cache_key(ctx.dataset.fingerprint(), ctx.split, ctx.seed, config, dist.world_size)
    directory = cache_root(ctx.config_overrides) / "sasrec" / key
    model: SASRec | None = None
    if use_cache and directory.is_dir() and dist.is_main:
        model = _load_cached(directory)
    if dist.broadcast(model is not None) and model is None:  # another rank: rank 0 read the cache
        model = _load_cached(directory)
        if model is None:
            raise RuntimeError(f"rank {dist.rank}: cannot read the SASRec cache {directory} that rank 0 read")
    if model is not None:
        log.info("SASRec: loaded from cache %s", directory)
        model.info["cached"] = True
        model.info["cache_dir"] = str(directory)
        return model
    model = fit_sasrec(ctx.split, config, ctx.seed, dist)
    if use_cache and dist.is_main:
        tmp = directory.with_name(f"{key}.tmp{os.getpid()}")
        model.info["cache_key"] = key
        model.save(tmp)
        if directory.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(directory)
        log.info("SASRec: cached at %s", directory)
    model.info["cached"] = False
    model.info["cache_dir"] = str(directory) if use_cache else None
    return model


def _load_cached(directory: Path) -> SASRec | None:
    try:
        return SASRec.load(directory)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        log.warning("SASRec cache %s unreadable (%s); retraining", directory, exc)
        return None


def sasrec_for(ctx: TrainContext) -> SASRec:
    """The trained SASRec baseline of ``ctx``'s split, trained (or loaded) once and memoised on it."""
    model = ctx.memo.get("sasrec")
    if not isinstance(model, SASRec):
        model = ctx.memo["sasrec"] = train_sasrec(ctx)
    return model


def train_sasrec_method(ctx: TrainContext) -> TrainedMethod:
    model = sasrec_for(ctx)
    return TrainedMethod(recommender=model, info=dict(model.info))
