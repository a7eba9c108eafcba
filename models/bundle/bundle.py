"""A bundle: one exported version of one model, as a directory (docs/CONTRACTS.md "models/bundle/bundle.py").

```
manifest.json  index.npz  items.npz         always
content.npz                                 optional: the content tower (models/nets/content_tower.py)
encoder.onnx  decoder.onnx                  backend "onnx" (ONNX Runtime)
modules.json  weights.safetensors           backend "torch" (module specs + weights, no pickle)
```

The manifest's ``backends`` (default ``["onnx"]`` for bundles written before it existed) says which
backends the bundle holds; ``files`` must list exactly the files those backends need. A
torch-only bundle is valid: it serves with ``Retriever(..., backend="torch")``
(:mod:`models.bundle.torch_backend` rebuilds the modules from ``modules.json`` and the safetensors).
Optional content (schema_version unchanged): item attributes as three more arrays in
``items.npz`` (:mod:`models.bundle.items`), and ``content.npz``, verified like every file when the
manifest lists it (and refused when present but unlisted).

:func:`load_bundle` verifies everything before anything can serve from it: the schema version,
the size and sha256 of every file, the fingerprint, the index invariants
(:meth:`TreeIndex.validate`) and its agreement with the manifest, the item tables' shapes and
dtypes, and the ONNX graphs' input/output names, element types and ranks. A bad bundle raises
:class:`BundleError` naming the file and what is wrong. Nothing is unpickled (``allow_pickle=False``;
item ids are a fixed-width unicode array).

The writer is :func:`training.export.export_bundle`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from models.bundle.attributes import ItemAttributes
from models.bundle.items import read_items
from models.bundle.torch_files import TORCH_MODULES_FILE, TORCH_WEIGHTS_FILE, check_torch_files
from models.index import SCORE_MODES, IndexValidationError, ScoreMode, TreeIndex
from models.nets.content_tower import CONTENT_FILE, ContentTower

SCHEMA_VERSION = 2
"""2: ``decoder.onnx`` is the incremental step (``cache`` in, ``cache_out`` out; ``dims.cache``)."""
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
INDEX_FILE = "index.npz"
ITEMS_FILE = "items.npz"
BUNDLE_FILES = (ENCODER_FILE, DECODER_FILE, INDEX_FILE, ITEMS_FILE)
"""The files of an ONNX-only bundle (``backends == ["onnx"]``)."""
DATA_FILES = (INDEX_FILE, ITEMS_FILE)
OPTIONAL_FILES = (CONTENT_FILE,)
"""Files a bundle may hold besides its backends' (listed in the manifest when present)."""
BACKEND_FILES: dict[str, tuple[str, ...]] = {
    "onnx": (ENCODER_FILE, DECODER_FILE),
    "torch": (TORCH_MODULES_FILE, TORCH_WEIGHTS_FILE),
}


def bundle_files(backends: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The files a bundle holding ``backends`` must have: the data files, then each backend's."""
    return DATA_FILES + tuple(f for b in BACKEND_FILES if b in backends for f in BACKEND_FILES[b])


# name -> (ONNX element type, rank); the decoder-step and encoder signatures of docs/CONTRACTS.md
_F, _I, _B = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
ONNX_SIGNATURES: dict[str, tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]] = {
    ENCODER_FILE: ({"history": (_I, 2), "history_mask": (_B, 2)}, {"memory": (_F, 3), "query": (_F, 2)}),
    DECODER_FILE: (
        {
            "memory": (_F, 3),
            "memory_mask": (_B, 2),
            "beam_query": (_I, 1),
            "prefix": (_I, 2),
            "candidates": (_I, 2),
            "cache": (_F, 3),
        },
        {"scores": (_F, 2), "cache_out": (_F, 3)},
    ),
}


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


