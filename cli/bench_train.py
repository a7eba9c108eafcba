"""``genret bench train``: the wiring (flags, the data set and its split); the benchmark is
:mod:`benchmarks.train`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks.train import bench_train, format_report
from cli.bench_compute import parse_ints
from cli.compare import parse_overrides
from cli.data import add_data_arguments, dataset_from_args
from training.splits import SPLIT_KINDS, make_split


def register(sub: Any, groups: dict[str, Any]) -> None:
    p = groups["bench"].add_parser(
        "train",
        help="SASRec's training step at several torch thread counts on a data set: ms per step, ratio",
    )
    add_data_arguments(p)
    p.add_argument("--split", choices=SPLIT_KINDS, default="loo", help="user split 8:1:1 or leave-one-out")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--max-len", type=int, default=50, help="history length T")
    p.add_argument(
        "--threads", type=parse_ints, default=[1, 2], help="torch intra-op threads to compare, e.g. 1,2"
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the settings in turn in each")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="SASRec override, e.g. sasrec.dim=128",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("genret: --steps and --rounds must be at least 1")
    dataset = dataset_from_args(args)
    split = make_split(dataset, kind=args.split, seed=args.seed, max_len=args.max_len)
    report = bench_train(split, args.threads, args.steps, args.rounds, parse_overrides(args.overrides))
    report = {"data": dataset.name, "split": split.kind, **report}
    print(
        json.dumps(report, indent=2) if args.json else format_report(report, f"{dataset.name} ({split.kind})")
    )
    return 0
