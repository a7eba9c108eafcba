"""Decoder backends: a small interface in front of the fast path.

:class:`OnnxBackend` runs ``encoder.onnx`` / ``decoder.onnx`` with ONNX Runtime (serving);
:class:`TorchBackend` runs the PyTorch modules (the reference the ONNX path is tested against).
Both take and return torch tensors on the Retriever's device, so beam search and rerank never
leave the device between decoder steps.

The search calls :meth:`DecoderBackend.prepare` once per batch (the cross-attention keys/values of
the encoder memory) and :meth:`DecoderBackend.step` at every level, the serving form of the decoder
step (:mod:`models.nets.decoder_step`: one new prefix position per level, the others' self-attention
keys/values cached); :meth:`DecoderBackend.score` is the full-prefix form (the reference).

Provider choice is explicit and logged: ``device="cuda[:i]"`` asks for the CUDA execution
provider (with IO binding on torch CUDA tensors: no host round trip) and fails loudly if ONNX
Runtime cannot give it; ``device="cpu"`` uses the CPU provider. ``device_info`` says what runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from models.bundle.manifest import state_names
from models.nets.decoder_step import DecoderStep

if TYPE_CHECKING:
    from models.bundle.bundle import Bundle

log = logging.getLogger(__name__)

ENCODER_INPUTS = ("history", "history_mask")
ENCODER_OUTPUTS = ("memory", "query")
DECODER_INPUTS = ("memory", "memory_mask", "beam_query", "prefix", "candidates")
"""The reference (full-prefix) decoder step's inputs, ``nn.Module.forward`` order."""
DECODER_OUTPUTS = ("scores",)
STATE_INPUTS = ("memory",)
"""``decoder_memory.onnx``'s input (:meth:`models.nets.decoder_step.DecoderStep.prepare`); its outputs
are :func:`state_names`."""
STEP_INPUTS = ("memory_mask", "beam_query", "prefix", "candidates", "cache")
"""``decoder.onnx``'s inputs before the memory state's (:func:`step_inputs`), :class:`models.nets.decoder_step.DecoderStep` order."""
STEP_OUTPUTS = ("scores", "cache_out")


def step_inputs(state_count: int) -> tuple[str, ...]:
    """``decoder.onnx``'s inputs, in order: :data:`STEP_INPUTS`, then the memory state's."""
    return (*STEP_INPUTS, *state_names(state_count))


@runtime_checkable
class DecoderBackend(Protocol):
    name: str
    device_info: str
    cache_width: int
    """W of the step's cache (0: a stateless scorer)."""

    def encode(self, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``history[B,T] int64, mask[B,T] bool -> memory[B,T,D], query[B,Dr]`` (float32)."""
        ...

    def score(
        self, memory: Tensor, memory_mask: Tensor, beam_query: Tensor, prefix: Tensor, candidates: Tensor
    ) -> Tensor:
        """``-> scores[Bb,C]`` float32; padded candidates (-1) get a large negative score."""
        ...

    def prepare(self, memory: Tensor) -> tuple[Tensor, ...]:
        """``memory[B,T,D] -> memory_state`` (float32 tensors ``[B,D,T]``), once per batch before its steps."""
        ...

    def step(
        self,
        memory_state: tuple[Tensor, ...],
        memory_mask: Tensor,
        beam_query: Tensor,
        prefix: Tensor,
        candidates: Tensor,
        cache: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """``cache[Bb,S-1,W] -> (scores[Bb,C], cache_out[Bb,1,W])``, beams grouped by query."""
        ...


class TorchBackend:
    """The PyTorch reference: runs the encoder and decoder modules in eval mode, no grad."""

    name = "torch"

    def __init__(self, encoder: nn.Module, decoder: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.decoder = decoder.to(self.device).eval()
        self.step_module = DecoderStep(self.decoder)
        self.cache_width = self.step_module.cache_width
        self.device_info = f"torch {torch.__version__} on {self.device}"
        log.info("decoder backend: %s", self.device_info)

    @torch.inference_mode()
    def encode(self, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        memory, query = self.encoder(history.to(self.device), mask.to(self.device))
        return memory.float(), query.float()

    @torch.inference_mode()
    def score(
        self, memory: Tensor, memory_mask: Tensor, beam_query: Tensor, prefix: Tensor, candidates: Tensor
    ) -> Tensor:
        return self.decoder(memory, memory_mask, beam_query, prefix, candidates).float()

    @torch.inference_mode()
    def prepare(self, memory: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.float() for t in self.step_module.prepare(memory.to(self.device)))

    @torch.inference_mode()
    def step(
        self,
        memory_state: tuple[Tensor, ...],
        memory_mask: Tensor,
        beam_query: Tensor,
        prefix: Tensor,
        candidates: Tensor,
        cache: Tensor,
    ) -> tuple[Tensor, Tensor]:
        scores, cache_out = self.step_module(
            memory_mask, beam_query, prefix, candidates, cache, *memory_state
        )
        return scores.float(), cache_out


@dataclass(frozen=True)
class OnnxPaths:
    """A bundle's three graphs."""

    encoder: Path
    decoder_memory: Path
    decoder: Path


@dataclass(frozen=True)
class OnnxDims:
    """The widths that size the graphs' outputs (the manifest's ``dims``)."""

    memory: int
    """D: encoder memory."""
    query: int
    """Dr: the query vector the rerank reads."""
    states: int
    """n: tensors of the decoder's memory state (``decoder_memory.onnx``'s outputs, each ``[B,D,T]``)."""
    cache: int = 0
    """W: the step's per-position cache."""


_NUMPY_DTYPE = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_}


GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
"""ORT graph optimisation levels by name (``genret bench search`` measures them; serving uses ``all``)."""


def session_options(
    intra_op_threads: int | None, optimization: str = "all", profile_prefix: str | None = None
) -> ort.SessionOptions:
    """``optimization``: a key of :data:`GRAPH_OPTIMIZATION`; ``profile_prefix``: write an ORT
    profile (JSON trace) under that file prefix (for ``genret bench search --profile``)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = GRAPH_OPTIMIZATION[optimization]
    if intra_op_threads is not None:
        opts.intra_op_num_threads = intra_op_threads
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


class OnnxSession:
    """One ``InferenceSession`` with named inputs/outputs; torch tensors in and out.

    On CUDA, inputs and outputs are bound to torch CUDA memory (IO binding); ``out_shapes``
    tells the output shapes, which the caller knows from the inputs.
    """

    def __init__(
        self,
        path: Path,
        device: torch.device,
        intra_op_threads: int | None = None,
        options: ort.SessionOptions | None = None,
    ) -> None:
        self.path = path
        self.device = device
        if device.type == "cuda":
            cuda_options = {"device_id": device.index or 0}
            providers: list = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
        elif device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"ONNX backend supports devices 'cpu' and 'cuda[:i]', got {device}")
        opts = options if options is not None else session_options(intra_op_threads)
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        if device.type == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeError(
                f"{path.name}: device {device} asked for CUDAExecutionProvider but ONNX Runtime "
                f"gave {self.session.get_providers()} (is onnxruntime-gpu installed with matching CUDA?)"
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, Tensor], out_shapes: Mapping[str, tuple[int, ...]]) -> list[Tensor]:
        if self.device.type == "cuda":
            return self._run_bound(inputs, out_shapes)
        feeds = {name: inputs[name].detach().cpu().numpy() for name in self.input_names}
        outs = self.session.run(self.output_names, feeds)
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in outs]

    def _run_bound(
        self, inputs: Mapping[str, Tensor], out_shapes: Mapping[str, tuple[int, ...]]
    ) -> list[Tensor]:
        binding = self.session.io_binding()
        device_id = self.device.index or 0
        keep: list[Tensor] = []  # contiguous copies must outlive run_with_iobinding
        for name in self.input_names:
            t = inputs[name].to(self.device).contiguous()
            keep.append(t)
            if t.numel() == 0:  # e.g. the level-1 step's empty cache: no device buffer to point at
                binding.bind_cpu_input(name, np.empty(tuple(t.shape), _NUMPY_DTYPE[t.dtype]))
            else:
                binding.bind_input(
                    name, "cuda", device_id, _NUMPY_DTYPE[t.dtype], tuple(t.shape), t.data_ptr()
                )
        outs = []
        for name in self.output_names:
            out = torch.empty(out_shapes[name], dtype=torch.float32, device=self.device)
            if out.numel() == 0:  # e.g. a stateless scorer's cache_out: nothing to write, let ORT allocate
                binding.bind_output(name, "cuda", device_id)
            else:
                binding.bind_output(name, "cuda", device_id, np.float32, tuple(out.shape), out.data_ptr())
            outs.append(out)
        # torch kernels that wrote the inputs run on torch's stream, not ORT's
        torch.cuda.synchronize(self.device)
        self.session.run_with_iobinding(binding)  # ORT synchronises its stream before returning
        return outs


class OnnxBackend:
    """``encoder.onnx``, ``decoder_memory.onnx`` and ``decoder.onnx`` of a bundle with ONNX Runtime.

    The sizes (:class:`OnnxDims`) come from the manifest; they size the IO-bound outputs.
    """

    name = "onnx"

    def __init__(
        self,
        paths: OnnxPaths,
        dims: OnnxDims,
        device: str | torch.device = "cpu",
        intra_op_threads: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dims = dims
        self.cache_width = dims.cache
        self.encoder = OnnxSession(paths.encoder, self.device, intra_op_threads)
        self.memory_state = OnnxSession(paths.decoder_memory, self.device, intra_op_threads)
        self.decoder = OnnxSession(paths.decoder, self.device, intra_op_threads)
        self.provider = self.encoder.provider
        self.device_info = f"onnxruntime {ort.__version__} {self.provider} on {self.device}"
        log.info("decoder backend: %s", self.device_info)

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, device: str | torch.device = "cpu", intra_op_threads: int | None = None
    ) -> OnnxBackend:
        """The backend of a loaded (verified) bundle."""
        dims = bundle.manifest.dims
        sizes = OnnxDims(
            memory=int(dims["memory"]),
            query=int(dims["query"]),
            states=int(dims["memory_states"]),
            cache=int(dims["cache"]),
        )
        paths = OnnxPaths(bundle.encoder_path, bundle.decoder_memory_path, bundle.decoder_path)
        return cls(paths, sizes, device=device, intra_op_threads=intra_op_threads)

    def encode(self, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        B, T = history.shape
        memory, query = self.encoder.run(
            {"history": history.to(torch.int64), "history_mask": mask.to(torch.bool)},
            {"memory": (B, T, self.dims.memory), "query": (B, self.dims.query)},
        )
        return memory.to(self.device), query.to(self.device)

    def prepare(self, memory: Tensor) -> tuple[Tensor, ...]:
        B, T, D = memory.shape
        shapes = {name: (B, D, T) for name in state_names(self.dims.states)}
        state = self.memory_state.run({"memory": memory.to(torch.float32)}, shapes)
        return tuple(t.to(self.device) for t in state)

    def step(
        self,
        memory_state: tuple[Tensor, ...],
        memory_mask: Tensor,
        beam_query: Tensor,
        prefix: Tensor,
        candidates: Tensor,
        cache: Tensor,
    ) -> tuple[Tensor, Tensor]:
        scores, cache_out = self.decoder.run(
            {
                **{
                    name: t.to(torch.float32)
                    for name, t in zip(state_names(len(memory_state)), memory_state, strict=True)
                },
                "memory_mask": memory_mask.to(torch.bool),
                "beam_query": beam_query.to(torch.int64),
                "prefix": prefix.to(torch.int64),
                "candidates": candidates.to(torch.int64),
                "cache": cache.to(torch.float32),
            },
            {"scores": tuple(candidates.shape), "cache_out": (prefix.shape[0], 1, self.cache_width)},
        )
        return scores.to(self.device), cache_out.to(self.device)

    def score(
        self, memory: Tensor, memory_mask: Tensor, beam_query: Tensor, prefix: Tensor, candidates: Tensor
    ) -> Tensor:
        """The full-prefix form through the graph: one step per prefix position (beams grouped by query)."""
        return replay_prefix(self, memory, memory_mask, beam_query, prefix, candidates)


def replay_prefix(
    backend: DecoderBackend,
    memory: Tensor,
    memory_mask: Tensor,
    beam_query: Tensor,
    prefix: Tensor,
    candidates: Tensor,
) -> Tensor:
    """``score`` from ``prepare`` and ``step``: positions ``0..S-1`` one at a time, caching each
    -> ``scores[Bb,C]``. The positions before the last are scored against ``candidates[:, :1]``
    (their scores are dropped)."""
    Bb, S = prefix.shape
    state = backend.prepare(memory)  # tensors [B, D, T]
    cache = torch.zeros(Bb, 0, backend.cache_width, device=memory.device)  # [Bb, 0, W]
    for s in range(1, S):
        _, out = backend.step(state, memory_mask, beam_query, prefix[:, :s], candidates[:, :1], cache)
        cache = torch.cat([cache, out], dim=1)  # [Bb, s, W]
    scores, _ = backend.step(state, memory_mask, beam_query, prefix, candidates, cache)
    return scores


class BackendScorer:
    """The search's :class:`models.search.beam.StepScorer` over one batch's encoder states."""

    def __init__(
        self, backend: DecoderBackend, memory: Tensor, memory_mask: Tensor, node_alias: Tensor | None = None
    ) -> None:
        """``node_alias [num_nodes]``: the node the decoder sees for each node of a grown catalogue
        (added leaves reach it as an existing node: :mod:`models.catalogue.catalogue`); ``None``: identity.
        The memory state (cross-attention keys/values) is computed here, once for all levels."""
        self.backend, self.memory, self.memory_mask = backend, memory, memory_mask
        self.memory_state = backend.prepare(memory)  # tensors [B, D, T]
        self.cache_width = backend.cache_width
        self.node_alias = node_alias

    def _seen(self, prefix: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
        alias = self.node_alias
        if alias is None:
            return prefix, candidates
        return alias[prefix], torch.where(candidates >= 0, alias[candidates.clamp(min=0)], candidates)

    def step(
        self, beam_query: Tensor, prefix: Tensor, candidates: Tensor, cache: Tensor
    ) -> tuple[Tensor, Tensor]:
        prefix, candidates = self._seen(prefix, candidates)
        return self.backend.step(self.memory_state, self.memory_mask, beam_query, prefix, candidates, cache)

    def __call__(self, beam_query: Tensor, prefix: Tensor, candidates: Tensor) -> Tensor:
        """The reference form (full prefix), e.g. to compare against the step."""
        prefix, candidates = self._seen(prefix, candidates)
        return self.backend.score(self.memory, self.memory_mask, beam_query, prefix, candidates)
