"""A bundle's manifest (``manifest.json``): the file names and schema version, the backends' files,
the ONNX signatures the graphs must have, the parsed and type-checked :class:`Manifest`, the
fingerprint over every file's sha256, and :class:`BundleError` (what every check of a bundle raises,
naming the file and what is wrong). :mod:`models.bundle.bundle` loads and verifies the rest."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from models.bundle.torch_files import TORCH_MODULES_FILE, TORCH_WEIGHTS_FILE
from models.index import SCORE_MODES, ScoreMode
from models.nets.content_tower import CONTENT_FILE

SCHEMA_VERSION = 3
"""2: ``decoder.onnx`` is the incremental step (``cache`` in, ``cache_out`` out; ``dims.cache``).
3: ``decoder_memory.onnx`` computes the cross-attention keys/values once per batch
(``memory -> memory_state_0 ..``, ``dims.memory_states`` tensors ``[B,D,T]``), and ``decoder.onnx``
reads them."""
SCHEMA_CHANGES = {
    2: "its decoder.onnx recomputes the cross-attention keys and values at every level "
    "(schema 3 moves them to decoder_memory.onnx, once per batch)",
}
"""Why a bundle of an older schema is refused: the message :func:`parse_manifest` gives."""
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_MEMORY_FILE = "decoder_memory.onnx"
DECODER_FILE = "decoder.onnx"
INDEX_FILE = "index.npz"
ITEMS_FILE = "items.npz"
ONNX_FILES = (ENCODER_FILE, DECODER_MEMORY_FILE, DECODER_FILE)
BUNDLE_FILES = (*ONNX_FILES, INDEX_FILE, ITEMS_FILE)
"""The files of an ONNX-only bundle (``backends == ["onnx"]``)."""
DATA_FILES = (INDEX_FILE, ITEMS_FILE)
OPTIONAL_FILES = (CONTENT_FILE,)
"""Files a bundle may hold besides its backends' (listed in the manifest when present)."""
BACKEND_FILES: dict[str, tuple[str, ...]] = {
    "onnx": ONNX_FILES,
    "torch": (TORCH_MODULES_FILE, TORCH_WEIGHTS_FILE),
}