@dataclass(frozen=True)
class Bundle:
    """A verified bundle in memory (the model files stay files: backends open them).

    ``encoder_path`` / ``decoder_path`` name the ONNX graphs even where ``backends`` lacks
    ``"onnx"`` (then the files do not exist and :class:`models.bundle.backend.OnnxBackend` is refused).
    """

    path: Path
    manifest: Manifest
    index: TreeIndex
    item_emb: np.ndarray  # [N+1, Dr] float32, row 0 = 0
    item_ids: np.ndarray  # [N+1] fixed-width unicode raw ids, item_ids[0] == ""
    popularity: np.ndarray  # [N+1] float32, row 0 = 0
    encoder_path: Path
    decoder_path: Path
    item_attributes: ItemAttributes | None = None  # items.npz attr_* arrays, when the data had any
    content: ContentTower | None = None  # content.npz, when the bundle has one

    @property
    def backends(self) -> tuple[str, ...]:
        """Which backends the bundle holds files for: ``"onnx"``, ``"torch"`` or both."""
        return self.manifest.backends

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def num_items(self) -> int:
        return self.manifest.num_items


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
        raise BundleError(
            path,
            f"{MANIFEST}: schema_version {version!r} is not supported (this build reads {SCHEMA_VERSION})",
        )
    for key, typ in _MANIFEST_TYPES.items():
        if key not in raw:
            raise BundleError(path, f"{MANIFEST}: missing key {key!r}")
        if not isinstance(raw[key], typ) or isinstance(raw[key], bool):
            raise BundleError(path, f"{MANIFEST}: {key!r} must be {typ}, got {raw[key]!r}")
    dims = raw["dims"]
    for key in ("memory", "query"):
        if not isinstance(dims.get(key), int) or dims[key] < 1:
            raise BundleError(path, f"{MANIFEST}: dims.{key} must be a positive int, got {dims.get(key)!r}")
    if not isinstance(dims.get("cache"), int) or dims["cache"] < 0:
        raise BundleError(path, f"{MANIFEST}: dims.cache must be an int >= 0, got {dims.get('cache')!r}")
    if raw["score_mode"] not in SCORE_MODES:
        raise BundleError(path, f"{MANIFEST}: unknown score_mode {raw['score_mode']!r}")
    if raw["max_history"] < 1 or raw["num_items"] < 1:
        raise BundleError(path, f"{MANIFEST}: max_history and num_items must be >= 1")
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


def verify_files(path: Path, manifest: Manifest) -> None:
    """Exactly the files of the manifest's backends are listed; each is present, of the listed size
    and sha256; the fingerprint (over all of them) matches."""
    hashes: dict[str, str] = {}
    expected = bundle_files(manifest.backends)
    unexpected = sorted(set(manifest.files) - set(expected) - set(OPTIONAL_FILES))
    if unexpected:
        raise BundleError(
            path, f"{MANIFEST}: files lists {unexpected}, not part of backends {list(manifest.backends)}"
        )
    for name in OPTIONAL_FILES:
        if name not in manifest.files and (path / name).exists():
            raise BundleError(path, f"{name} is present but {MANIFEST} does not list it (no checksum)")
    for name in expected + tuple(f for f in OPTIONAL_FILES if f in manifest.files):
        entry = manifest.files.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError(path, f"{MANIFEST}: files.{name} is missing or has no sha256")
        file = path / name
        if not file.is_file():
            raise BundleError(path, f"{name} is missing")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(
                path,
                f"{name} has {size} bytes, the manifest says {entry.get('bytes')} (truncated or replaced)",
            )
        digest = file_sha256(file)
        if digest != entry["sha256"]:
            raise BundleError(
                path, f"{name} sha256 {digest[:16]}… does not match the manifest's {entry['sha256'][:16]}…"
            )
        hashes[name] = digest
    if bundle_fingerprint(hashes) != manifest.fingerprint:
        raise BundleError(path, f"{MANIFEST}: fingerprint does not match the files' checksums")


def load_index(path: Path, manifest: Manifest) -> TreeIndex:
    try:
        index = TreeIndex.load(path / INDEX_FILE, validate=True)
    except IndexValidationError as exc:
        raise BundleError(path, f"{INDEX_FILE}: {exc}") from exc
    expected = {
        "levels": manifest.levels,
        "num_items": manifest.num_items,
        "token_scheme": manifest.token_scheme,
        "max_branching": manifest.branching,
    }
    for key, value in expected.items():
        if getattr(index, key) != value:
            raise BundleError(
                path, f"{INDEX_FILE}: {key} is {getattr(index, key)!r}, the manifest says {value!r}"
            )
    return index


