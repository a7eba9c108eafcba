"""``genret serve``: an alias of the serving entry point (``genret-serve``, :mod:`service.main`).

Imports ``service`` only, so ``genret serve`` loads no trainer and no benchmark module.
"""

from __future__ import annotations

from typing import Any

from service.main import DESCRIPTION, add_arguments, serve


def register(sub: Any, groups: dict[str, Any]) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the retrieval service (settings from GENRET_* env; flags override)",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=serve)