def bundle_files(backends: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The files a bundle holding ``backends`` must have: the data files, then each backend's."""
    return DATA_FILES + tuple(f for b in BACKEND_FILES if b in backends for f in BACKEND_FILES[b])


CENTROID_WEIGHTS = "leaf_centroid_weights"
"""The ``config`` key of the beam's centroid term (:mod:`models.search.centroid_term`): one weight per level."""


def centroid_weights_problem(weights: object, levels: int) -> str | None:
    """Why ``weights`` cannot be a bundle's :data:`CENTROID_WEIGHTS` for a tree of ``levels``, or None."""
    if not isinstance(weights, list) or len(weights) != levels:
        return f"must be a list of {levels} numbers (one per level), got {weights!r}"
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= w < math.inf:
            return f"must hold finite numbers >= 0, got {weights!r}"
    return None


# name -> (ONNX element type, rank); the decoder-step and encoder signatures of docs/CONTRACTS.md
_F, _I, _B = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
Signature = dict[str, tuple[int, int]]


def state_names(count: int) -> tuple[str, ...]:
    """The names of a memory state of ``count`` tensors: ``memory_state_0 .. memory_state_{count-1}``
    (``decoder_memory.onnx``'s outputs, the last inputs of ``decoder.onnx``)."""
    return tuple(f"memory_state_{i}" for i in range(count))


def onnx_signature(name: str, state_count: int) -> tuple[Signature, Signature]:
    """The inputs and outputs graph ``name`` must have, for a memory state of ``state_count`` tensors."""
    state: Signature = {name: (_F, 3) for name in state_names(state_count)}
    if name == ENCODER_FILE:
        return {"history": (_I, 2), "history_mask": (_B, 2)}, {"memory": (_F, 3), "query": (_F, 2)}
    if name == DECODER_MEMORY_FILE:
        return {"memory": (_F, 3)}, state
    step = {"memory_mask": (_B, 2), "beam_query": (_I, 1), "prefix": (_I, 2), "candidates": (_I, 2)}
    return {**step, "cache": (_F, 3), **state}, {"scores": (_F, 2), "cache_out": (_F, 3)}


class BundleError(ValueError):
    """A bundle that must not serve; the message names the file and what is wrong."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"bundle {self.path}: {message}")


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, typed. Item access (``manifest["levels"]``, ``.get``) reads the raw dict."""

    schema_version: int
    name: str
    method: str
    version: str
    created_at: str
    fingerprint: str
    levels: int
    branching: int
    token_scheme: str
    score_mode: ScoreMode  # checked against models.search.beam.SCORE_MODES on load
    dims: dict[str, int]  # {"memory": D, "query": Dr, "cache": W (decoder step cache width)}
    num_items: int
    max_history: int
    opset: int
    files: dict[str, dict[str, Any]]  # file name -> {"sha256": hex, "bytes": size}
    metrics: dict[str, Any]
    config: dict[str, Any]
    dataset_fingerprint: str
    raw: dict[str, Any] = field(repr=False, compare=False)
    backends: tuple[str, ...] = ("onnx",)

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "name": str,
    "method": str,
    "version": str,
    "created_at": str,
    "fingerprint": str,
    "levels": int,
    "branching": int,
    "token_scheme": str,
    "score_mode": str,
    "dims": dict,
    "num_items": int,
    "max_history": int,
    "opset": int,
    "files": dict,
    "metrics": dict,
    "config": dict,
    "dataset_fingerprint": str,
}


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def bundle_fingerprint(file_hashes: dict[str, str]) -> str:
    """sha256 over ``name:sha256`` lines of every file, sorted by name."""
    lines = "".join(f"{name}:{file_hashes[name]}\n" for name in sorted(file_hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


def parse_manifest(path: Path) -> Manifest:
    file = path / MANIFEST
    if not file.is_file():
        raise BundleError(path, f"{MANIFEST} is missing")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(path, f"{MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(path, f"{MANIFEST} must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        why = SCHEMA_CHANGES.get(version) if isinstance(version, int) else None
        hint = f": {why}; train or export it again with this build" if why else ""
        raise BundleError(
            path,
            f"{MANIFEST}: schema_version {version!r} is not supported (this build reads {SCHEMA_VERSION}){hint}",
        )
    for key, typ in _MANIFEST_TYPES.items():
        if key not in raw:
            raise BundleError(path, f"{MANIFEST}: missing key {key!r}")
        if not isinstance(raw[key], typ) or isinstance(raw[key], bool):
            raise BundleError(path, f"{MANIFEST}: {key!r} must be {typ}, got {raw[key]!r}")
    dims = raw["dims"]
    for key in ("memory", "query", "memory_states"):
        if not isinstance(dims.get(key), int) or dims[key] < 1:
            raise BundleError(path, f"{MANIFEST}: dims.{key} must be a positive int, got {dims.get(key)!r}")
    if not isinstance(dims.get("cache"), int) or dims["cache"] < 0:
        raise BundleError(path, f"{MANIFEST}: dims.cache must be an int >= 0, got {dims.get('cache')!r}")
    if raw["score_mode"] not in SCORE_MODES:
        raise BundleError(path, f"{MANIFEST}: unknown score_mode {raw['score_mode']!r}")
    if raw["max_history"] < 1 or raw["num_items"] < 1:
        raise BundleError(path, f"{MANIFEST}: max_history and num_items must be >= 1")
    weight = raw["config"].get("path_weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.0 <= weight < math.inf:
        raise BundleError(
            path, f"{MANIFEST}: config.path_weight must be a finite number >= 0, got {weight!r}"
        )
    why = centroid_weights_problem(raw["config"].get(CENTROID_WEIGHTS, [0.0] * raw["levels"]), raw["levels"])
    if why is not None:
        raise BundleError(path, f"{MANIFEST}: config.{CENTROID_WEIGHTS} {why}")
    backends = raw.get("backends", ["onnx"])
    if (
        not isinstance(backends, list)
        or not backends
        or len(set(backends)) != len(backends)
        or not set(backends) <= set(BACKEND_FILES)
    ):
        raise BundleError(
            path,
            f"{MANIFEST}: backends must be a non-empty list of {sorted(BACKEND_FILES)}, got {backends!r}",
        )
    return Manifest(**{key: raw[key] for key in _MANIFEST_TYPES}, raw=raw, backends=tuple(backends))
