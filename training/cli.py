"""The `genret` command line: one entry point, subcommands registered by the modules that own them.

Each module in ``COMMAND_MODULES`` exposes ``register(sub, groups)``: ``sub`` is the top-level
subparsers action, ``groups["bench"]`` the subparsers of ``genret bench``. A registered parser sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).

``service.commands`` is imported here only to register ``serve`` / ``bench serve`` / ``replay``:
the CLI is the one place where the training and serving halves meet.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "training.commands.data",
    "training.commands.compare",
    "training.commands.train",
    "training.commands.evaluate",
    "training.commands.bench_search",
    "training.commands.bench_retrieve",
    "training.commands.index_report",
    "training.commands.frontier",
    "service.commands",
    "service.experiment_commands",
    "service.soak",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genret", description="Generative retrieval for recommender systems."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print a table against an in-run baseline")
    groups = {"bench": bench.add_subparsers(dest="bench_command", required=True)}
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
