"""A bundle: one exported version of one model, as a directory (docs/CONTRACTS.md "models/bundle/bundle.py").

```
manifest.json  index.npz  items.npz         always
content.npz                                 optional: the content tower (models/nets/content_tower.py)
encoder.onnx  decoder_memory.onnx          backend "onnx" (ONNX Runtime)
decoder.onnx
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

The writer is :func:`training.export.writer.export_bundle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from models.bundle.attributes import ItemAttributes
from models.bundle.items import read_items
from models.bundle.manifest import (
    DECODER_FILE,
    DECODER_MEMORY_FILE,
    ENCODER_FILE,
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST,
    ONNX_FILES,
    OPTIONAL_FILES,
    BundleError,
    Manifest,
    bundle_files,
    bundle_fingerprint,
    file_sha256,
    onnx_signature,
    parse_manifest,
    state_names,
)
from models.bundle.torch_files import check_torch_files
from models.index import IndexValidationError, TreeIndex
from models.nets.content_tower import CONTENT_FILE, ContentTower


@dataclass(frozen=True)
class Bundle:
    """A verified bundle in memory (the model files stay files: backends open them).

    ``encoder_path`` / ``decoder_memory_path`` / ``decoder_path`` name the ONNX graphs even where ``backends`` lacks
    ``"onnx"`` (then the files do not exist and :class:`models.bundle.backend.OnnxBackend` is refused).
    """

    path: Path
    manifest: Manifest
    index: TreeIndex
    item_emb: np.ndarray  # [N+1, Dr] float32, row 0 = 0
    item_ids: np.ndarray  # [N+1] fixed-width unicode raw ids, item_ids[0] == ""
    popularity: np.ndarray  # [N+1] float32, row 0 = 0
    encoder_path: Path
    decoder_memory_path: Path
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
    want_in, want_out = onnx_signature(name, manifest.dims["memory_states"])
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
    dims = manifest.dims
    # (io name, axis) -> the width the manifest gives it; a memory-state tensor is [B, D, T]
    static = {("memory", -1): dims["memory"], ("query", -1): dims["query"]}
    static |= {("cache", -1): dims["cache"], ("cache_out", -1): dims["cache"]}
    static |= {(name, 1): dims["memory"] for name in state_names(dims["memory_states"])}
    for (io_name, axis), width in static.items():
        sig = got_in.get(io_name) or got_out.get(io_name)
        if sig is not None and isinstance(sig[1][axis], int) and sig[1][axis] not in (0, width):
            raise BundleError(
                path, f"{name}: {io_name!r} has width {sig[1][axis]}, the manifest says {width}"
            )


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
        for name in ONNX_FILES:
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
        decoder_memory_path=path / DECODER_MEMORY_FILE,
        decoder_path=path / DECODER_FILE,
        item_attributes=items.attributes,
        content=content,
    )
