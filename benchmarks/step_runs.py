"""One search's levels run under a timed scorer, for ``genret bench search``'s decoder-step section
(:mod:`benchmarks.step`): the torch step and reference through :class:`TimedScorer` /
:class:`TimedStepScorer`, and ``decoder.onnx`` (the same step exported) under ONNX Runtime at each
graph optimisation level and thread count."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.nets.decoder import TokenDecoder
from models.search.beam import DeviceTrie
from models.search.staged import beam_search


# ---------------------------------------------------------------------------- scorers timed per level
class TimedScorer:
    """A plain (full-prefix) scorer; CPU seconds of its calls, by level (= prefix length)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.seconds: dict[int, float] = defaultdict(float)

    def __call__(self, beam_query: Tensor, prefix: Tensor, candidates: Tensor) -> Tensor:
        start = time.process_time()
        out = self.fn(beam_query, prefix, candidates)
        self.seconds[prefix.shape[1]] += time.process_time() - start
        return out


class TimedStepScorer:
    """A :class:`models.search.beam.StepScorer`; CPU (and wall) seconds of its calls, by level."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.cache_width = inner, inner.cache_width
        self.seconds: dict[int, float] = defaultdict(float)
        self.wall: dict[int, float] = defaultdict(float)

    def step(
        self, beam_query: Tensor, prefix: Tensor, candidates: Tensor, cache: Tensor
    ) -> tuple[Tensor, Tensor]:
        start, wall = time.process_time(), time.perf_counter()
        out = self.inner.step(beam_query, prefix, candidates, cache)
        self.seconds[prefix.shape[1]] += time.process_time() - start
        self.wall[prefix.shape[1]] += time.perf_counter() - wall
        return out


class OrtStep:
    """``decoder.onnx``'s step over fixed encoder states (CPU, numpy in and out); ``state_session``
    (``decoder_memory.onnx``) computes their memory state once, here."""

    def __init__(
        self, state_session: Any, session: Any, memory: Tensor, memory_mask: Tensor, cache_width: int
    ) -> None:
        self.session, self.cache_width = session, cache_width
        state = state_session.run(None, {"memory": memory.numpy()})
        names = [o.name for o in state_session.get_outputs()]
        self.fixed = {**dict(zip(names, state, strict=True)), "memory_mask": memory_mask.numpy()}

    def step(
        self, beam_query: Tensor, prefix: Tensor, candidates: Tensor, cache: Tensor
    ) -> tuple[Tensor, Tensor]:
        feeds = {
            **self.fixed,
            "beam_query": beam_query.numpy(),
            "prefix": prefix.numpy(),
            "candidates": candidates.numpy(),
            "cache": cache.contiguous().numpy(),
        }
        scores, cache_out = self.session.run(["scores", "cache_out"], feeds)
        return torch.from_numpy(scores), torch.from_numpy(cache_out)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median CPU seconds of this process over ``repeats`` runs after one warm-up; (seconds, last result).

    CPU time rather than wall time: the dev host is shared, and wall time there mostly measures the
    wait for a core. With ``--threads 1`` (the default) it equals single-core wall time on an idle host.
    """
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def per_level_ms(
    trie: DeviceTrie, make: Any, B: int, beam: int, repeats: int
) -> tuple[list[float], list[float], Any]:
    """Median per-level CPU ms (and wall ms) of ``repeats`` searches, each with a fresh timed scorer."""
    runs, walls, result = [], [], None
    for i in range(repeats + 1):  # the first run warms up
        scorer = make()
        with torch.inference_mode():
            result = beam_search(trie, scorer, B, beam, "logprob")
        if i:
            runs.append([1e3 * scorer.seconds[s] for s in sorted(scorer.seconds)])
            walls.append(
                [1e3 * scorer.wall[s] for s in sorted(scorer.wall)] if hasattr(scorer, "wall") else []
            )
    cpu = [statistics.median(col) for col in zip(*runs, strict=True)]
    wall = [statistics.median(col) for col in zip(*walls, strict=True)] if walls[0] else []
    return cpu, wall, result


def export_step(decoder: TokenDecoder, memory: Tensor, mask: Tensor, out: Path) -> tuple[Path, Path]:
    """``decoder_memory.onnx`` and ``decoder.onnx`` exactly as a bundle holds them
    (:func:`training.export.onnx_graphs.export_decoder`): their paths."""
    from torch.export import Dim

    from models.bundle.manifest import DECODER_FILE, DECODER_MEMORY_FILE
    from models.nets.decoder_step import DecoderStep
    from training.export.onnx_graphs import export_decoder

    step = DecoderStep(decoder).eval()
    S = 3
    example = {
        "memory": memory[:3],
        "memory_mask": mask[:3],
        "beam_query": torch.arange(3).repeat_interleave(2),
        "prefix": torch.zeros(6, S, dtype=torch.int64),
        "candidates": torch.zeros(6, 4, dtype=torch.int64),
        "cache": torch.zeros(6, S - 1, step.cache_width),
    }
    export_decoder(step, example, out, Dim("batch"), Dim("seq"))
    return out / DECODER_MEMORY_FILE, out / DECODER_FILE


def run_ort(
    decoder: TokenDecoder, trie: DeviceTrie, memory: Tensor, mask: Tensor, args: Any, new_leaves: Tensor
) -> list[dict[str, Any]]:
    """The exported step at each graph optimisation level x intra-op thread count; ``prepare_ms``:
    ``decoder_memory.onnx`` on the batch's memory (once per search), CPU ms, median."""
    from models.bundle.backend import OnnxSession, session_options

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state_path, path = export_step(decoder, memory, mask, Path(tmp))
        for optimization in args.ort_optimizations:
            for threads in args.ort_threads:
                options = session_options(threads, optimization)
                session = OnnxSession(path, torch.device("cpu"), options=options)
                state_session = OnnxSession(state_path, torch.device("cpu"), options=options).session
                feeds = {"memory": memory.numpy()}
                prepare_s, _ = timed(partial(state_session.run, None, feeds), args.repeats)
                ort_step = OrtStep(state_session, session.session, memory, mask, decoder.cache_width)
                cpu, wall, result = per_level_ms(
                    trie, lambda s=ort_step: TimedStepScorer(s), memory.shape[0], args.beam, args.repeats
                )
                rows.append(
                    {
                        "optimization": optimization,
                        "threads": threads,
                        "prepare_ms": 1e3 * prepare_s,
                        "cpu_ms": cpu,
                        "wall_ms": wall,
                        "same_leaves": bool(torch.equal(result.leaves, new_leaves)),
                    }
                )
    return rows
