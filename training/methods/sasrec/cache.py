"""Baselines: most-popular items, and SASRec trained with early stopping and cached on disk.

``train_sasrec(ctx)`` caches its weights under ``<cache root>/sasrec/<key>/`` where the key hashes
the dataset fingerprint, the split (kind, seed, max_len), the seed and the config, so that every
method and every compare run on the same data and split reuses one training. The cache root is
``config_overrides["cache_dir"]``, else ``$GENRET_CACHE_DIR``, else ``runs/cache`` in the repository.

Config overrides (``genret train --set key=value``, ``TrainContext.config_overrides``):
``sasrec.<field>`` for any :class:`~training.methods.sasrec.model.SASRecConfig` field, ``max_epochs`` as a
shorthand every method honours, ``sasrec.cache=false`` to train without the cache.

Under ``torchrun`` (:func:`training.distributed.current` distributed) every rank trains with DDP on
its shard of the training windows, rank 0 evaluates and decides early stopping for all, and only
rank 0 writes the cache. The world size joins the cache key when it is above 1 (a data-parallel
run takes other steps), so single-process keys are unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import distributed
from training.distributed import DistContext
from training.evaluation import evaluate_recommender
from training.methods.sasrec.model import SASRec, SASRecConfig, SASRecModule, top_k_excluding
from training.registry import TrainContext, TrainedMethod, register_method
from training.splits import Split

log = logging.getLogger(__name__)

CACHE_VERSION = 2
RUN_CONTROL_FIELDS: frozenset[str] = frozenset({"threads", "max_train_seconds"})  # not in the cache key
EARLY_STOP_METRIC = "recall@20"
_C = TypeVar("_C")


# --------------------------------------------------------------------------------------------
# Config overrides


def _coerce(name: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{name}: expected a boolean, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if isinstance(default, int):
        number = float(value)
        if not number.is_integer():
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(number)
    if isinstance(default, float):
        return float(value)
    return str(value)


def config_with_overrides(config: _C, overrides: dict[str, Any], prefix: str) -> _C:
    """``config`` with the ``<prefix>.<field>`` entries of ``overrides`` applied (typed like the defaults).

    A ``max_epochs`` key applies to a config with a ``max_epochs`` field unless the prefixed key is
    also given. Unknown ``<prefix>.`` fields raise ``ValueError`` listing the known ones.
    """
    assert dataclasses.is_dataclass(config) and not isinstance(config, type)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    if "max_epochs" in overrides and "max_epochs" in fields:
        changes["max_epochs"] = _coerce("max_epochs", fields["max_epochs"], overrides["max_epochs"])
    for key, value in overrides.items():
        if not key.startswith(prefix + "."):
            continue
        name = key[len(prefix) + 1 :]
        if name not in fields:
            raise ValueError(f"unknown setting {key!r}; known: {', '.join(f'{prefix}.{f}' for f in fields)}")
        changes[name] = _coerce(key, fields[name], value)
    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------------------------
# Popularity


class Popularity:
    """Recommends the most frequent training items not in the history."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = np.asarray(counts, dtype=np.float64)  # [N+1], counts[0] = 0

    @classmethod
    def fit(cls, split: Split) -> Popularity:
        items = np.concatenate([*split.train, np.zeros(0, dtype=np.int64)])
        counts = np.bincount(items, minlength=split.num_items + 1).astype(np.float64)
        counts[0] = 0.0
        return cls(counts)

    def recommend(self, histories: list[np.ndarray], k: int, exclude: list[np.ndarray] | None) -> np.ndarray:
        scores = torch.from_numpy(self.counts).float().expand(len(histories), -1)  # [B, N+1]
        return top_k_excluding(scores, k, exclude)


def train_popular(ctx: TrainContext) -> TrainedMethod:
    start = time.perf_counter()
    model = Popularity.fit(ctx.split)
    return TrainedMethod(recommender=model, info={"train_seconds": time.perf_counter() - start})


# --------------------------------------------------------------------------------------------
# SASRec training


