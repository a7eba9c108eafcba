"""The torch half of a bundle export: which backends to write, and the safetensors + specs files.

:func:`training.export.writer.export_bundle` calls these. ``backends=None`` (what trainers pass) means
ONNX always, plus the torch files when :func:`models.bundle.torch_backend.describe_modules` knows both
modules; an explicit tuple must be satisfiable (``("torch",)`` skips the ONNX export, which is what
a 10M-item synthetic bundle for a GPU check wants: seconds instead of tens of seconds, and no
dependence on the exporter of the machine's torch).

After writing, the modules are rebuilt from the files alone and run on the export's example
inputs beside the originals: a bundle whose torch files do not reproduce the modules is refused.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from models.bundle.backend import DECODER_INPUTS, ENCODER_INPUTS
from models.bundle.manifest import BACKEND_FILES
from models.bundle.torch_backend import build_modules, describe_modules, save_torch_files
from models.index import TreeIndex

log = logging.getLogger(__name__)

ROUNDTRIP_ATOL = 1e-6
"""Max |rebuilt - original| accepted: same code, same weights, same device, so ~0 is expected."""


class TorchExportError(RuntimeError):
    """The torch files cannot be written or do not reproduce the modules."""


def choose_backends(
    encoder: nn.Module, decoder: nn.Module, index: TreeIndex, backends: Sequence[str] | None
) -> tuple[str, ...]:
    """The backends to write: ``None`` -> onnx (+ torch when describable); else exactly ``backends``."""
    describable = describe_modules(encoder, decoder, index) is not None
    if backends is None:
        if not describable:
            log.info(
                "torch files skipped: %s / %s are not kinds models.bundle.torch_backend can rebuild (ONNX only)",
                type(encoder).__name__,
                type(decoder).__name__,
            )
        return ("onnx", "torch") if describable else ("onnx",)
    chosen = tuple(b for b in BACKEND_FILES if b in backends)
    unknown = set(backends) - set(BACKEND_FILES)
    if unknown or not chosen:
        raise TorchExportError(
            f"backends must be a non-empty subset of {list(BACKEND_FILES)}, got {backends}"
        )
    if "torch" in chosen and not describable:
        raise TorchExportError(
            f"backend 'torch' asked for, but {type(encoder).__name__} / {type(decoder).__name__} are not "
            "kinds models.bundle.torch_backend can rebuild"
        )
    return chosen


@torch.no_grad()
def probe_dims(encoder: nn.Module, inputs: dict[str, Tensor]) -> dict[str, int]:
    """``{"memory": D, "query": Dr}`` from one encoder run on the example inputs."""
    enc = copy.deepcopy(encoder).cpu().eval()
    memory, query = enc(*(inputs[name] for name in ENCODER_INPUTS))  # [B, T, D], [B, Dr]
    return {"memory": int(memory.shape[-1]), "query": int(query.shape[-1])}


@torch.no_grad()
def write_torch_files(
    out: Path, encoder: nn.Module, decoder: nn.Module, index: TreeIndex, inputs: dict[str, Tensor]
) -> float:
    """Write ``modules.json`` + ``weights.safetensors`` into ``out``; returns the round-trip error.

    ``inputs``: the export's example inputs (encoder and decoder-step names, memory of width D).
    """
    specs = describe_modules(encoder, decoder, index)
    if specs is None:
        raise TorchExportError("the modules are not kinds models.bundle.torch_backend can rebuild")
    enc = copy.deepcopy(encoder).cpu().eval()
    dec = copy.deepcopy(decoder).cpu().eval()
    save_torch_files(out, enc, dec, specs)
    new_enc, new_dec = build_modules(out, index)
    ref = enc(*(inputs[name] for name in ENCODER_INPUTS))
    got = new_enc(*(inputs[name] for name in ENCODER_INPUTS))
    errors = [float((r - g).abs().max()) for r, g in zip(ref, got, strict=True)]
    for prefix in (inputs["prefix"], inputs["prefix"][:, :1]):
        step = {**{name: inputs[name] for name in DECODER_INPUTS}, "prefix": prefix}
        ref_scores = dec(*(step[name] for name in DECODER_INPUTS))
        got_scores = new_dec(*(step[name] for name in DECODER_INPUTS))
        errors.append(float((ref_scores - got_scores).abs().max()))
    worst = max(errors)
    if not worst <= ROUNDTRIP_ATOL:
        raise TorchExportError(
            f"modules rebuilt from {out.name}'s torch files disagree with the originals: "
            f"max |diff| {worst:.3g} > {ROUNDTRIP_ATOL}"
        )
    return worst
