"""Write a bundle: ONNX encoder/decoder, index, item tables and a manifest (see models/bundle/bundle.py).

The graphs come from :mod:`training.export.onnx_graphs` (``dims.memory_states`` and ``dims.cache`` in the manifest).
After writing, the bundle is read back with :func:`models.bundle.bundle.load_bundle` and ONNX Runtime
is checked against the torch modules on the example inputs. The bundle is written into a
temporary sibling directory and renamed into place, so a reader never sees a half-written bundle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from models.bundle.attributes import ItemAttributes
from models.bundle.bundle import CONTENT_FILE, load_bundle
from models.bundle.manifest import (
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST,
    SCHEMA_VERSION,
    bundle_files,
    bundle_fingerprint,
    file_sha256,
)
from models.index import TreeIndex
from models.nets.decoder_step import DecoderStep
from models.search.beam_policy import default_beam
from training.content_tower import write_content
from training.export.onnx_graphs import OPSET, ExportError, example_inputs, export_graphs
from training.export.spec import BundleSpec
from training.export.torch_files import choose_backends, probe_dims, write_torch_files
from training.state_bounds import encoder_state_bounds

log = logging.getLogger(__name__)


def write_items(
    path: Path,
    item_emb: np.ndarray,
    item_ids: Sequence[str] | np.ndarray,
    popularity: np.ndarray,
    attributes: ItemAttributes | None = None,
) -> None:
    """``items.npz`` (models/bundle/items.py), with the attribute arrays when ``attributes`` is given."""
    arrays: dict[str, Any] = {
        "item_emb": np.ascontiguousarray(item_emb, dtype=np.float32),
        "item_ids": np.asarray(item_ids, dtype=np.str_),  # fixed-width unicode, never an object array
        "popularity": np.asarray(popularity, dtype=np.float32),
        **(attributes.arrays() if attributes is not None else {}),
    }
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def _check_inputs(
    index: TreeIndex,
    item_emb: np.ndarray,
    item_ids: Sequence[str] | np.ndarray,
    popularity: np.ndarray,
    score_mode: str,
) -> None:
    rows = index.num_items + 1
    if item_emb.ndim != 2 or item_emb.shape[0] != rows:
        raise ExportError(f"item_emb must be [num_items+1={rows}, Dr], got {list(item_emb.shape)}")
    if len(item_ids) != rows or item_ids[0] != "":
        raise ExportError(
            f"item_ids must have num_items+1={rows} entries with item_ids[0] == '', got {len(item_ids)}"
        )
    if np.shape(popularity) != (rows,):
        raise ExportError(f"popularity must be [num_items+1={rows}], got {list(np.shape(popularity))}")
    if score_mode not in ("logprob", "node"):
        raise ExportError(f"score_mode must be 'logprob' or 'node', got {score_mode!r}")
    index.validate()


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def export_bundle(out_dir: str | Path, spec: BundleSpec | None = None, **fields: Any) -> Path:
    """:func:`write_bundle` of ``spec``, or of ``BundleSpec(**fields)`` (the keyword form)."""
    return write_bundle(out_dir, spec if spec is not None else BundleSpec(**fields))


def write_bundle(out_dir: str | Path, spec: BundleSpec) -> Path:
    """Write a verified bundle to ``out_dir`` (replacing an existing one atomically); returns its path."""
    out = Path(out_dir)
    _check_inputs(spec.index, spec.item_emb, spec.item_ids, spec.popularity, spec.score_mode)
    if spec.item_attributes is not None and spec.item_attributes.num_rows != spec.index.num_items + 1:
        raise ExportError(f"item_attributes cover {spec.item_attributes.num_rows} dense ids, expected N+1")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        chosen = choose_backends(spec.encoder, spec.decoder, spec.index, spec.backends)
        graphs = write_model_files(tmp, spec.encoder, spec.decoder, spec.index, spec.max_history, chosen)
        if spec.item_emb.shape[1] != graphs["dims"]["query"]:
            raise ExportError(
                f"item_emb has {spec.item_emb.shape[1]} columns but the encoder's query has {graphs['dims']['query']}"
            )
        spec.index.save(tmp / INDEX_FILE)
        write_items(tmp / ITEMS_FILE, spec.item_emb, spec.item_ids, spec.popularity, spec.item_attributes)
        content = write_content(tmp, spec.item_emb, spec.item_attributes if spec.content_tower else None)
        files = bundle_files(chosen) + ((CONTENT_FILE,) if content is not None else ())
        hashes = {f: file_sha256(tmp / f) for f in files}
        manifest = _manifest(spec, graphs, chosen, hashes, tmp) | ({"content": content} if content else {})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        load_bundle(tmp)  # refuse to publish what the loader would refuse
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "bundle %s (%s) at %s, fingerprint %s", spec.name, spec.method, out, manifest["fingerprint"][:12]
    )
    return out


def served_name(name: str) -> str:
    """``name`` as the service accepts a model name (``^[a-z0-9][a-z0-9._-]{0,63}$``: a metric label
    and a path-free id): lower case, any other character as ``-``. Trainers name bundles after the
    dataset (``uri-Beauty``), which the service would otherwise refuse."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).lstrip("._-")[:64]
    if not slug:
        raise ExportError(f"bundle name {name!r} has no character a model name can use")
    return slug


