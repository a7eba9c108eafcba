"""The torch backend's two bundle files, checked without torch (``models/bundle/bundle.py`` calls this).

``modules.json``: ``{"encoder": {"kind": ..., ...}, "decoder": {"kind": ..., ...}}``, the specs
:mod:`models.bundle.torch_backend` rebuilds the modules from; ``weights.safetensors``: their state dicts,
keys prefixed ``encoder.`` / ``decoder.``. Here only the structure is checked (JSON object with
both kinds, a readable safetensors header naming float tensors); whether the tensors fit the
modules is checked when they are rebuilt (strict ``load_state_dict``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TORCH_MODULES_FILE = "modules.json"
TORCH_WEIGHTS_FILE = "weights.safetensors"
MODULE_PARTS = ("encoder", "decoder")
MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the JSON header."""


def safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8-byte little-endian length, then a JSON object."""
    with file.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{file.name}: too short for a safetensors header")
        size = int.from_bytes(head, "little")
        if size > MAX_HEADER_BYTES or size > file.stat().st_size - 8:
            raise ValueError(f"{file.name}: header length {size} is out of range")
        try:
            header = json.loads(fh.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file.name}: header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{file.name}: header is not a JSON object")
    return header


def read_specs(file: Path) -> dict[str, dict[str, Any]]:
    """``modules.json`` -> ``{"encoder": spec, "decoder": spec}``; raises ValueError naming the problem."""
    try:
        specs = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file.name} is not valid JSON: {exc}") from exc
    if not isinstance(specs, dict):
        raise ValueError(f"{file.name} must hold a JSON object")
    for part in MODULE_PARTS:
        spec = specs.get(part)
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise ValueError(f"{file.name}: {part!r} must be an object with a string 'kind'")
    return {part: specs[part] for part in MODULE_PARTS}


def check_torch_files(path: Path) -> None:
    """Both files parse; every tensor of the header belongs to the encoder or the decoder."""
    read_specs(path / TORCH_MODULES_FILE)
    header = safetensors_header(path / TORCH_WEIGHTS_FILE)
    names = [name for name in header if name != "__metadata__"]
    stray = [name for name in names if name.split(".", 1)[0] not in MODULE_PARTS]
    if stray:
        raise ValueError(f"{TORCH_WEIGHTS_FILE}: tensors {stray[:3]} belong to neither encoder nor decoder")
    if not names:
        raise ValueError(f"{TORCH_WEIGHTS_FILE}: holds no tensors")
