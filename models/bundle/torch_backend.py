"""The torch backend of a bundle: modules rebuilt from JSON specs and safetensors weights.

A bundle with ``"torch"`` among its manifest's ``backends`` holds ``modules.json`` (what to build:
module kind + constructor config, per part) and ``weights.safetensors`` (the state dicts, keys
``encoder.*`` / ``decoder.*``). Nothing is unpickled and no code is named by the bundle: a kind is
one of the module classes of this package listed below, built with its own constructor, then
``load_state_dict(strict=True)`` checks every tensor name and shape.

Kinds (what :func:`describe_modules` recognises; anything else exports ONNX only):

* encoder ``QueryEncoder`` (exactly that class, no subclass) with an item embedding that is an
  ``nn.Embedding`` or a :class:`HashedItemEmbedding`;
* decoder ``TokenDecoder`` with an ``nn.Embedding`` token table whose node rows are the bundle
  index's (:func:`models.nets.decoder.token_rows`), or ``NodeScorer`` (TDR's reference scorer).

:func:`torch_backend` gives the :class:`models.bundle.backend.TorchBackend` a Retriever serves with on
``cpu`` or ``cuda[:i]``; the index arrays a ``TokenDecoder`` needs come from the bundle's index.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.bundle.backend import DecoderBackend, OnnxBackend, TorchBackend
from models.bundle.manifest import BundleError
from models.bundle.torch_files import MODULE_PARTS, TORCH_MODULES_FILE, TORCH_WEIGHTS_FILE, read_specs
from models.index import TreeIndex
from models.nets.decoder import DecoderConfig, NodeScorer, TokenDecoder, token_rows
from models.nets.encoder import EncoderConfig, QueryEncoder

if TYPE_CHECKING:
    from models.bundle.bundle import Bundle

SPEC_VERSION = 1
"""Version of the ``modules.json`` layout; a reader refuses others."""


class HashedItemEmbedding(nn.Module):
    """``[B,T] int64 -> [B,T,D]``: item ``i`` uses row ``i mod (rows-1) + 1``; padding 0 -> row 0 (zero).

    Synthetic bundles use it so that a 10M-item encoder needs no 10M-row table (serving cost
    does not depend on the table's size: a gather is a gather).
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        if rows < 2 or dim < 1:
            raise ValueError(f"HashedItemEmbedding needs rows >= 2 and dim >= 1, got {rows}, {dim}")
        self.rows = rows
        self.table = nn.Embedding(rows, dim, padding_idx=0)

    def forward(self, items: Tensor) -> Tensor:
        hashed = torch.where(items > 0, torch.remainder(items - 1, self.rows - 1) + 1, 0)  # [B, T]
        return self.table(hashed)  # [B, T, D]


# ---------------------------------------------------------------------------- describe (export side)
def describe_embedding(module: nn.Module) -> dict[str, Any] | None:
    if type(module) is nn.Embedding:
        return {
            "kind": "Embedding",
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
        }
    if type(module) is HashedItemEmbedding:
        return {"kind": "HashedItemEmbedding", "rows": module.rows, "dim": module.table.embedding_dim}
    return None


def describe_encoder(encoder: nn.Module) -> dict[str, Any] | None:
    if type(encoder) is not QueryEncoder:
        return None
    items = describe_embedding(encoder.item_embedding)
    if items is None:
        return None
    return {"kind": "QueryEncoder", "config": asdict(encoder.config), "item_embedding": items}


def describe_decoder(decoder: nn.Module, index: TreeIndex) -> dict[str, Any] | None:
    if type(decoder) is TokenDecoder:
        table = describe_embedding(decoder.token_embedding)
        rows = token_rows(index.node_token, index.level_offsets, decoder.config.token_scheme)
        same_rows = np.array_equal(decoder.node_row.cpu().numpy(), rows)
        if table is None or table["kind"] != "Embedding" or not same_rows:
            return None
        return {"kind": "TokenDecoder", "config": asdict(decoder.config), "token_embedding": table}
    if type(decoder) is NodeScorer:
        first, last = decoder.mlp[0], decoder.mlp[-1]
        emb = decoder.node_embedding
        if not (isinstance(first, nn.Linear) and isinstance(last, nn.Linear) and len(decoder.mlp) == 3):
            return None
        return {
            "kind": "NodeScorer",
            "dim": emb.embedding_dim,
            "num_nodes": emb.num_embeddings,
            "hidden": first.out_features,
        }
    return None


def describe_modules(encoder: nn.Module, decoder: nn.Module, index: TreeIndex) -> dict[str, Any] | None:
    """The ``modules.json`` content for these modules, or None when either is not a known kind."""
    enc, dec = describe_encoder(encoder), describe_decoder(decoder, index)
    if enc is None or dec is None:
        return None
    return {"spec_version": SPEC_VERSION, "encoder": enc, "decoder": dec}


def save_torch_files(out: Path, encoder: nn.Module, decoder: nn.Module, specs: dict[str, Any]) -> None:
    """Write ``modules.json`` and ``weights.safetensors`` (float tensors as they are, on CPU)."""
    tensors: dict[str, Tensor] = {}
    for part, module in zip(MODULE_PARTS, (encoder, decoder), strict=True):
        for key, value in module.state_dict().items():
            tensors[f"{part}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(out / TORCH_WEIGHTS_FILE), metadata={"format": "pt"})
    (out / TORCH_MODULES_FILE).write_text(json.dumps(specs, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------- build (load side)
def _config(cls: type, raw: Any, part: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{part} config must be an object, got {raw!r}")
    try:
        return cls(**raw)
    except TypeError as exc:  # unknown or missing keys: a bundle from another version
        raise ValueError(f"{part} config does not fit {cls.__name__}: {exc}") from exc


def build_embedding(spec: Any, part: str) -> nn.Module:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "Embedding":
        return nn.Embedding(spec["num_embeddings"], spec["embedding_dim"], padding_idx=spec["padding_idx"])
    if kind == "HashedItemEmbedding":
        return HashedItemEmbedding(spec["rows"], spec["dim"])
    raise ValueError(f"{part}: unknown embedding kind {kind!r}")


def build_encoder(spec: dict[str, Any]) -> nn.Module:
    if spec["kind"] != "QueryEncoder":
        raise ValueError(f"encoder: unknown kind {spec['kind']!r} (this build knows QueryEncoder)")
    config = _config(EncoderConfig, spec.get("config"), "encoder")
    return QueryEncoder(config, item_embedding=build_embedding(spec.get("item_embedding"), "encoder"))


def build_decoder(spec: dict[str, Any], index: TreeIndex) -> nn.Module:
    if spec["kind"] == "TokenDecoder":
        config = _config(DecoderConfig, spec.get("config"), "decoder")
        table = build_embedding(spec.get("token_embedding"), "decoder")
        return TokenDecoder(config, index.node_token, index.level_offsets, token_embedding=table)
    if spec["kind"] == "NodeScorer":
        return NodeScorer(spec["dim"], spec["num_nodes"], hidden=spec["hidden"])
    raise ValueError(f"decoder: unknown kind {spec['kind']!r} (this build knows TokenDecoder, NodeScorer)")


def build_modules(path: Path, index: TreeIndex) -> tuple[nn.Module, nn.Module]:
    """Rebuild ``(encoder, decoder)`` in eval mode on CPU from a bundle directory's torch files.

    The modules are built on the meta device and take the file's tensors as their own
    (``load_state_dict(assign=True)``): a spec claiming a huge table allocates nothing before its
    tensors are checked against the file, and no random initialisation is spent. Raises :class:`BundleError` naming the file and the problem (unknown kind, config that does
    not fit, a missing / unexpected / misshapen tensor).
    """
    try:
        specs = read_specs(path / TORCH_MODULES_FILE)
        version = json.loads((path / TORCH_MODULES_FILE).read_text()).get("spec_version")
        if version != SPEC_VERSION:
            raise ValueError(f"spec_version {version!r} is not supported (this build reads {SPEC_VERSION})")
        with torch.device("meta"):  # no memory, no random init: every tensor comes from the file
            modules = build_encoder(specs["encoder"]), build_decoder(specs["decoder"], index)
    except (ValueError, KeyError) as exc:
        raise BundleError(path, f"{TORCH_MODULES_FILE}: {exc}") from exc
    try:
        tensors = load_file(str(path / TORCH_WEIGHTS_FILE), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise BundleError(path, f"{TORCH_WEIGHTS_FILE}: cannot read: {exc}") from exc
    for part, module in zip(MODULE_PARTS, modules, strict=True):
        prefix = f"{part}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # missing/unexpected keys or shape mismatches, all listed
            raise BundleError(path, f"{TORCH_WEIGHTS_FILE}: {part} weights do not fit: {exc}") from exc
        unset = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if unset:  # a tensor the constructor makes but the state dict lacks (none of the kinds above)
            raise BundleError(path, f"{TORCH_WEIGHTS_FILE}: {part} tensors {unset[:3]} were not loaded")
        module.eval()
    return modules


def torch_backend(bundle: Bundle, device: str | torch.device = "cpu") -> TorchBackend:
    """The :class:`TorchBackend` of a verified bundle holding the torch files, on ``device``."""
    if "torch" not in bundle.backends:
        raise BundleError(
            bundle.path,
            f"holds no torch modules (backends {list(bundle.backends)}): re-export it with "
            "modules the exporter can describe, or serve it with the onnx backend",
        )
    encoder, decoder = build_modules(bundle.path, bundle.index)
    return TorchBackend(encoder, decoder, device)


BACKENDS = ("onnx", "torch")


def bundle_backend(
    bundle: Bundle, name: str, device: str | torch.device = "cpu", intra_op_threads: int | None = None
) -> DecoderBackend:
    """The backend ``name`` of a verified bundle: ``"onnx"`` (ONNX Runtime; ``intra_op_threads``
    per session) or ``"torch"`` (:func:`torch_backend`). Refuses a backend the bundle has no files for."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: choose one of {BACKENDS} or pass a DecoderBackend instance")
    if name not in bundle.backends:
        raise BundleError(
            bundle.path,
            f"holds no {name} files (backends {list(bundle.backends)}): serve it with another backend",
        )
    if name == "onnx":
        return OnnxBackend.from_bundle(bundle, device, intra_op_threads)
    return torch_backend(bundle, device)
