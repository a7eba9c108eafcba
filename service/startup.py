"""Checks `genret serve` runs before it starts uvicorn; each failure is one line naming the setting.

* every ``GENRET_*`` environment variable must be a setting (or a name the trainer reads): a typo
  such as ``GENRET_MAX_KK`` is refused with the closest known name;
* the settings must validate (bounds, cross-field checks);
* the bundle path must exist and hold a bundle;
* the Redis URL (``redis_url``, or the one built from ``redis_host`` and its fields) must parse as
  the client parses it, and a CA file must exist; the message names the variable, never the URL
  (it may hold a password);
* the experiment file must exist, and the device must be a torch device this machine has;
* the ports must be free: the sockets are bound here and handed to uvicorn, so "address in use"
  names the setting instead of surfacing as a traceback.
"""

from __future__ import annotations

import difflib
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from service.settings import Settings

# GENRET_* variables read outside Settings (grep the repo for "GENRET_"): not settings, not typos.
OTHER_VARIABLES = frozenset({"GENRET_CACHE_DIR"})
PREFIX = "GENRET_"
# a CLI flag of `genret serve` -> the setting it overrides, to name both in messages
FLAGS = {
    "bundle_path": "--bundle",
    "host": "--host",
    "port": "--port",
    "device": "--device",
    "decoder_backend": "--backend",
    "search_mode": "--search-mode",
    "redis_url": "--redis-url",
}


class StartupError(Exception):
    """A mistake in the configuration: its message is the one line `genret serve` prints."""


def known_variables() -> frozenset[str]:
    return frozenset(PREFIX + name.upper() for name in Settings.model_fields) | OTHER_VARIABLES


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse ``GENRET_*`` variables that no part of genret reads, suggesting the closest name."""
    known = known_variables()
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in known:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see service/settings.py for the settings"
        raise StartupError(f"unknown environment variable {name}{hint}")


def variable(field: str, value: object = None) -> str:
    """``GENRET_BUNDLE_PATH=/x (--bundle)``: the variable, its value if given, the flag if any."""
    flag = FLAGS.get(field)
    shown = "" if value is None else f"={value}"
    return PREFIX + field.upper() + shown + (f" ({flag})" if flag else "")


def describe_validation_error(exc: ValidationError) -> str:
    """All problems of one ValidationError on one line, each naming its variable."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        message = error["msg"].removeprefix("Value error, ")
        if loc:
            value = error.get("input")
            parts.append(f"{variable(loc[0], None if isinstance(value, dict) else value)}: {message}")
        else:
            parts.append(f"settings: {message}")
    return "; ".join(parts)


def load_settings(overrides: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    check_environment(environ)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise StartupError(describe_validation_error(exc)) from None


def check_bundle_path(settings: Settings) -> None:
    """The bundle path must name a bundle or a directory of bundles (the registry's own discovery)."""
    from service.errors import ServiceError
    from service.registry.model_registry import ModelRegistry

    root = settings.bundle_path
    if root is None:
        raise StartupError(f"{variable('bundle_path')} is not set: give a bundle directory")
    if not root.exists():
        raise StartupError(f"{variable('bundle_path', root)}: no such directory")
    try:
        ModelRegistry(settings).discover()
    except ServiceError as exc:
        raise StartupError(exc.message) from None


def check_redis(settings: Settings) -> None:
    """The Redis URL must be one the client accepts: a malformed one fails here, naming its variable."""
    from redis.connection import parse_url

    field = "redis_url" if settings.redis_url is not None else "redis_host"
    url = settings.redis_connection_url()
    if url is None:
        return
    try:
        parts = urlsplit(url)
        parse_url(url)
    except ValueError as exc:
        raise StartupError(f"{variable(field)}: {exc}") from None
    db = parts.path.lstrip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise StartupError(f"{variable(field)}: the database after the last '/' must be a number, got {db!r}")
    ca_file = settings.redis_ca_file
    if ca_file is not None and not ca_file.is_file():
        raise StartupError(f"{variable('redis_ca_file', ca_file)}: no such file")


def check_files_and_device(settings: Settings) -> None:
    """The experiment file must exist and the device must be one torch knows and this machine has."""
    import torch

    experiments = settings.experiments_file
    if experiments is not None and not experiments.is_file():
        raise StartupError(f"{variable('experiments_file', experiments)}: no such file")
    try:
        device = torch.device(settings.device)
    except (RuntimeError, ValueError):
        raise StartupError(
            f"{variable('device', settings.device)}: not a torch device (cpu, cuda:0, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"{variable('device', settings.device)}: no CUDA device is available here")


def bind(host: str, port: int, field: str) -> socket.socket:
    """A listening TCP socket for uvicorn; a busy port is a :class:`StartupError` naming ``field``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"{variable(field, port)}: cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    sock.set_inheritable(True)
    return sock
