"""The one method table: every retrieval method by name, for `genret compare`, `genret train` and
`genret coldstart`.

Each :class:`Method` says where the method's train entry point and its config class live, which
config fields ``max_epochs`` caps, and whether it trains data-parallel under torchrun. Nothing
registers itself: a method's modules are imported only when it is asked for (:func:`get_method`),
so `genret compare --methods popular,sasrec` never imports the generative trainers. Method
packages import :mod:`training.context` and :mod:`training.config`, never this module.

The override rule for ``--set`` keys (what :func:`check_overrides` enforces) is in
:mod:`training.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from training.config import SHARED_KEYS
from training.context import TrainFn


def _popular() -> TrainFn:
    from training.methods.popular import train_popular

    return train_popular


def _sasrec() -> TrainFn:
    from training.methods.sasrec.cache import train_sasrec_method

    return train_sasrec_method


def _uri() -> TrainFn:
    from training.methods.uri.train import train_uri

    return train_uri


def _seater() -> TrainFn:
    from training.methods.seater.train import train_seater

    return train_seater


def _tdr() -> TrainFn:
    from training.methods.tdr.train import train_tdr

    return train_tdr


def _sasrec_config() -> type:
    from training.methods.sasrec.config import SASRecConfig

    return SASRecConfig


def _uri_config() -> type:
    from training.methods.uri.config import URIConfig

    return URIConfig


def _seater_config() -> type:
    from training.methods.seater.config import SeaterConfig

    return SeaterConfig


def _tdr_config() -> type:
    from training.methods.tdr.config import TDRConfig

    return TDRConfig


@dataclass(frozen=True)
class Method:
    name: str
    train: Callable[[], TrainFn]  # imports the method's train entry point
    config: Callable[[], type] | None = None  # its frozen config dataclass (None: no settings)
    data_parallel: bool = False
    """Shards its data over the ranks of a torchrun job (each rank steps a DDP-wrapped training
    module on its share; rank 0 evaluates, decides and exports)."""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("popular", _popular),
        Method("sasrec", _sasrec, _sasrec_config, data_parallel=True),
        Method("uri", _uri, _uri_config, data_parallel=True),
        Method("seater", _seater, _seater_config, data_parallel=True),
        Method("tdr", _tdr, _tdr_config, data_parallel=True),
    )
}
DATA_PARALLEL_METHODS: frozenset[str] = frozenset(m.name for m in METHODS.values() if m.data_parallel)


def get_method(name: str) -> TrainFn:
    """The train entry point of ``name`` (its modules imported now); ``KeyError`` names the known ones."""
    method = METHODS.get(name)
    if method is None:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return method.train()


def config_fields(prefix: str) -> set[str]:
    """The field names of the config class of method ``prefix``."""
    loader = METHODS[prefix].config
    if loader is None:
        return set()
    return {f.name for f in dataclasses.fields(loader())}


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for a ``--set`` key that no method reads (:mod:`training.config`)."""
    prefixes = [name for name, m in METHODS.items() if m.config is not None]
    fields = {prefix: config_fields(prefix) for prefix in prefixes}
    for key in overrides:
        if key in SHARED_KEYS:
            continue
        prefix, dot, name = key.partition(".")
        if dot and prefix in fields:
            if name not in fields[prefix]:
                known = ", ".join(f"{prefix}.{f}" for f in sorted(fields[prefix]))
                raise ValueError(f"unknown setting {key!r}; known: {known}")
        elif dot or not any(key in names for names in fields.values()):
            raise ValueError(
                f"unknown setting {key!r}: use <method>.<field> with a method of "
                f"{', '.join(prefixes)}, or a field of one of them"
            )