def load_content(path: Path, manifest: Manifest) -> ContentTower | None:
    """``content.npz`` when the manifest lists it (its checksum verified already), else None."""
    if CONTENT_FILE not in manifest.files:
        return None
    try:
        tower = ContentTower.load(path / CONTENT_FILE)
    except ValueError as exc:
        raise BundleError(path, f"{CONTENT_FILE}: {exc}") from exc
    if tower.dim != manifest.dims["query"]:
        raise BundleError(
            path,
            f"{CONTENT_FILE}: vectors have width {tower.dim}, the manifest's dims.query is {manifest.dims['query']}",
        )
    return tower


def _value_info_signature(values: Any) -> dict[str, tuple[int, list[int | str]]]:
    out = {}
    for v in values:
        tensor = v.type.tensor_type
        dims: list[int | str] = [
            d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim
        ]
        out[v.name] = (tensor.elem_type, dims)
    return out


def verify_onnx(path: Path, name: str, manifest: Manifest) -> None:
    """Input/output names, element types and ranks; static feature dims agree with the manifest."""
    try:
        model = onnx.load(str(path / name), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise BundleError(path, f"{name}: not a readable ONNX model: {exc}") from exc
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise BundleError(
            path, f"{name}: weights must be inside the file, found external data for {external[:3]}"
        )
    want_in, want_out = ONNX_SIGNATURES[name]
    init_names = {t.name for t in model.graph.initializer}
    got_in = _value_info_signature(i for i in model.graph.input if i.name not in init_names)
    got_out = _value_info_signature(model.graph.output)
    for kind, want, got in (("input", want_in, got_in), ("output", want_out, got_out)):
        if set(got) != set(want):
            raise BundleError(path, f"{name}: {kind}s are {sorted(got)}, expected {sorted(want)}")
        for io_name, (elem, rank) in want.items():
            g_elem, g_dims = got[io_name]
            if g_elem != elem or len(g_dims) != rank:
                raise BundleError(
                    path,
                    f"{name}: {kind} {io_name!r} is {onnx.TensorProto.DataType.Name(g_elem)} rank {len(g_dims)}, "
                    f"expected {onnx.TensorProto.DataType.Name(elem)} rank {rank}",
                )
    static = {"memory": manifest.dims["memory"], "query": manifest.dims["query"]}
    static |= {"cache": manifest.dims["cache"], "cache_out": manifest.dims["cache"]}
    for io_name, width in static.items():
        sig = got_in.get(io_name) or got_out.get(io_name)
        if sig is not None and isinstance(sig[1][-1], int) and sig[1][-1] not in (0, width):
            raise BundleError(path, f"{name}: {io_name!r} has width {sig[1][-1]}, the manifest says {width}")


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle directory; raises :class:`BundleError` if anything is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(path, "not a directory")
    manifest = parse_manifest(path)
    verify_files(path, manifest)
    index = load_index(path, manifest)
    try:
        items = read_items(path / ITEMS_FILE, manifest.num_items + 1, manifest.dims["query"])
    except ValueError as exc:
        raise BundleError(path, f"{ITEMS_FILE}: {exc}") from exc
    content = load_content(path, manifest)
    if "onnx" in manifest.backends:
        for name in (ENCODER_FILE, DECODER_FILE):
            verify_onnx(path, name, manifest)
    if "torch" in manifest.backends:
        try:
            check_torch_files(path)
        except ValueError as exc:
            raise BundleError(path, str(exc)) from exc
    return Bundle(
        path=path,
        manifest=manifest,
        index=index,
        item_emb=items.item_emb,
        item_ids=items.item_ids,
        popularity=items.popularity,
        encoder_path=path / ENCODER_FILE,
        decoder_path=path / DECODER_FILE,
        item_attributes=items.attributes,
        content=content,
    )
