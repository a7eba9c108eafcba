"""The OpenAPI document of the public API, as the app serves it at ``/openapi.json`` (outside prod).

``docs/openapi.json`` is this document, committed for frontend teams that generate a client from it
(a test holds it equal to what a running service serves). Regenerate it after changing a route or a
schema::

    .venv/bin/python -m service.openapi > docs/openapi.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def public_openapi() -> dict[str, Any]:
    """The public app's OpenAPI document (no bundle is loaded: the lifespan does not run)."""
    from service.app import create_app  # a tool beside the app, not part of it
    from service.settings import Settings

    return create_app(Settings(env="dev")).openapi()


def main() -> int:
    sys.stdout.write(json.dumps(public_openapi(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
