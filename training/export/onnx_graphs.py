"""The ONNX graphs of a bundle: ``torch.onnx.export(..., dynamo=True)`` with dynamic batch, history
length, beam count, prefix length (= cached positions + 1) and candidate count, saved as single files
(no external data); ``decoder_memory.onnx`` and ``decoder.onnx`` hold the serving step
(:class:`models.nets.decoder_step.DecoderStep`: the memory state once per batch, then cache in,
cache out per level). :func:`check_parity` holds ONNX Runtime to the torch modules on the example inputs."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from models.bundle.backend import (
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    STATE_INPUTS,
    STEP_INPUTS,
    STEP_OUTPUTS,
    OnnxSession,
    step_inputs,
)
from models.bundle.manifest import DECODER_FILE, DECODER_MEMORY_FILE, ENCODER_FILE, state_names
from models.index import TreeIndex
from models.nets.decoder_step import DecoderStep, MemoryState

log = logging.getLogger(__name__)

OPSET = 20  # 20: Gelu is an ONNX op (ORT runs one kernel instead of five for the decoder's erf-GELU)
PARITY_ATOL = 1e-4
"""Max |ORT - torch| accepted by the post-export check (float32 kernels differ in summation order)."""


class ExportError(RuntimeError):
    """The export failed or its ONNX output disagrees with the torch modules."""


_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch.fx")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The dynamo exporter prints progress lines, warnings and INFO logs; keep them out of CLI output."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def example_inputs(
    index: TreeIndex,
    num_items: int,
    max_history: int,
    dim: int,
    seed: int = 0,
    cache_width: int = 0,
) -> dict[str, Tensor]:
    """Inputs for tracing and the parity check. Dynamic sizes get distinct examples >= 2 so that
    the exporter specialises none of them: B=3, T=min(max_history, 5) (>= 2), Bb=6 (2 beams per
    query, grouped), S=3 with a cache of P=2 positions (even where the tree is shallower: the graph
    must not specialise P), C=max(3, branching). ``beam_query`` is grouped, as the serving step
    requires. The step's memory state is what ``prepare`` computes from ``memory`` (:func:`step_example`)."""
    g = torch.Generator().manual_seed(seed)
    B, T, Bb, S = 3, max(2, min(max_history, 5)), 6, 3
    C = max(3, index.max_branching)
    history = torch.randint(1, num_items + 1, (B, T), generator=g)  # [B, T]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : T // 2] = False  # a left-padded row
    history = history.masked_fill(~mask, 0)
    candidates = torch.randint(0, index.num_nodes, (Bb, C), generator=g)  # [Bb, C]
    candidates[1, C // 2 :] = -1
    return {
        "history": history,
        "history_mask": mask,
        "memory": torch.randn(B, T, dim, generator=g),
        "memory_mask": mask,
        "beam_query": torch.arange(B).repeat_interleave(Bb // B),  # [Bb] grouped by query
        "prefix": torch.randint(0, index.num_nodes, (Bb, S), generator=g),
        "candidates": candidates,
        "cache": torch.randn(Bb, S - 1, cache_width, generator=g),  # [Bb, P, W]
    }


def step_example(step: DecoderStep, ex: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """``decoder.onnx``'s example arguments, in :func:`models.bundle.backend.step_inputs` order: the
    step inputs of ``ex``, then the memory state ``prepare`` computes from ``ex["memory"]``."""
    with torch.no_grad():
        state = step.prepare(ex["memory"])
    return (*(ex[name] for name in STEP_INPUTS), *state)


def step_dynamic_shapes(batch: Dim, seq: Dim, state_count: int) -> tuple[Any, ...]:
    """Dynamic axes of ``decoder.onnx``'s arguments, positional (the memory state is a variable
    number of tensors ``[B,D,T]``): the cache has ``prefix - 1`` positions (a derived dim, so that
    ``cache_out`` has exactly one)."""
    beams, cands, past = Dim("beams"), Dim("cands"), Dim("past", min=0)
    state = tuple({0: batch, 2: seq} for _ in range(state_count))
    return (
        {0: batch, 1: seq},  # memory_mask
        {0: beams},  # beam_query
        {0: beams, 1: past + 1},  # prefix
        {0: beams, 1: cands},  # candidates
        {0: beams, 1: past},  # cache
        state,
    )


def export_onnx(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_shapes: dict[str, dict[int, Any]] | tuple[Any, ...],
) -> None:
    try:
        with _quiet():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                external_data=False,
                opset_version=OPSET,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export of {type(module).__name__} to {path.name} failed: {exc}") from exc
    onnx.checker.check_model(str(path))


def export_graphs(
    out: Path, encoder: nn.Module, decoder: nn.Module, index: TreeIndex, num_items: int, max_history: int
) -> dict[str, Any]:
    """Export ``encoder.onnx``, ``decoder_memory.onnx`` and ``decoder.onnx``; returns dims and the
    parity error measured."""
    enc = copy.deepcopy(encoder).cpu().eval()
    dec = copy.deepcopy(decoder).cpu().eval()
    with torch.no_grad():
        probe = example_inputs(index, num_items, max_history, dim=1)
        memory, query = enc(probe["history"], probe["history_mask"])  # [B, T, D], [B, Dr]
    step = DecoderStep(dec)  # the serving form (cache in, cache out), what decoder.onnx holds
    dims = {"memory": int(memory.shape[-1]), "query": int(query.shape[-1]), **step.dims()}
    ex = example_inputs(index, num_items, max_history, dim=dims["memory"], cache_width=dims["cache"])
    batch, seq = Dim("batch"), Dim("seq")
    export_onnx(
        enc,
        (ex["history"], ex["history_mask"]),
        out / ENCODER_FILE,
        ENCODER_INPUTS,
        ENCODER_OUTPUTS,
        {"history": {0: batch, 1: seq}, "history_mask": {0: batch, 1: seq}},
    )
    export_decoder(step, ex, out, batch, seq)
    error = check_parity(out, enc, step, ex)
    return {"dims": dims, "parity_max_abs_error": error}


def export_decoder(step: DecoderStep, ex: dict[str, Tensor], out: Path, batch: Dim, seq: Dim) -> None:
    """``decoder_memory.onnx`` (:class:`MemoryState`) and ``decoder.onnx`` (the step) of ``step`` into
    ``out``, traced on :func:`example_inputs` ``ex``."""
    export_onnx(
        MemoryState(step),
        (ex["memory"],),
        out / DECODER_MEMORY_FILE,
        STATE_INPUTS,
        state_names(step.state_count),
        {"memory": {0: batch, 1: seq}},
    )
    export_onnx(
        step,
        step_example(step, ex),
        out / DECODER_FILE,
        step_inputs(step.state_count),
        STEP_OUTPUTS,
        step_dynamic_shapes(batch, seq, step.state_count),
    )


def check_parity(out: Path, enc: nn.Module, step: DecoderStep, ex: dict[str, Tensor]) -> float:
    """ONNX Runtime (CPU) vs torch on the example inputs, and on a root-only prefix (S=1, empty
    cache); the step reads the memory state that ``prepare`` computes from the example memory."""
    cpu = torch.device("cpu")
    enc_sess = OnnxSession(out / ENCODER_FILE, cpu, intra_op_threads=1)
    state_sess = OnnxSession(out / DECODER_MEMORY_FILE, cpu, intra_op_threads=1)
    dec_sess = OnnxSession(out / DECODER_FILE, cpu, intra_op_threads=1)
    errors = []
    with torch.no_grad():
        ref = enc(ex["history"], ex["history_mask"])
        got = enc_sess.run({k: ex[k] for k in ENCODER_INPUTS}, {})
        errors += [float((r - g).abs().max()) for r, g in zip(ref, got, strict=True)]
        state = step.prepare(ex["memory"])  # tensors [B, D, T]
        got_state = state_sess.run({"memory": ex["memory"]}, {})
        errors += [float((r - g).abs().max()) for r, g in zip(state, got_state, strict=True)]
        named: dict[str, Tensor] = {**ex, **dict(zip(state_names(len(state)), state, strict=True))}
        for S in sorted({1, ex["prefix"].shape[1]}):
            inputs = {**named, "prefix": ex["prefix"][:, :S], "cache": ex["cache"][:, : S - 1]}
            ref = step(*(inputs[k] for k in step_inputs(len(state))))
            got = dec_sess.run(inputs, {})
            errors += [
                float((r - g).abs().max()) if r.numel() else 0.0 for r, g in zip(ref, got, strict=True)
            ]
    worst = max(errors)
    if not worst <= PARITY_ATOL:
        raise ExportError(
            f"ONNX Runtime disagrees with torch after export: max |diff| {worst:.3g} > {PARITY_ATOL}"
        )
    return worst
