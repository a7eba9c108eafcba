"""``genret bench train``: SASRec's training step (the next-item loss, backward, Adam) on a real data
set at each of ``--threads`` torch intra-op thread counts, in one run.

Every setting starts from the same weights and takes the same batches of the same epoch order;
the settings take turns for ``--rounds`` rounds so that a change in the machine's load falls on
each alike. The table gives milliseconds per step (median over rounds), the epoch that implies,
and each setting's speed as a ratio to the first. SASRec is what every method's index and rerank
stand on, and the longest training of a compare run; its softmax over the whole catalogue is most
of each step. (Wired by :mod:`cli.bench_train`.)
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from typing import Any

import numpy as np
import torch

from training.distributed import current
from training.methods.sasrec.cache import sasrec_config
from training.methods.sasrec.config import SASRecConfig
from training.methods.sasrec.model import SASRecModule
from training.methods.sasrec.train import TrainingWindows, epoch_batches, train_step
from training.splits import Split
from training.trainer import torch_threads

WARMUP_STEPS = 3
"""Steps run before the clock starts: the allocator and kernel choice."""


def time_steps(
    split: Split, data: TrainingWindows, batches: list[np.ndarray], config: SASRecConfig, threads: int
) -> float:
    """Seconds per step of ``batches`` after the first ``WARMUP_STEPS``, at ``threads``, from fresh seed-0 weights."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    with torch_threads(threads):
        module = SASRecModule(split.num_items, split.max_len, config)
        module.train()
        optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
        for idx in batches[:WARMUP_STEPS]:
            train_step(module, module, optimizer, data, idx, config, generator)
        start = time.perf_counter()
        for idx in batches[WARMUP_STEPS:]:
            train_step(module, module, optimizer, data, idx, config, generator)
        return (time.perf_counter() - start) / max(1, len(batches) - WARMUP_STEPS)


def bench_train(
    split: Split, threads: list[int], steps: int, rounds: int, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The report: per thread count, the median ms per step over ``rounds`` and its ratio to the first."""
    config = sasrec_config(overrides, split)
    data = TrainingWindows(split, current(), torch.device("cpu"))
    all_batches = epoch_batches(data.lengths, config.batch_size, np.random.default_rng(0))
    # a data set with fewer batches than asked for repeats its epoch
    batches = list(itertools.islice(itertools.cycle(all_batches), steps + WARMUP_STEPS))
    seconds: dict[int, list[float]] = {t: [] for t in threads}
    for _ in range(rounds):
        for t in threads:
            seconds[t].append(time_steps(split, data, batches, config, t))
    median = {t: statistics.median(seconds[t]) for t in threads}
    rows = [
        {
            "threads": t,
            "ms_per_step": round(1000.0 * median[t], 1),
            "rounds_ms": [round(1000.0 * s, 1) for s in seconds[t]],
            "epoch_seconds": round(median[t] * len(all_batches), 1),
            "speed_vs_first": round(median[threads[0]] / median[t], 2),
        }
        for t in threads
    ]
    return {
        "items": split.num_items,
        "train_windows": len(data.inputs),
        "steps_per_epoch": len(all_batches),
        "timed_steps": len(batches) - WARMUP_STEPS,
        "rounds": rounds,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "threads"},
        "rows": rows,
    }


def format_report(report: dict[str, Any], name: str) -> str:
    cfg = report["config"]
    lines = [
        f"bench train: SASRec on {name}, {report['items']:,} items, {report['train_windows']:,} windows "
        f"({report['steps_per_epoch']} steps an epoch); {cfg['loss']} loss, D={cfg['dim']}, batch {cfg['batch_size']}; "
        f"{report['timed_steps']} timed steps, median of {report['rounds']} rounds taken in turn",
        f"{'threads':>8}{'ms/step':>10}{'epoch s':>10}{'speed':>8}  rounds (ms/step)",
    ]
    for r in report["rows"]:
        rounds = " ".join(f"{x:.1f}" for x in r["rounds_ms"])
        lines.append(
            f"{r['threads']:>8}{r['ms_per_step']:>10.1f}{r['epoch_seconds']:>10.1f}{r['speed_vs_first']:>7.2f}x  {rounds}"
        )
    lines.append("epoch s: the training steps of one epoch at that pace (validation not included)")
    return "\n".join(lines)