def training_chunks(sequences: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut sequences into windows of at most ``max_len + 1`` items so each item is a target once.

    Returns ``inputs [C, max_len]`` and ``targets [C, max_len]`` (left-padded with 0): position
    ``t`` of a window predicts ``targets[t]`` from ``inputs[..t]``.
    """
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            window = np.asarray(seq[start:end], dtype=np.int64)
            inp = np.zeros(max_len, dtype=np.int64)
            tgt = np.zeros(max_len, dtype=np.int64)
            inp[max_len - len(window) + 1 :] = window[:-1]
            tgt[max_len - len(window) + 1 :] = window[1:]
            inputs.append(inp)
            targets.append(tgt)
            end = start + 1
    if not inputs:
        raise ValueError("no training sequence has two or more items")
    return np.stack(inputs), np.stack(targets)


def _epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of chunk indices; chunks of similar length share a batch (less padding)."""
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    block = 50 * batch_size
    for s in range(0, len(order), block):
        part = order[s : s + block]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _loss(
    module: SASRecModule,
    net: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: SASRecConfig,
    log_q: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Next-item cross-entropy over ``inputs/targets [B, L]`` (0 = padding).

    ``net`` runs the forward pass: ``module`` itself, or its DDP wrapper under torchrun.
    """
    hidden = net(inputs)  # [B, L, D]
    mask = targets > 0
    h = hidden[mask]  # [P, D]
    pos = targets[mask]  # [P]
    emb = module.item_emb.weight  # [N+1, D]
    if config.loss == "full":
        return F.cross_entropy(module.item_logits(h), pos)
    if config.negatives == "in_batch":
        logits = h @ emb[pos].T - log_q[pos][None, :]  # [P, P], log-q corrected
        same = pos[None, :] == pos[:, None]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))  # other rows' copies of the positive
        return F.cross_entropy(logits, torch.arange(len(pos)))
    num_items = emb.shape[0] - 1
    neg = torch.randint(1, num_items + 1, (config.num_negatives,), generator=generator)  # [M]
    pos_logit = (h * emb[pos]).sum(-1, keepdim=True)  # [P, 1]
    neg_logit = (h @ emb[neg].T).masked_fill(neg[None, :] == pos[:, None], float("-inf"))  # [P, M]
    correction = math.log(config.num_negatives / num_items)  # uniform q: the same for every candidate
    logits = torch.cat([pos_logit, neg_logit], dim=1) - correction  # [P, 1+M]
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long))


def fit_sasrec(split: Split, config: SASRecConfig, seed: int = 0, dist: DistContext | None = None) -> SASRec:
    """Train SASRec on ``split.train`` with early stopping on validation Recall@20.

    ``dist`` (default :func:`training.distributed.current`): under torchrun each rank trains on
    its shard of the windows with DDP; rank 0 evaluates and broadcasts its decisions, so every
    rank ends with the same best weights.
    """
    dist = distributed.current() if dist is None else dist
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _fit_sasrec(split, config, seed, dist)
    finally:
        torch.set_num_threads(threads)


def _fit_sasrec(split: Split, config: SASRecConfig, seed: int, dist: DistContext) -> SASRec:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + dist.rank)
    generator = torch.Generator().manual_seed(seed + dist.rank)
    all_inputs, all_targets = training_chunks(split.train, split.max_len)  # [C, T] each
    freq = torch.bincount(torch.from_numpy(all_targets[all_targets > 0]), minlength=split.num_items + 1)
    freq = freq.float() + 1.0
    log_q = torch.log(freq / freq.sum())  # [N+1] in-batch sampling log-probability (all windows)
    shard = dist.shard_indices(len(all_inputs)) if dist.is_distributed else slice(None)
    inputs_np, targets_np = all_inputs[shard], all_targets[shard]  # [C_r, T] this rank's windows
    lengths = (inputs_np > 0).sum(axis=1) + 1
    inputs, targets = torch.from_numpy(inputs_np), torch.from_numpy(targets_np)
    module = SASRecModule(split.num_items, split.max_len, config)  # the same weights on every rank
    net = dist.wrap(module)
    if dist.is_distributed:
        torch.manual_seed(seed + dist.rank)  # other dropout masks on each rank
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model = SASRec(module, config)
    log.info(
        "SASRec: %d training windows (%d targets)%s, %d items, %s loss",
        len(inputs),
        int((targets > 0).sum()),
        f" on rank {dist.rank} of {dist.world_size}" if dist.is_distributed else "",
        split.num_items,
        config.loss,
    )
    start = time.perf_counter()
    best_metric, best_epoch, best_state = -1.0, 0, copy.deepcopy(module.state_dict())
    best_valid: dict[str, float] = {}
    epoch, stopped = 0, "max_epochs"
    for epoch in range(1, config.max_epochs + 1):
        net.train()
        batches = _epoch_batches(lengths, config.batch_size, rng)
        total, steps = 0.0, 0
        bar = tqdm(batches, desc=f"sasrec epoch {epoch}", leave=False, disable=None)
        for idx in bar:
            width = int(lengths[idx].max()) - 1
            batch_in = inputs[torch.from_numpy(idx), -width:]  # [B, L]
            batch_tgt = targets[torch.from_numpy(idx), -width:]  # [B, L]
            loss = _loss(module, net, batch_in, batch_tgt, config, log_q, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
            bar.set_postfix(loss=f"{total / steps:.4f}")
        module.eval()
        mean_loss = float(dist.all_reduce_mean(torch.tensor(total / max(1, steps))))
        valid: dict[str, float] = {}
        if dist.is_main:  # the others wait in the broadcast below
            valid = evaluate_recommender(model, split.valid, (20,), limit=config.eval_users)
        valid = dist.broadcast(valid)
        metric = valid[EARLY_STOP_METRIC]
        improved = metric > best_metric
        if improved:
            best_metric, best_epoch, best_valid = metric, epoch, valid
            best_state = copy.deepcopy(module.state_dict())
        log.info(
            "sasrec epoch %d: loss %.4f, valid recall@20 %.4f ndcg@20 %.4f%s (%.0fs)",
            epoch,
            mean_loss,
            metric,
            valid["ndcg@20"],
            " *" if improved else "",
            time.perf_counter() - start,
        )
        if epoch - best_epoch >= config.patience:
            stopped = "early stopping"
            break
        out_of_time = (
            bool(config.max_train_seconds) and time.perf_counter() - start > config.max_train_seconds
        )
        if dist.broadcast(out_of_time):  # rank 0's clock decides for all
            stopped = f"time budget {config.max_train_seconds:.0f}s"
            log.warning("SASRec: stopping at the time budget (%s); best epoch %d", stopped, best_epoch)
            break
    module.load_state_dict(best_state)
    module.eval()
    info = {
        "train_seconds": time.perf_counter() - start,
        "epochs": epoch,
        "best_epoch": best_epoch,
        "stopped": stopped,
        **{f"valid_{k}": v for k, v in best_valid.items()},
    }
    if dist.is_distributed:
        info["world_size"] = dist.world_size
    log.info("SASRec: best epoch %d, valid recall@20 %.4f", best_epoch, best_metric)
    return SASRec(module, config, info)


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
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in RUN_CONTROL_FIELDS},
    }
    if world_size > 1:  # absent for one process, so that single-process keys stay what they were
        material["world_size"] = world_size
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def sasrec_config(overrides: dict[str, Any]) -> SASRecConfig:
    return config_with_overrides(
        SASRecConfig(), {k: v for k, v in overrides.items() if k != "sasrec.cache"}, "sasrec"
    )


def train_sasrec(ctx: TrainContext) -> SASRec:
    """SASRec for this context: loaded from the disk cache, or trained and then cached.

    Under torchrun rank 0 decides whether the cache is usable (every rank then loads it, or every
    rank trains: the collective steps must match) and only rank 0 writes it.
    """
    dist = distributed.current()
    config = sasrec_config(ctx.config_overrides)
    use_cache = _coerce("sasrec.cache", True, ctx.config_overrides.get("sasrec.cache", True))
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


def train_sasrec_method(ctx: TrainContext) -> TrainedMethod:
    model = ctx.sasrec()
    return TrainedMethod(recommender=model, info=dict(model.info))


register_method("popular", train_popular)
register_method("sasrec", train_sasrec_method)
