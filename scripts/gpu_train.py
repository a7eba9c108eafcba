"""The GPU check's training step: SASRec (the base every method's index and rerank stand on) for a
few epochs on the CPU and on ``--device``, through the trainers' device setting (``sasrec.device``).

Both runs take the same planted data, config and seed; each reports the seconds of every epoch
(training plus the validation pass that early stopping reads), the validation Recall@20 it reached,
and where its weights ended (on the CPU: downstream code reads a CPU model). The report's ratio is
CPU / device over the last epoch (the first pays one-off costs). The CPU run uses every core (``--cpu-threads``, 0 = all): the comparison a user
makes is with the machine's CPU at its best, not with one thread.

usage: PYTHONPATH=. python scripts/gpu_train.py --device cuda [--users N --items N --epochs E] [--json-out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from training.data.synthetic import synthetic_dataset
from training.methods.sasrec.config import SASRecConfig
from training.methods.sasrec.train import fit_sasrec
from training.splits import Split, make_split


def run(split: Split, config: SASRecConfig) -> dict[str, Any]:
    """One training of ``config`` on ``split``: seconds per epoch, validation recall, weights' device."""
    start = time.perf_counter()
    model = fit_sasrec(split, config, seed=0)
    seconds = time.perf_counter() - start
    info = model.info
    return {
        "device": info["device"],
        "threads": config.threads,
        "epochs": info["epochs"],
        "seconds": round(seconds, 2),
        "epoch_seconds": info["epoch_seconds"],
        # the last epoch: the first pays one-off costs (kernel selection, allocator, CUDA context use)
        "seconds_per_epoch": info["epoch_seconds"][-1],
        "valid_recall@20": round(float(info["valid_recall@20"]), 4),
        "weights_on": str(model.module.item_emb.weight.device),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument(
        "--cpu-threads", type=int, default=0, help="torch threads of the CPU run (0 = all cores)"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    data = synthetic_dataset(num_users=args.users, num_items=args.items, branching=8, depth=2, seed=0)
    split = make_split(data, kind="user", seed=0, max_len=50)
    base = dataclasses.replace(
        SASRecConfig.load(),
        dim=args.dim,
        max_epochs=args.epochs,
        patience=args.epochs,
        eval_users=2_000,
        threads=args.cpu_threads or os.cpu_count() or 1,
    )
    report: dict[str, Any] = {
        "users": args.users,
        "items": args.items,
        "train_sequences": len(split.train),
    }
    for label, device in (("cpu", "cpu"), ("device", args.device)):
        report[label] = run(split, dataclasses.replace(base, device=device))
        print(json.dumps({label: report[label]}), flush=True)
    report["cpu_over_device"] = round(
        report["cpu"]["seconds_per_epoch"] / max(report["device"]["seconds_per_epoch"], 1e-9), 2
    )
    text = json.dumps(report, indent=2)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
