"""`genret data stats`: what a data file holds, and the ``--data/--format`` arguments every command shares."""

from __future__ import annotations

import argparse
import json
from typing import Any

from training.data import (
    DEFAULT_DATA,
    FORMATS,
    SYNTHETIC_DATA,
    Dataset,
    DatasetError,
    dataset_stats,
    open_dataset,
)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--format`` and ``--skip-bad-lines``."""
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"interaction file, {DEFAULT_DATA!r} (MovieLens-100k from the recbole wheel) or {SYNTHETIC_DATA!r}",
    )
    parser.add_argument("--format", dest="fmt", choices=FORMATS, help="file format (required for a file)")
    parser.add_argument(
        "--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of failing"
    )


def dataset_from_args(args: argparse.Namespace) -> Dataset:
    """The dataset named by :func:`add_data_arguments`; raises SystemExit with the loader's message."""
    try:
        return open_dataset(args.data, args.fmt, skip_bad_lines=args.skip_bad_lines)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"genret: cannot load data: {exc}") from exc


def format_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"dataset       {stats['name']}  (fingerprint {stats['fingerprint']})",
        f"users         {stats['users']:,}",
        f"items         {stats['items']:,}",
        f"interactions  {stats['interactions']:,}",
        f"density       {stats['density']:.6f}",
        "history length  mean {len_mean:.2f} | min {len_min:.0f} p25 {len_p25:.0f} p50 {len_p50:.0f} "
        "p75 {len_p75:.0f} p90 {len_p90:.0f} p99 {len_p99:.0f} max {len_max:.0f}".format(**stats),
        f"attributes    {stats['attributes']:,}",
    ]
    if stats["skipped_lines"]:
        lines.append(f"skipped lines {stats['skipped_lines']:,}")
    return "\n".join(lines)


def run_stats(args: argparse.Namespace) -> int:
    stats = dataset_stats(dataset_from_args(args))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    data = sub.add_parser("data", help="inspect interaction data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    stats = data_sub.add_parser("stats", help="users, items, interactions, density, history lengths")
    add_data_arguments(stats)
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=run_stats)
