"""`genret coldstart`: hold out items, train without them, add them through the live catalogue."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    raise SystemExit("genret coldstart: not implemented yet")


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    parser = sub.add_parser("coldstart", help="cold-start evaluation of the live catalogue (issue 17)")
    parser.set_defaults(func=run)
