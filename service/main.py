"""The serving entry point: ``genret-serve`` and ``python -m service`` (``genret serve`` calls it too).

Its import graph holds ``service`` and ``models`` only: a serving image ships neither the trainer,
the CLI nor the benchmarks (tests/unit/test_serving_imports.py holds this). Every setting is a
``GENRET_*`` environment variable (``service/settings.py``); the flags below override them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Run the HTTP retrieval service under uvicorn. Every setting is read from GENRET_* environment "
    "variables (see service/settings.py); the flags below override them."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags, each named for the setting it overrides."""
    parser.add_argument(
        "--bundle", type=Path, help="bundle directory, or a directory of bundles (GENRET_BUNDLE_PATH)"
    )
    parser.add_argument("--host", help="bind address (GENRET_HOST)")
    parser.add_argument("--port", type=int, help="port (GENRET_PORT)")
    parser.add_argument("--device", help="cpu | cuda:0 (GENRET_DEVICE)")
    parser.add_argument("--backend", choices=["onnx", "torch"], help="GENRET_DECODER_BACKEND")
    parser.add_argument("--search-mode", choices=["generative", "bruteforce"], help="GENRET_SEARCH_MODE")
    parser.add_argument("--redis-url", help="redis://host:port/0 (GENRET_REDIS_URL)")


def serve(args: argparse.Namespace) -> int:
    """Start-up checks, then uvicorn until shut down (``service.server.run``); the exit status."""
    from service.server import run

    overrides: dict[str, Any] = {
        "bundle_path": args.bundle,
        "host": args.host,
        "port": args.port,
        "device": args.device,
        "decoder_backend": args.backend,
        "search_mode": args.search_mode,
        "redis_url": args.redis_url,
    }
    return run({k: v for k, v in overrides.items() if v is not None})


def build_parser(prog: str = "genret-serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    return parser


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return serve(args)
