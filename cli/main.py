"""The `genret` command line: one entry point, subcommands registered by the modules that own them.

Each module named in ``COMMANDS`` exposes ``register(sub, groups)``: ``sub`` is the top-level
subparsers action, ``groups["bench"]`` the subparsers of ``genret bench``. A registered parser sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).

A command's modules are imported only when that command runs (``genret --help`` imports them all):
``genret serve`` loads ``cli.serve`` alone, which imports ``service`` and nothing of ``training``
or ``benchmarks``. The CLI is the one place where training, serving and the benchmarks meet.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from service.main import configure_logging

# top-level command -> the modules that register it (and its subcommands)
COMMANDS: dict[str, tuple[str, ...]] = {
    "data": ("cli.data",),
    "compare": ("cli.compare",),
    "train": ("cli.train",),
    "eval": ("cli.evaluate",),
    "index-report": ("cli.index_report",),
    "frontier": ("cli.frontier",),
    "coldstart": ("cli.coldstart",),
    "catalogue": ("cli.catalogue",),
    "serve": ("cli.serve",),
    "replay": ("cli.experiments",),
    "ab-report": ("cli.experiments",),
    "bench": ("cli.bench_compute", "cli.bench_train", "cli.bench", "cli.catalogue"),
}


def command_modules(argv: Sequence[str] | None) -> tuple[str, ...]:
    """The modules to import for ``argv``: its command's own, or all of them (help, a typo)."""
    words = [a for a in argv if not a.startswith("-")] if argv is not None else []
    if words and words[0] in COMMANDS:
        return COMMANDS[words[0]]
    return tuple(dict.fromkeys(m for modules in COMMANDS.values() for m in modules))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv`` (None: every command registered)."""
    parser = argparse.ArgumentParser(
        prog="genret", description="Generative retrieval for recommender systems."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print a table against an in-run baseline")
    groups = {"bench": bench.add_subparsers(dest="bench_command", required=True)}
    for name in command_modules(argv):
        importlib.import_module(name).register(sub, groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    configure_logging(args.verbose)
    return int(args.func(args) or 0)
