"""The trainer skeleton every method is written against: seeding, threads, batching, the epoch loop
with stopping as a per-method hook, progress bars, timings and data-parallel sharding.

A method supplies what is its own: a config (:func:`training.config.load_config`), a model, its
losses, ``run_epoch(epoch) -> stats`` and a stop hook; :func:`run_epochs` owns the loop. The stop
hooks in use:

* :class:`KeepBest` -- a validation figure (SASRec: Recall@20, higher is better; SEATER: the
  generation loss, lower is better) with patience; the best epoch's weights are restored;
* a per-level convergence criterion (URI's :class:`~training.methods.uri.schedule.LevelConvergence`);
* none (TDR: fixed epochs per tree-learning round, the best round kept by validation Recall@20).

Under ``torchrun`` (:mod:`training.distributed`) :func:`seeded` offsets the torch sampling seed by the rank,
:func:`shard_rows` gives each rank its equal-sized share of the training rows, the method steps a
``dist.wrap(module)``, and stop decisions are taken on rank 0 and broadcast.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from training.distributed import DistContext

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Seeds, threads, timings, progress


@dataclass(frozen=True)
class Seeds:
    """The random sources of one training run (torch's global seed is set too)."""

    rng: np.random.Generator
    """Subsampling and shuffling: seeded alike on every rank (a subsample must be the same set
    everywhere before it is sharded; each rank then shuffles its own shard)."""
    generator: torch.Generator
    """Torch-side sampling (negatives): seeded per rank, so ranks draw different negatives."""


def seeded(seed: int, rank: int = 0) -> Seeds:
    """``torch.manual_seed(seed)``; the numpy generator seeded ``seed``, the torch one ``seed + rank``."""
    torch.manual_seed(seed)
    return Seeds(np.random.default_rng(seed), torch.Generator().manual_seed(seed + rank))


def seed_point(seeds: Seeds) -> Callable[[], Seeds]:
    """Mark the random state now: torch's global one and ``seeds``. Each call of the returned
    function puts torch's global state back to the mark and returns copies of ``seeds`` as they
    were, so several models trained one after another each start where a lone run would."""
    torch_state = torch.get_rng_state()
    rng_state = copy.deepcopy(seeds.rng.bit_generator.state)
    generator_state = seeds.generator.get_state()

    def replay() -> Seeds:
        torch.set_rng_state(torch_state)
        rng = np.random.default_rng()
        rng.bit_generator.state = copy.deepcopy(rng_state)
        return Seeds(rng, torch.Generator().set_state(generator_state))

    return replay


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Torch intra-op threads inside the block (``0`` = leave torch's setting); restored after."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first GPU when there is one, else the CPU) as a
    device; a GPU asked for by name that this machine does not have is a ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not (
        torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    ):
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} usable GPU(s)")
    return device


@dataclass
class Timings:
    """Wall-clock seconds per named phase, summed over repeated phases."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def info(self, digits: int = 1) -> dict[str, float]:
        """``{"<phase>_seconds": s}`` rounded, for a method's ``info``."""
        return {f"{name}_seconds": round(s, digits) for name, s in self.seconds.items()}


def progress(items: Sequence[T], desc: str, mininterval: float = 0.1) -> Iterable[T]:
    """A transient progress bar over ``items`` (hidden when stderr is not a terminal)."""
    return tqdm(items, desc=desc, leave=False, disable=None, mininterval=mininterval)


# --------------------------------------------------------------------------------------------
# Batching and data parallelism


def shuffled_batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Row indices of ``n`` rows in batches of ``batch_size``: a random order, or in order without ``rng``."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def shard_rows(dist: DistContext, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """This rank's equal-sized strided share of the rows of every array (all arrays in one process)."""
    if not dist.is_distributed:
        return arrays
    idx = dist.shard_indices(len(arrays[0]))
    return tuple(a[idx] for a in arrays)


def popularity_counts(sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """``[N+1]`` float32 training interactions per item (row 0 = 0), the bundle's popularity."""
    items = np.concatenate([np.asarray(s, np.int64) for s in sequences] or [np.zeros(0, np.int64)])
    counts = np.bincount(items, minlength=num_items + 1).astype(np.float32)
    counts[0] = 0.0
    return counts


# --------------------------------------------------------------------------------------------
# The epoch loop and its stop hooks


class StopHook(Protocol):
    def __call__(self, epoch: int, stats: dict[str, float]) -> str | None:
        """After ``epoch`` with its ``stats``: why training stops now, or None to go on."""
        ...


@dataclass
class KeepBest:
    """Keep the weights of the epoch with the best validation figure; stop after ``patience``
    epochs without improvement (improvement = better by more than ``min_delta``)."""

    module: nn.Module
    metric: str
    patience: int
    higher_is_better: bool = True
    min_delta: float = 0.0
    best_epoch: int = 0
    best: float = field(init=False)
    best_stats: dict[str, float] = field(default_factory=dict)
    best_state: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.best = -1.0 if self.higher_is_better else float("inf")
        self.best_state = copy.deepcopy(self.module.state_dict())

    def improved(self, value: float) -> bool:
        if self.higher_is_better:
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def __call__(self, epoch: int, stats: dict[str, float]) -> str | None:
        if self.improved(stats[self.metric]):
            self.best, self.best_epoch, self.best_stats = stats[self.metric], epoch, dict(stats)
            self.best_state = copy.deepcopy(self.module.state_dict())
        return "early stopping" if epoch - self.best_epoch >= self.patience else None

    def restore(self) -> None:
        """Load the best epoch's weights into the module (eval mode)."""
        self.module.load_state_dict(self.best_state)
        self.module.eval()


@dataclass
class LoopResult:
    epochs: int
    """Epochs run."""
    stopped: str
    """Why the loop ended (``"max_epochs"`` when it ran them all)."""
    history: list[dict[str, float]]
    """The stats of every epoch."""


def run_epochs(
    max_epochs: int,
    run_epoch: Callable[[int], dict[str, float]],
    stop: StopHook | None = None,
    dist: DistContext | None = None,
) -> LoopResult:
    """Epochs ``1..max_epochs`` of ``run_epoch(epoch) -> stats``, ended early when ``stop`` says why.

    Under torchrun ``stop`` runs on every rank with the same (rank 0's, broadcast) stats, so its
    decision is the same everywhere; ``run_epoch`` broadcasts what it evaluates on rank 0.
    """
    history: list[dict[str, float]] = []
    epoch, stopped = 0, "max_epochs"
    for epoch in range(1, max_epochs + 1):
        stats = run_epoch(epoch)
        history.append(stats)
        reason = stop(epoch, stats) if stop is not None else None
        if dist is not None:
            reason = dist.broadcast(reason)
        if reason is not None:
            stopped = reason
            break
    return LoopResult(epochs=epoch, stopped=stopped, history=history)
