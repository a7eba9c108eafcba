"""CUDA graphs of the static-shape search (:mod:`models.search.graphs`): captured lazily per shape
key, replayed under a lock, recaptured for each catalogue version before it serves.

Two entries, one per kind of input: :meth:`GraphRunner.retrieve` takes histories (the graph
encodes them: :func:`models.search.graphs.static_retrieve`, the in-process path) and
:meth:`GraphRunner.search` takes encoder states (the service's path: states it encoded or took
from its cache; :func:`models.search.graphs.static_search`), with the dense fill done after the
replay for the rows the beam left short (:func:`models.search.constraints.fill_rows`, the same call
the eager rerank makes). Both return ``None`` where a graph cannot serve (batch over
``max_batch``, too many candidates or exclusions for static shapes, an empty catalogue, graphs
disabled after a failed capture, or ``MAX_GRAPHS`` shapes held): the caller runs the eager path.

``capture=False`` runs the same static functions eagerly, with no graph: on the CPU the tests hold
the runner's answers (packing, padding, the fill, the unpacking) to the eager retriever's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from models.search.constraints import fill_rows
from models.search.graphs import (
    EXCLUDE_PAD,
    StaticTables,
    bucket,
    pack_requests,
    pack_states,
    static_retrieve,
    static_search,
    unpack_result,
)
from models.search.retrieval_types import RetrievalResult

if TYPE_CHECKING:
    from models.search.constraints import ItemLookup
    from models.search.retrieval_types import EncoderStates

log = logging.getLogger(__name__)

MAX_GRAPHS = 64
"""Captured shapes kept per retriever; further shapes run eagerly (each graph holds its own buffers)."""
MAX_STATIC_CANDIDATES = 1 << 16
"""Largest ``beam * max_leaf`` served by a graph (the fixed candidate layout grows with the largest leaf)."""
MAX_STATIC_EXCLUDE = 512
"""Widest exclusion table served by a graph (:func:`static_blocked_keys` holds ``B x E x E``)."""

Key = tuple[str, int, int, int, int, int]  # (input "histories" | "states", rows, T, E, k, beam)


class RunnerTables(StaticTables, Protocol):
    """What the runner reads besides the static search's tables: the host-side lookup of the fill."""

    lookup: ItemLookup


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly (capture=False)
    inputs: tuple[Tensor, ...]  # the static inputs the graph reads
    ints: Tensor  # [B, k+b+2] static outputs the graph writes
    scores: Tensor  # [B, k+1] scores | fill offset


