"""Bundle -> top-K items: encode, constrained beam search, leaf items, exclusion, rerank.

The offline evaluator and the service call the same :class:`Retriever`, so what is measured
offline is what is served. Everything after encoding is batched tensor work on the device:

1. encode (or take cached :class:`EncoderStates`) -> ``memory [B,T,D]``, ``query [B,Dr]``;
2. :func:`models.search.beam_search` over the device trie, the decoder backend as scorer
   -> the ``b`` best leaves per query;
3. candidates = the items of those leaves (one CSR gather, packed per row without padding
   between leaves), minus excluded items (one batched ``searchsorted``);
4. score candidates by ``query · item_emb`` (gather + ``bmm``), ``topk``.

Work per query is O(beam_size × leaf size + history), never O(N): the trie, the leaf CSR and
the item table are moved to the device once, at construction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.backend import BackendScorer, DecoderBackend
from models.beam_policy import beam_for_k, default_beam, smallest_leaves_cumsum
from models.bundle import Bundle
from models.graph_search import GraphRunner
from models.search import (
    BeamResult,
    BeamState,
    DeviceTrie,
    ScoreMode,
    beam_finish,
    beam_search,
    beam_start,
    beam_step,
)
from models.torch_bundle import bundle_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderStates:
    """The encoder's output for a batch of histories (what the service caches per row)."""

    memory: Tensor  # [B, T, D] float32
    memory_mask: Tensor  # [B, T] bool, True = a real history item
    query: Tensor  # [B, Dr] float32

    @property
    def batch_size(self) -> int:
        return int(self.query.shape[0])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ``i`` without its left padding: ``(memory [t,D], mask [t], query [Dr])`` as numpy."""
        mask = self.memory_mask[i]
        start = int(mask.long().argmax()) if bool(mask.any()) else mask.shape[0] - 1
        return (
            self.memory[i, start:].float().cpu().numpy(),
            mask[start:].cpu().numpy(),
            self.query[i].float().cpu().numpy(),
        )

    @classmethod
    def stack(
        cls, rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], device: str | torch.device = "cpu"
    ) -> EncoderStates:
        """Inverse of :meth:`row` for a batch: left-pads every row to the longest one."""
        if not rows:
            raise ValueError("EncoderStates.stack needs at least one row")
        T = max(m.shape[0] for m, _, _ in rows)
        D = rows[0][0].shape[1]
        memory = np.zeros((len(rows), T, D), np.float32)
        mask = np.zeros((len(rows), T), np.bool_)
        for i, (m, k, _) in enumerate(rows):
            memory[i, T - m.shape[0] :] = m
            mask[i, T - k.shape[0] :] = k
        query = np.stack([q for _, _, q in rows]).astype(np.float32)
        dev = torch.device(device)
        return cls(
            torch.from_numpy(memory).to(dev), torch.from_numpy(mask).to(dev), torch.from_numpy(query).to(dev)
        )


@dataclass(frozen=True)
class RetrievalResult:
    items: np.ndarray  # [B, k] dense ids, 0 where fewer exist
    scores: np.ndarray  # [B, k] float32 inner products, -inf where padded
    num_candidates: np.ndarray  # [B] items in the beam's leaves after exclusion
    leaves: np.ndarray  # [B, b] global leaf node ids from the beam, -1 where fewer exist
    num_scored: np.ndarray  # [B] items scored: all items of the beam's leaves, before exclusion


def check_search_args(k: int, beam_size: int) -> None:
    if k < 1 or beam_size < 1:
        raise ValueError(f"k and beam_size must be >= 1, got k={k}, beam_size={beam_size}")


class StagedSearch:
    """One :meth:`Retriever.search` split into stages: each beam-search level, then the rerank.

    Each :meth:`step` runs one stage and returns its name (``"level1"`` .. ``"levelL"``,
    ``"rerank"``); between two steps the caller may run other work (the service's shadow lane gives
    way to primary batches there). The stages are the one-shot search's
    (:func:`models.search.beam_step` is the body of :func:`beam_search`'s loop), so the result is
    the same. Not thread-safe: one caller steps it at a time (any thread).
    """

    def __init__(
        self,
        retriever: Retriever,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray] | None = None,
    ) -> None:
        check_search_args(k, beam_size)
        self._retriever = retriever
        self._k = k
        self._exclude = exclude
        memory, memory_mask, self._query = retriever._on_device(states)  # [B,T,D], [B,T], [B,Dr]
        self._scorer = retriever._scorer(memory, memory_mask)
        self._beam: BeamState = beam_start(retriever.trie, states.batch_size, beam_size, retriever.score_mode)
        self._result: RetrievalResult | None = None

    @property
    def num_stages(self) -> int:
        """Beam-search levels + the rerank."""
        return self._retriever.trie.levels + 1

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def next_stage(self) -> str:
        """The name of the stage :meth:`step` runs next (``"done"`` when none is left)."""
        if self._result is not None:
            return "done"
        depth = self._beam.depth
        return f"level{depth + 1}" if depth < self._retriever.trie.levels else "rerank"

    def step(self) -> str:
        """Run the next stage; returns its name."""
        trie = self._retriever.trie
        if self._result is not None:
            raise RuntimeError("the staged search is already done")
        if not self._beam.done(trie):
            self._beam = beam_step(trie, self._scorer, self._beam)
            return f"level{self._beam.depth}"
        beam = beam_finish(trie, self._beam)
        self._result = self._retriever.rerank(beam.leaves, self._query, self._k, self._exclude)
        return "rerank"

    def run(self) -> RetrievalResult:
        """The remaining stages in one go."""
        while self._result is None:
            self.step()
        return self._result

    def result(self) -> RetrievalResult:
        if self._result is None:
            raise RuntimeError("the staged search is not done: call step() until done")
        return self._result


class Retriever:
    """Serve a verified bundle. ``backend``: ``"onnx"`` (ONNX Runtime on ``device``), ``"torch"``
    (the modules rebuilt from the bundle's safetensors + specs, :mod:`models.torch_bundle`) or any
    :class:`DecoderBackend` instance, e.g. ``TorchBackend(encoder, decoder)`` as the reference."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        backend: str | DecoderBackend = "onnx",
        *,
        intra_op_threads: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        """``cuda_graphs``: serve :meth:`retrieve` through CUDA graphs of the static-shape search
        (:mod:`models.graph_search`; torch backend on ``cuda`` only, else ignored). On by default:
        the GPU check holds the graphs' items to the eager path's (``graph_parity``), and a capture
        or replay that fails switches them off for this retriever, so eager retrieval answers."""
        self.bundle = bundle
        self.device = torch.device(device)
        if isinstance(backend, str):  # "onnx" | "torch": built from the bundle's own files
            self.backend: DecoderBackend = bundle_backend(bundle, backend, self.device, intra_op_threads)
        else:
            self.backend = backend
        manifest = bundle.manifest
        self.max_history = manifest.max_history
        self.num_items = manifest.num_items
        self.score_mode: ScoreMode = manifest.score_mode
        index = bundle.index
        self.trie = DeviceTrie.from_index(index, self.device)
        self.leaf_start = index.leaf_start
        self.leaf_offsets = torch.as_tensor(index.leaf_offsets, dtype=torch.int64, device=self.device)
        self.leaf_items = torch.as_tensor(index.leaf_items, dtype=torch.int64, device=self.device)
        leaf_sizes = np.diff(index.leaf_offsets)  # [L]
        self.max_leaf_size = int(leaf_sizes.max())
        self._cumsum_smallest = smallest_leaves_cumsum(leaf_sizes)  # [L] for beam_for
        configured = manifest.config.get("beam_size")
        # the bundle's default beam: written at export by the rule of models.beam_policy (bundles
        # exported before it carry a trainer's value, or none: then the rule is applied here)
        self.default_beam_size = (
            int(configured)
            if isinstance(configured, int) and configured >= 1
            else default_beam(self.num_items, leaf_sizes)
        )
        self.item_emb = torch.from_numpy(bundle.item_emb).to(self.device)  # [N+1, Dr]
        use_graphs = cuda_graphs and self.device.type == "cuda" and self.backend.name == "torch"
        self.graphs = GraphRunner(self) if use_graphs else None
        log.info(
            "retriever for %s (%s, %d items, %d leaves, max leaf %d) on %s",
            manifest.name,
            manifest.fingerprint[:12],
            self.num_items,
            index.num_leaves,
            self.max_leaf_size,
            self.backend.device_info,
        )

    @property
    def device_info(self) -> str:
        return self.backend.device_info

    def beam_for(self, k: int, beam_size: int | None, num_excluded: int, max_beam: int | None = None) -> int:
        """The beam answering ``k`` items: ``beam_size`` (``None``: the bundle's default) widened so
        that the beam's leaves hold ``k + num_excluded`` items, within ``max_beam``
        (:func:`models.beam_policy.beam_for_k`)."""
        beam = self.default_beam_size if beam_size is None else beam_size
        return beam_for_k(k, beam, num_excluded, self._cumsum_smallest, max_beam)

    # ------------------------------------------------------------------ encode
    def pad_histories(self, histories: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Keep the ``max_history`` most recent ids, left-pad with 0 -> ``(history [B,T], mask [B,T])``."""
        if len(histories) == 0:
            raise ValueError("histories is empty: need at least one row")
        recent = [np.asarray(h, dtype=np.int64).reshape(-1)[-self.max_history :] for h in histories]
        T = max(1, max(len(h) for h in recent))
        history = np.zeros((len(recent), T), np.int64)  # [B, T]
        for i, h in enumerate(recent):
            if len(h):
                history[i, T - len(h) :] = h
        if history.min() < 0 or history.max() > self.num_items:
            raise ValueError(f"history holds ids outside 0..{self.num_items} (dense ids, 0 = padding)")
        hist = torch.from_numpy(history).to(self.device)
        return hist, hist > 0

    def encode(self, histories: Sequence[np.ndarray]) -> EncoderStates:
        history, mask = self.pad_histories(histories)
        memory, query = self.backend.encode(history, mask)
        return EncoderStates(memory=memory, memory_mask=mask, query=query)

    # ------------------------------------------------------------------ search
    def leaf_candidates(self, leaves: Tensor) -> tuple[Tensor, Tensor]:
        """``leaves [B,b]`` global ids (-1 pad) -> (items [B,C], valid [B,C]); C = max items over rows.

        Items of a row's leaves are packed left to right (no gaps between leaves).
        """
        B, b = leaves.shape
        present = leaves >= 0
        leaf = (leaves - self.leaf_start).clamp(min=0)  # [B, b]
        start = self.leaf_offsets[leaf]  # [B, b]
        count = (self.leaf_offsets[leaf + 1] - start) * present  # [B, b]
        if self.max_leaf_size == 1:  # single-item leaves (SEATER, TDR): a plain gather
            return torch.where(
                present, self.leaf_items[start.clamp(max=self.leaf_items.numel() - 1)], 0
            ), present
        flat_count = count.reshape(-1)  # [B*b]
        total = int(flat_count.sum())
        C = max(1, int(count.sum(dim=1).max()))
        items = torch.zeros(B, C, dtype=torch.int64, device=leaves.device)
        valid = torch.zeros(B, C, dtype=torch.bool, device=leaves.device)
        if total == 0:
            return items, valid
        seg = torch.repeat_interleave(
            torch.arange(B * b, device=leaves.device), flat_count, output_size=total
        )
        seg_first = torch.cumsum(flat_count, 0) - flat_count  # [B*b] first flat slot of each leaf
        within = torch.arange(total, device=leaves.device) - seg_first[seg]  # [total] offset inside its leaf
        row_first = (count.cumsum(dim=1) - count).reshape(-1)  # [B*b] column of each leaf's first item
        row, col = torch.div(seg, b, rounding_mode="floor"), row_first[seg] + within
        items[row, col] = self.leaf_items[start.reshape(-1)[seg] + within]
        valid[row, col] = True
        return items, valid

    def excluded(self, items: Tensor, exclude: Sequence[np.ndarray]) -> Tensor:
        """``items [B,C]`` -> bool ``[B,C]``: item is in its row's exclude list (batched searchsorted)."""
        B = items.shape[0]
        if len(exclude) != B:
            raise ValueError(f"exclude has {len(exclude)} rows, the batch has {B}")
        rows = [np.unique(np.asarray(e, dtype=np.int64).reshape(-1)) for e in exclude]
        E = max(1, max(len(r) for r in rows))
        table = np.full((B, E), np.iinfo(np.int64).max, np.int64)  # [B, E] sorted, padded high
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        sorted_excl = torch.from_numpy(table).to(items.device)
        pos = torch.searchsorted(sorted_excl, items).clamp(max=E - 1)  # [B, C]
        return sorted_excl.gather(1, pos) == items

    def search(
        self, states: EncoderStates, k: int, beam_size: int, exclude: Sequence[np.ndarray] | None = None
    ) -> RetrievalResult:
        check_search_args(k, beam_size)
        return self.rerank(self.beam(states, beam_size).leaves, self._on_device(states)[2], k, exclude)

    def beam(self, states: EncoderStates, beam_size: int) -> BeamResult:
        """The beam search alone: the ``beam_size`` best leaves ``[B,b]`` and their path scores."""
        memory, memory_mask, _ = self._on_device(states)
        scorer = self._scorer(memory, memory_mask)
        return beam_search(self.trie, scorer, states.batch_size, beam_size, self.score_mode)

    def staged_search(
        self, states: EncoderStates, k: int, beam_size: int, exclude: Sequence[np.ndarray] | None = None
    ) -> StagedSearch:
        """The same search as :meth:`search`, run one stage per :meth:`StagedSearch.step` call."""
        return StagedSearch(self, states, k, beam_size, exclude)

    def _on_device(self, states: EncoderStates) -> tuple[Tensor, Tensor, Tensor]:
        """``(memory [B,T,D], memory_mask [B,T], query [B,Dr] float32)`` on the retriever's device."""
        return (
            states.memory.to(self.device),
            states.memory_mask.to(self.device),
            states.query.to(self.device, torch.float32),
        )

    def _scorer(self, memory: Tensor, memory_mask: Tensor) -> BackendScorer:
        """The incremental decoder step over this batch's states (the search carries its cache)."""
        return BackendScorer(self.backend, memory, memory_mask)

    def rerank(
        self, leaves: Tensor, query: Tensor, k: int, exclude: Sequence[np.ndarray] | None
    ) -> RetrievalResult:
        """``leaves [B,b]`` from the beam, ``query [B,Dr]`` -> the top ``k`` items of those leaves by
        ``query · item_emb``, minus ``exclude``."""
        B = leaves.shape[0]
        items, valid = self.leaf_candidates(leaves)  # [B, C]
        num_scored = valid.sum(dim=1)  # [B] before exclusion: every leaf item is scored
        if exclude is not None:
            valid = valid & ~self.excluded(items, exclude)
        scores = torch.bmm(self.item_emb[items], query[:, :, None])[:, :, 0]  # [B, C]
        scores = scores.masked_fill(~valid, float("-inf"))
        kk = min(k, scores.shape[1])
        top_scores, top_idx = torch.topk(scores, kk, dim=1)  # [B, k']
        top_items = items.gather(1, top_idx).masked_fill(~valid.gather(1, top_idx), 0)
        # two device-to-host copies (the first waits for the device), not one per output
        ints = torch.cat([top_items, leaves, valid.sum(dim=1)[:, None], num_scored[:, None]], dim=1).cpu()
        host = ints.numpy()  # [B, k' + b + 2]
        out_items = np.zeros((B, k), np.int64)
        out_scores = np.full((B, k), -np.inf, np.float32)
        out_items[:, :kk] = host[:, :kk]
        out_scores[:, :kk] = top_scores.float().cpu().numpy()
        return RetrievalResult(
            items=out_items,
            scores=out_scores,
            num_candidates=host[:, -2],
            leaves=host[:, kk:-2],
            num_scored=host[:, -1],
        )

    def retrieve(
        self,
        histories: Sequence[np.ndarray],
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray] | None = None,
        *,
        exclude_history: bool = False,
    ) -> RetrievalResult:
        """encode + search; ``exclude_history`` adds each row's (full) history to its exclusions."""
        check_search_args(k, beam_size)
        if exclude_history:
            extra = exclude if exclude is not None else [np.zeros(0, np.int64)] * len(histories)
            exclude = [
                np.concatenate([np.asarray(h, np.int64), np.asarray(e, np.int64)])
                for h, e in zip(histories, extra, strict=True)
            ]
        if self.graphs is not None and len(histories) > 0:
            graphed = self.graphs.retrieve(histories, k, beam_size, exclude)
            if graphed is not None:
                return graphed
        return self.search(self.encode(histories), k, beam_size, exclude)

    def warmup(self, beam_size: int = 8, batch_size: int = 2) -> None:
        """Run one retrieval on dummy histories so that the backends allocate before traffic."""
        histories = [np.arange(1, min(self.num_items, self.max_history) + 1, dtype=np.int64)] * batch_size
        self.retrieve(histories, k=10, beam_size=beam_size)
