"""One config loader for every method: a frozen dataclass, its YAML defaults and ``--set`` overrides.

The override rule, the same for every method (``genret train/compare --set key=value``,
``TrainContext.config_overrides``):

* ``<method>.<field>`` sets that field of that method's config (``sasrec.dim``, ``uri.k``);
* a bare ``<field>`` sets the field in every method config that has it, unless the prefixed key
  is also given (the prefixed key wins);
* ``max_epochs`` caps every epoch field of every method (each config class names them in its
  ``EPOCH_FIELDS``: ``SASRecConfig.max_epochs``, SEATER's ``epochs``, TDR's ``epochs``/``round_epochs``,
  URI's level and ranker epochs), after the other overrides;
* ``cache_dir`` and ``sasrec.cache`` are read by the SASRec cache, not by a config;
* any other key (a typo, an unknown ``<method>.`` field) raises ``ValueError`` naming the known ones:
  :func:`training.registry.check_overrides` checks every key where a train context is made (the
  CLI, the cold-start run); :func:`load_config` checks its own method's prefixed keys.

Values are coerced to the type of the field's default by :func:`coerce` (the one coercion rule):
booleans from ``true/false/1/0/yes/no/on/off``, integers from integral numbers or strings, floats,
tuples from lists or comma-separated strings, strings as given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")

SHARED_KEYS = frozenset({"max_epochs", "cache_dir", "sasrec.cache"})  # not fields of one config
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` (from YAML or ``--set``) as the type of ``default``; ``ValueError`` names ``key``."""
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError(value)
        if isinstance(default, int):
            number = float(value)
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            parts = value if isinstance(value, list | tuple) else str(value).split(",")
            kind = type(default[0]) if default else int
            return tuple(coerce(key, p, kind()) for p in parts)
        return value if default is None else str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config {key}={value!r} is not a {type(default).__name__}") from exc


def load_config(
    cls: type[C], prefix: str, overrides: Mapping[str, Any] | None = None, path: Path | None = None
) -> C:
    """``cls`` from its defaults, the YAML file ``path`` (if any) and ``overrides`` (the rule above)."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    overrides = dict(overrides or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:  # this method's own keys; every key: training.registry.check_overrides
        own, dot, name = key.partition(".")
        if dot and own == prefix and name not in names and key not in SHARED_KEYS:
            known = ", ".join(f"{prefix}.{f}" for f in sorted(names))
            raise ValueError(f"unknown setting {key!r}; known: {known}")
    values: dict[str, Any] = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{path}: unknown {prefix} config key(s) {unknown}; known: {sorted(names)}")
    values.update({k: v for k, v in overrides.items() if k in names})  # bare keys
    for key, value in overrides.items():  # prefixed keys win
        if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in names:
            values[key[len(prefix) + 1 :]] = value
    default = cls()
    config = cls(**{k: coerce(f"{prefix}.{k}", v, getattr(default, k)) for k, v in values.items()})
    if "max_epochs" in overrides:
        cap = coerce("max_epochs", overrides["max_epochs"], 0)
        epoch_fields: tuple[str, ...] = getattr(cls, "EPOCH_FIELDS", ())
        capped = {f: min(getattr(config, f), cap) for f in epoch_fields if f in names}
        config = dataclasses.replace(config, **capped)
    return config
