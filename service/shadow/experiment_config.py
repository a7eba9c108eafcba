"""The experiment file's schema: what ``GENRET_EXPERIMENTS_FILE`` may hold (:mod:`service.shadow.experiments`
shows an example), validated by pydantic; a bad file is refused with :class:`ExperimentConfigError`
naming the file and each bad field as the file writes it (``variants[0].weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails


class ExperimentConfigError(ValueError):
    """The experiment file is missing, unreadable or inconsistent; the message names the file and field."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source


# The file's schema: pydantic dataclasses (validated on construction too), unknown keys refused.
_STRICT = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


@dataclass(frozen=True, config=_STRICT)
class Variant:
    name: str  # label (response `variant`, metrics, logs); the bundle's name when the file omits it
    bundle: str  # model name in the registry
    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0  # normalised over all variants


@dataclass(frozen=True, config=_STRICT)
class ShadowTarget:
    bundle: str  # model name in the registry
    sample_rate: Annotated[float, Field(gt=0, le=1)] = 1.0  # share of user keys whose requests are copied


@dataclass(frozen=True, config=_STRICT)
class ExperimentConfig:
    name: str
    salt: Annotated[str, Field(min_length=1)]
    variants: tuple[Variant, ...]
    shadows: tuple[ShadowTarget, ...] = ()

    @field_validator("variants", mode="before")
    @classmethod
    def _name_defaults_to_bundle(cls, raw: Any) -> Any:
        if not isinstance(raw, list | tuple):
            return raw
        return [
            {**v, "name": v.get("name") or v["bundle"]} if isinstance(v, Mapping) and "bundle" in v else v
            for v in raw
        ]

    @field_validator("variants")
    @classmethod
    def _some_unique_variants(cls, variants: tuple[Variant, ...]) -> tuple[Variant, ...]:
        if not variants:
            raise ValueError("needs at least one variant")
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        return variants

    @field_validator("shadows", mode="before")
    @classmethod
    def _no_shadows(cls, raw: Any) -> Any:
        return () if raw is None else raw

    @field_validator("shadows")
    @classmethod
    def _unique_shadows(cls, shadows: tuple[ShadowTarget, ...]) -> tuple[ShadowTarget, ...]:
        bundles = [s.bundle for s in shadows]
        if len(set(bundles)) != len(bundles):
            raise ValueError(f"shadow bundles must be unique, got {bundles}")
        return shadows

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ExperimentConfigError(str(path), f"cannot read: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ExperimentConfigError(str(path), f"not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<experiment>") -> ExperimentConfig:
        """Validate a parsed file; :class:`ExperimentConfigError` names ``source`` and each bad field."""
        if not isinstance(data, Mapping):
            raise ExperimentConfigError(source, f"expected a mapping at the top, got {type(data).__name__}")
        data = {**data, "name": str(data.get("name") or Path(source).stem)}
        try:
            return _CONFIG.validate_python(data)
        except ValidationError as exc:
            raise ExperimentConfigError(source, "; ".join(_describe(e) for e in exc.errors())) from None

    @classmethod
    def single(cls, bundle: str) -> ExperimentConfig:
        """No experiment: everyone on ``bundle``."""
        return cls(name="default", salt="default", variants=(Variant(bundle, bundle, 1.0),))

    @property
    def bundles(self) -> list[str]:
        """Every bundle the experiment needs loaded (variants, then shadows)."""
        out = [v.bundle for v in self.variants]
        return out + [s.bundle for s in self.shadows if s.bundle not in out]


_CONFIG = TypeAdapter(ExperimentConfig)
_KNOWN_KEYS = {
    0: ("name", "salt", "variants", "shadows"),
    "variants": ("name", "bundle", "weight"),
    "shadows": ("bundle", "sample_rate"),
}


def _describe(error: ErrorDetails) -> str:
    """One pydantic error as ``field: what is wrong`` with the field as the file writes it
    (``variants[0].weight``); an unknown key names the keys that are known there."""
    loc = error["loc"]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _KNOWN_KEYS[loc[0] if len(loc) > 1 else 0]
        return f"{where}: unknown key (known: {', '.join(known)})"
    if error["type"] == "missing_argument" or error["type"] == "missing":
        return f"{where}: required"
    message = error["msg"].removeprefix("Value error, ")
    shown = (
        f" (got {error['input']!r})"
        if error["input"] is not None and not isinstance(error["input"], dict)
        else ""
    )
    return f"{where or 'experiment'}: {message}{shown}"
