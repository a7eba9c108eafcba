"""`genret compare`: train several methods on one split and print their test metrics side by side."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from cli.args import comma_list
from cli.data import add_data_arguments, dataset_from_args
from training.comparison import MethodResult, run_compare
from training.context import TrainContext
from training.data import Dataset, dataset_stats
from training.metrics import split_ks
from training.registry import check_overrides
from training.splits import SPLIT_KINDS, Split, make_split, target_in_history_share

log = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = ("recall", "ndcg", "hr")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=3", "c=true"]`` -> ``{"a.b": 3, "c": True}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"genret: --set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split", choices=SPLIT_KINDS, default="user", help="user split 8:1:1 or leave-one-out"
    )
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--max-len", type=int, default=50, help="history length T")
    parser.add_argument("--max-epochs", type=int, help="cap on training epochs for every method")
    parser.add_argument(
        "--workdir", type=Path, help="where methods write their files (default runs/<command>/...)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", metavar="KEY=VALUE", help="config override (repeatable)"
    )


def make_context(args: argparse.Namespace, command: str) -> TrainContext:
    """Dataset, split and TrainContext from the shared arguments."""
    dataset = dataset_from_args(args)
    split = make_split(dataset, kind=args.split, seed=args.seed, max_len=args.max_len)
    log.info("%s: %s", dataset.name, split.describe())
    overrides = parse_overrides(args.overrides)
    if args.max_epochs is not None:
        overrides["max_epochs"] = args.max_epochs
    check_overrides(overrides)  # a typo fails here, before any training
    workdir = args.workdir or Path("runs") / command / f"{dataset.name}-{split.kind}-s{split.seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    return TrainContext(
        dataset=dataset, split=split, seed=args.seed, workdir=workdir, config_overrides=overrides
    )


HEADLINE_K = {"user": 20, "loo": 10}
"""The cut-off whose IVF figures the table shows: the one each protocol's literature reports."""


def split_summary(split: Split) -> dict[str, Any]:
    return {
        "kind": split.kind,
        "seed": split.seed,
        "max_len": split.max_len,
        "train_sequences": len(split.train),
        "valid_users": len(split.valid),
        "test_users": len(split.test),
        "ks": list(split_ks(split.kind)),
        "test_targets_in_history": target_in_history_share(split.test),
    }


def _split_line(split: Split) -> str:
    repeats = target_in_history_share(split.test)
    line = (
        f"split {split.kind}, seed {split.seed}, T={split.max_len}: {len(split.train):,} train sequences, "
        f"{len(split.valid):,} valid / {len(split.test):,} test users; test metrics, full ranking, "
        + ("every earlier item excluded" if split.kind == "loo" else "history excluded")
    )
    if repeats:
        line += f"; {100 * repeats:.2f}% of test targets are in their history (repeats: excluded, so misses)"
    return line


def format_table(dataset: Dataset, split: Split, results: list[MethodResult]) -> str:
    stats = dataset_stats(dataset)
    header = (
        f"data {stats['name']}: {stats['users']:,} users, {stats['items']:,} items, "
        f"{stats['interactions']:,} interactions, density {stats['density']:.5f}\n" + _split_line(split)
    )
    columns = [f"{m}@{k}" for k in split_ks(split.kind) for m in METRIC_NAMES]
    head = HEADLINE_K.get(split.kind, 20)
    ivf_columns = [f"ivf_recall@{head}", f"ivf_ndcg@{head}"]
    width = max([len("method"), *(len(r.method) for r in results)])
    titles = [f"{'method':<{width}}", *(f"{c:>9}" for c in columns), "  train_s", "   eval_s", "candidates"]
    lines = [header, "", "  ".join([*titles, *(f"{c:>13}" for c in ivf_columns)])]
    for r in results:
        cells = [f"{r.metrics[c]:9.4f}" for c in columns]
        cands = "" if r.candidates is None else f"{r.candidates:10.1f}"
        ivf = [
            f"{r.ivf_at_budget[c[4:]]:13.4f}" if c[4:] in r.ivf_at_budget else " " * 13 for c in ivf_columns
        ]
        row = [f"{r.method:<{width}}", *cells, f"{r.train_seconds:9.1f}", f"{r.eval_seconds:9.1f}"]
        lines.append("  ".join([*row, f"{cands:>10}", *ivf]).rstrip())
    notes = [f"{r.method}: {_info_text(r.info)}" for r in results if r.info]
    notes += [_budget_note(r, dataset.num_items, head) for r in results if r.candidates is not None]
    return "\n".join([*lines, "", *notes]) if notes else "\n".join(lines)


def _budget_note(r: MethodResult, num_items: int, head: int) -> str:
    assert r.candidates is not None
    text = (
        f"{r.method}: {r.candidates:.1f} candidates scored per test user "
        f"({100 * r.candidates / num_items:.2f}% of the catalogue); SASRec in faiss IVF at that budget: "
    )
    if not r.ivf_at_budget:
        return text + "n/a"
    names = (f"recall@{head}", f"ndcg@{head}")
    return text + ", ".join(f"{k} {r.ivf_at_budget[k]:.4f} (vs {r.metrics[k]:.4f})" for k in names)


def _info_text(info: dict[str, Any]) -> str:
    parts = []
    for key, value in info.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


def results_json(dataset: Dataset, split: Split, results: list[MethodResult]) -> str:
    payload = {
        "dataset": dataset_stats(dataset),
        "split": split_summary(split),
        "seed": split.seed,
        "results": [
            {
                "method": r.method,
                "metrics": r.metrics,
                "train_seconds": r.train_seconds,
                "eval_seconds": r.eval_seconds,
                "info": r.info,
                "bundle_dir": str(r.bundle_dir) if r.bundle_dir else None,
                "candidates": r.candidates,
                "ivf_recall_at_budget": r.ivf_recall_at_budget,
                "ivf_at_budget": r.ivf_at_budget,
            }
            for r in results
        ],
    }
    return json.dumps(payload, indent=2, default=str)


def run(args: argparse.Namespace) -> int:
    methods = list(comma_list(args.methods, str))
    if not methods:
        raise SystemExit("genret: --methods needs at least one method")
    ctx = make_context(args, "compare")
    results = run_compare(ctx, methods)
    print(
        results_json(ctx.dataset, ctx.split, results)
        if args.json
        else format_table(ctx.dataset, ctx.split, results)
    )
    return 0


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    parser = sub.add_parser("compare", help="train methods on one split and compare test metrics")
    add_data_arguments(parser)
    parser.add_argument("--methods", default="popular,sasrec", help="comma-separated method names")
    add_split_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
