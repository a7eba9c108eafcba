"""SASRec training on the trainer skeleton: length-bucketed windows, keep-best on validation Recall@20.

Under ``torchrun`` (:func:`training.distributed.current` distributed) every rank trains with DDP on
its shard of the training windows; rank 0 evaluates and its figures decide stopping for all.
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import numpy as np
import torch

from training import distributed
from training.distributed import DistContext
from training.evaluation import evaluate_recommender
from training.methods.sasrec.config import SASRecConfig
from training.methods.sasrec.losses import next_item_loss
from training.methods.sasrec.model import SASRec, SASRecModule
from training.splits import Split
from training.trainer import KeepBest, progress, run_epochs, seeded, torch_threads, training_device

log = logging.getLogger(__name__)

EARLY_STOP_METRIC = "recall@20"


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


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of chunk indices; chunks of similar length share a batch (less padding)."""
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    block = 50 * batch_size
    for s in range(0, len(order), block):
        part = order[s : s + block]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def fit_sasrec(split: Split, config: SASRecConfig, seed: int = 0, dist: DistContext | None = None) -> SASRec:
    """Train SASRec on ``split.train`` with early stopping on validation Recall@20.

    ``dist`` (default :func:`training.distributed.current`): under torchrun each rank trains on
    its shard of the windows with DDP; rank 0 evaluates and broadcasts its figures, so every
    rank ends with the same best weights.
    """
    dist = distributed.current() if dist is None else dist
    with torch_threads(config.threads):
        return _fit(split, config, seed, dist)


class TrainingWindows:
    """This rank's training windows ``[C_r, T]`` and the in-batch log-q of every item."""

    def __init__(self, split: Split, dist: DistContext, device: torch.device) -> None:
        all_inputs, all_targets = training_chunks(split.train, split.max_len)  # [C, T] each
        freq = torch.bincount(torch.from_numpy(all_targets[all_targets > 0]), minlength=split.num_items + 1)
        freq = freq.float() + 1.0
        log_q = torch.log(freq / freq.sum())  # [N+1] in-batch sampling log-probability (all windows)
        shard = dist.shard_indices(len(all_inputs)) if dist.is_distributed else slice(None)
        inputs_np, targets_np = all_inputs[shard], all_targets[shard]  # [C_r, T] this rank's windows
        self.lengths = (inputs_np > 0).sum(axis=1) + 1
        self.device = device
        self.log_q = log_q.to(device)
        self.inputs = torch.from_numpy(inputs_np).to(device)
        self.targets = torch.from_numpy(targets_np).to(device)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` cut to their longest window: ``([B, L], [B, L])``, on the training device."""
        width = int(self.lengths[idx].max()) - 1
        rows = torch.from_numpy(idx).to(self.device)
        return self.inputs[rows, -width:], self.targets[rows, -width:]


def train_step(
    module: SASRecModule,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainingWindows,
    idx: np.ndarray,
    config: SASRecConfig,
    generator: torch.Generator,
) -> float:
    """One optimizer step on windows ``idx [B]`` (``net``: ``module`` or its DDP wrapper); the loss."""
    batch_in, batch_tgt = data.batch(idx)
    loss = next_item_loss(module, net, batch_in, batch_tgt, config, data.log_q, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def _device(config: SASRecConfig, dist: DistContext) -> torch.device:
    """``config.device`` resolved; under torchrun a GPU setting means each rank's own GPU."""
    device = training_device(config.device)
    return dist.device if dist.is_distributed and device.type == "cuda" else device


def _fit(split: Split, config: SASRecConfig, seed: int, dist: DistContext) -> SASRec:
    seeds = seeded(seed, dist.rank)
    device = _device(config, dist)
    data = TrainingWindows(split, dist, device)
    module = SASRecModule(split.num_items, split.max_len, config).to(device)  # the same weights on every rank
    net = dist.wrap(module)
    if dist.is_distributed:
        torch.manual_seed(seed + dist.rank)  # other dropout masks on each rank
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    log.info(
        "SASRec: %d training windows (%d targets)%s, %d items, %s loss, on %s",
        len(data.inputs),
        int((data.targets > 0).sum()),
        f" on rank {dist.rank} of {dist.world_size}" if dist.is_distributed else "",
        split.num_items,
        config.loss,
        device,
    )
    start = time.perf_counter()
    batch_size = math.ceil(config.batch_size / dist.world_size)  # one process's global batch over W ranks

    def run_epoch(epoch: int) -> dict[str, float]:
        net.train()
        total, steps = 0.0, 0
        bar = progress(epoch_batches(data.lengths, batch_size, seeds.rng), f"sasrec epoch {epoch}")
        for idx in bar:
            total += train_step(module, net, optimizer, data, idx, config, seeds.generator)
            steps += 1
        module.eval()
        mean_loss = float(dist.all_reduce_mean(torch.tensor(total / max(1, steps))))
        valid: dict[str, float] = {}
        if dist.is_main:  # the others wait in the broadcast below
            valid = evaluate_recommender(SASRec(module, config), split.valid, (20,), limit=config.eval_users)
        return {**dist.broadcast(valid), "loss": mean_loss}

    keep = KeepBest(module, EARLY_STOP_METRIC, config.patience)

    epoch_ends = [0.0]  # seconds since start at the end of each epoch (its validation included)

    def stop(epoch: int, stats: dict[str, float]) -> str | None:
        epoch_ends.append(time.perf_counter() - start)
        reason = keep(epoch, stats)
        log.info(
            "sasrec epoch %d: loss %.4f, valid recall@20 %.4f ndcg@20 %.4f%s (%.0fs)",
            epoch,
            stats["loss"],
            stats[EARLY_STOP_METRIC],
            stats["ndcg@20"],
            " *" if keep.best_epoch == epoch else "",
            time.perf_counter() - start,
        )
        if (
            reason is None
            and config.max_train_seconds
            and time.perf_counter() - start > config.max_train_seconds
        ):
            reason = f"time budget {config.max_train_seconds:.0f}s"  # rank 0's clock decides (broadcast)
            log.warning("SASRec: stopping at the time budget (%s); best epoch %d", reason, keep.best_epoch)
        return reason

    result = run_epochs(config.max_epochs, run_epoch, stop, dist)
    keep.restore()
    module.cpu()  # everything downstream (cache, export, the trees) reads a CPU model
    info = {
        "train_seconds": time.perf_counter() - start,
        "device": str(device),
        "epoch_seconds": [round(b - a, 3) for a, b in itertools.pairwise(epoch_ends)],
        "epochs": result.epochs,
        "best_epoch": keep.best_epoch,
        "stopped": result.stopped,
        **{f"valid_{k}": v for k, v in keep.best_stats.items() if k != "loss"},
        **({"world_size": dist.world_size} if dist.is_distributed else {}),
    }
    log.info("SASRec: best epoch %d, valid recall@20 %.4f", keep.best_epoch, keep.best)
    return SASRec(module, config, info)