def _manifest(
    spec: BundleSpec, graphs: dict[str, Any], chosen: Sequence[str], hashes: dict[str, str], tmp: Path
) -> dict[str, Any]:
    """The manifest of a bundle whose files (``hashes``) are written in ``tmp``."""
    index = spec.index
    created = datetime.now(UTC)
    return {
        "schema_version": SCHEMA_VERSION,
        "name": served_name(spec.name),
        "method": spec.method,
        "version": spec.version or created.strftime("%Y%m%dT%H%M%SZ"),
        "created_at": created.isoformat(),
        "fingerprint": bundle_fingerprint(hashes),
        "levels": index.levels,
        "branching": index.max_branching,
        "token_scheme": index.token_scheme,
        "score_mode": spec.score_mode,
        "dims": graphs["dims"],
        # the encoder's output range: cached states outside it are refused (training/state_bounds.py)
        "state_bounds": encoder_state_bounds(spec.encoder, index.num_items, spec.max_history),
        "num_items": index.num_items,
        "num_nodes": index.num_nodes,
        "num_leaves": index.num_leaves,
        "max_history": spec.max_history,
        "opset": OPSET,
        "files": {f: {"sha256": hashes[f], "bytes": (tmp / f).stat().st_size} for f in hashes},
        "backends": list(chosen),
        "metrics": _json_safe(spec.metrics),
        "config": _json_safe(with_default_beam(spec.config, index)),
        "dataset_fingerprint": spec.dataset_fingerprint,
        "export": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "parity_max_abs_error": graphs.get("parity_max_abs_error"),
            "torch_roundtrip_max_abs_error": graphs.get("torch_roundtrip_max_abs_error"),
        },
    }


def with_default_beam(config: dict[str, Any], index: TreeIndex) -> dict[str, Any]:
    """``config`` with ``beam_size`` from the catalogue rule (:mod:`models.search.beam_policy`) unless the
    trainer set one explicitly (``beam_size`` >= 1): the bundle's default beam, read by the service,
    ``genret eval`` and ``genret replay`` when a request or flag gives none."""
    if isinstance(config.get("beam_size"), int) and config["beam_size"] >= 1:
        return config
    return {**config, "beam_size": default_beam(index.num_items, np.diff(index.leaf_offsets))}


def write_model_files(
    out: Path,
    encoder: nn.Module,
    decoder: nn.Module,
    index: TreeIndex,
    max_history: int,
    backends: tuple[str, ...],
) -> dict[str, Any]:
    """The model files of each backend; returns dims and the parity / round-trip errors measured."""
    info: dict[str, Any] = {}
    if "onnx" in backends:
        info.update(export_graphs(out, encoder, decoder, index, index.num_items, max_history))
    else:
        info["dims"] = probe_dims(encoder, example_inputs(index, index.num_items, max_history, dim=1))
        info["dims"] |= DecoderStep(decoder).dims()  # the serving step's memory state and cache
    if "torch" in backends:
        ex = example_inputs(index, index.num_items, max_history, dim=info["dims"]["memory"])
        info["torch_roundtrip_max_abs_error"] = write_torch_files(out, encoder, decoder, index, ex)
    return info


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and then deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def copy_bundle(src: Path, out: Path) -> Path:
    """Copy an exported bundle to ``out`` (replacing an existing one atomically); returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def record_metrics(bundle_dir: Path, metrics: dict[str, float]) -> None:
    """Write offline ``metrics`` into an exported bundle's manifest (atomically).

    Trainers export before the test evaluation, so the metrics arrive afterwards. The manifest is
    not among the checksummed files, so the fingerprint (and every cache key derived from it) stays.
    """
    _update_manifest(Path(bundle_dir), lambda manifest: manifest.update(metrics=_json_safe(metrics)))


def record_config(bundle_dir: Path, updates: dict[str, Any]) -> None:
    """Merge ``updates`` into an exported bundle's manifest ``config`` (atomically; the fingerprint
    stays, as in :func:`record_metrics`): what a trainer chooses after export, e.g. ``path_weight``."""
    _update_manifest(Path(bundle_dir), lambda manifest: manifest["config"].update(_json_safe(updates)))


def _update_manifest(bundle_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = bundle_dir / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