class GraphRunner:
    """The static-shape search over ``tables`` (module docstring)."""

    def __init__(self, tables: RunnerTables, max_batch: int = 1024, *, capture: bool = True) -> None:
        if capture and (tables.device.type != "cuda" or tables.backend.name != "torch"):
            raise ValueError("CUDA graphs need the torch backend on a cuda device")
        self.tables = tables
        self.max_batch = max_batch
        self.capture = capture
        self.graphs: dict[Key, Captured] = {}
        self.disabled: str | None = None  # why graphs stopped serving (a failed capture)
        self._lock = threading.Lock()

    def serves(self, batch: int, beam_size: int) -> bool:
        """Whether a batch of ``batch`` rows at ``beam_size`` may go through a graph (exclusions and
        new shapes can still send it to the eager path)."""
        r = self.tables
        return (
            self.disabled is None
            and 1 <= batch <= self.max_batch
            and beam_size * r.max_leaf_size <= MAX_STATIC_CANDIDATES
            and r.leaf_items.numel() > 0  # every item removed: the eager path answers empty lists
        )

    def retrieve(
        self, histories: Sequence[np.ndarray], k: int, beam_size: int, exclude: Sequence[np.ndarray] | None
    ) -> RetrievalResult | None:
        """Encode + search ``histories`` through a graph (``None``: run the eager path)."""
        r = self.tables
        B = len(histories)
        if not self.serves(B, beam_size):
            return None
        packed = pack_requests(histories, exclude, bucket(B), r.max_history, r.encoder_items)
        E = packed.shape[1] - r.max_history
        if E > MAX_STATIC_EXCLUDE:
            return None
        key: Key = ("histories", packed.shape[0], r.max_history, E, k, beam_size)
        out = self._run(key, (torch.from_numpy(packed).to(r.device),))
        return None if out is None else unpack_result(out[0], out[1], B, k)

    def search(
        self,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray] | None,
        fill: bool | Sequence[int] = False,
    ) -> RetrievalResult | None:
        """:meth:`models.search.retriever.Retriever.search` without allow-lists, through a graph
        (``None``: run the eager path). ``fill``: as there, done after the replay."""
        r = self.tables
        B = states.batch_size
        if not self.serves(B, beam_size) or states.memory.shape[1] > r.max_history:
            return None
        widest = max((len(np.unique(e)) for e in exclude), default=1) if exclude is not None else 1
        if bucket(widest) > MAX_STATIC_EXCLUDE:
            return None
        inputs = pack_states(states, exclude, bucket(B), r.max_history, r.device)
        key: Key = ("states", inputs[0].shape[0], r.max_history, inputs[3].shape[1], k, beam_size)
        out = self._run(key, inputs)
        if out is None:
            return None
        found = unpack_result(out[0], out[1], B, k)
        items, scores = np.array(found.items), np.array(found.scores)  # [B, k] writable copies
        filled = np.zeros(B, np.int64)
        if fill is not False:
            targets = [k] * B if fill is True else [min(k, int(t)) for t in fill]
            query = inputs[2][:B]  # [B, Dr] float32 on the device
            offset = out[1][:B, k]  # [B] the rows' fill offsets (static_rerank)
            fill_rows(r.lookup, r.item_emb, items, scores, filled, targets, query, exclude, None, offset)
        return RetrievalResult(
            items=items,
            scores=scores,
            num_candidates=found.num_candidates,
            leaves=found.leaves,
            num_scored=found.num_scored,
            dense_filled=filled,
        )

    def for_version(self, tables: RunnerTables) -> GraphRunner | None:
        """A runner over another catalogue version's ``tables`` with this runner's shapes captured
        already (call it before that version serves: the captures run on the caller's thread).
        ``None`` when graphs are off here (a failed capture stays failed for the bundle)."""
        if self.disabled:
            return None
        out = GraphRunner(tables, self.max_batch, capture=self.capture)
        with self._lock:
            held = list(self.graphs.items())
        for key, cap in held:
            fresh = out._capture(key, tuple(torch.zeros_like(t) for t in cap.inputs))
            if fresh is None:
                return None
            out.graphs[key] = fresh
        if held:
            log.info("captured %d CUDA graphs for a new catalogue version", len(held))
        return out

    # ------------------------------------------------------------------ capture and replay
    def _fn(self, key: Key) -> Callable[..., tuple[Tensor, Tensor]]:
        kind, _, T, _, k, beam = key
        if kind == "histories":
            return lambda packed: static_retrieve(self.tables, packed, T, k, beam)
        return lambda memory, mask, query, excl: static_search(
            self.tables, memory, mask, query, excl, k, beam
        )

    def _run(self, key: Key, inputs: tuple[Tensor, ...]) -> tuple[np.ndarray, np.ndarray] | None:
        """The static search of ``inputs`` (replayed, or run eagerly) -> host ``(ints, scores)``."""
        if not self.capture:
            with torch.inference_mode():
                ints, scores = self._fn(key)(*inputs)
            return ints.cpu().numpy(), scores.cpu().numpy()
        with self._lock:
            cap = self.graphs.get(key)
            if cap is None:
                if len(self.graphs) >= MAX_GRAPHS:
                    return None
                cap = self._capture(key, tuple(torch.zeros_like(t) for t in inputs))
                if cap is None:
                    return None
                self.graphs[key] = cap
            try:
                with torch.inference_mode():  # the static buffers were made as inference tensors
                    for static, given in zip(cap.inputs, inputs, strict=True):
                        static.copy_(given)
                    assert cap.graph is not None
                    cap.graph.replay()
                    return cap.ints.cpu().numpy(), cap.scores.cpu().numpy()  # the sync
            except RuntimeError as exc:  # a replay that fails must not fail the request
                self.disabled = f"replay of {key} failed: {type(exc).__name__}: {exc}"[:500]
                log.warning("CUDA graphs disabled, eager search serves: %s", self.disabled)
                return None

    def _capture(self, key: Key, inputs: tuple[Tensor, ...]) -> Captured | None:
        """Capture ``key``'s static search over ``inputs`` (blank buffers of its shapes)."""
        if not self.capture:
            return Captured(graph=None, inputs=inputs, ints=inputs[0], scores=inputs[0])
        T = key[2]
        dev = self.tables.device
        fn = self._fn(key)
        try:
            with torch.inference_mode():
                inputs = tuple(t.clone() for t in inputs)
                excl = inputs[0][:, T:] if key[0] == "histories" else inputs[3]
                excl.fill_(int(EXCLUDE_PAD))  # blank exclusion tables: sorted, padded high
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):  # warm-up off the capture: lazy init, kernel choice
                    for _ in range(2):
                        fn(*inputs)
                torch.cuda.current_stream(dev).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    ints, scores = fn(*inputs)
        except RuntimeError as exc:  # e.g. an op that syncs the host: serve eagerly from now on
            self.disabled = f"capture of {key} failed: {type(exc).__name__}: {exc}"[:500]
            log.warning("CUDA graphs disabled, eager search serves: %s", self.disabled)
            torch.cuda.synchronize(dev)
            return None
        log.info("captured a CUDA graph for %s", key)
        return Captured(graph=graph, inputs=inputs, ints=ints, scores=scores)
