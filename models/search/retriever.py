"""Bundle -> top-K items: encode, constrained beam search, leaf items, exclusion, rerank.

The offline evaluator and the service call the same :class:`Retriever`, so what is measured
offline is what is served. Everything after encoding is batched tensor work on the device:

1. encode (or take cached :class:`EncoderStates`) -> ``memory [B,T,D]``, ``query [B,Dr]``;
2. the beam search's stages (:mod:`models.search.staged`) over the device trie, the decoder backend as scorer
   -> the ``b`` best leaves per query;
3. candidates = the items of those leaves (one CSR gather, packed per row without padding
   between leaves), minus excluded items (one batched ``searchsorted``);
4. score candidates by ``query · item_emb`` (gather + ``bmm``), ``topk``.

Work per query is O(beam_size × leaf size + history), never O(N): the trie, the leaf CSR and
the item table are moved to the device once, at construction.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from models.bundle.backend import BackendScorer, DecoderBackend
from models.bundle.bundle import Bundle
from models.bundle.manifest import CENTROID_WEIGHTS
from models.bundle.torch_backend import bundle_backend
from models.index import ScoreMode, TreeIndex
from models.search.beam import BeamResult, BeamState, DeviceTrie, beam_start
from models.search.beam_policy import beam_for_k, default_beam, smallest_leaves_cumsum
from models.search.centroid_term import CentroidFusedScorer, CentroidTerm, step_scorer
from models.search.constraints import (
    EXACT_ALLOW_ITEMS,
    ItemLookup,
    fill_rows,
    in_rows,
    item_member,
    node_keys,
)
from models.search.graph_runner import GraphRunner
from models.search.rerank import Candidates, fill_offset, packed_leaf_items
from models.search.retrieval_types import DeviceRows, EncoderStates, RetrievalResult, check_search_args
from models.search.staged import StagedSearch

if TYPE_CHECKING:
    from models.catalogue.catalogue import Catalogue

log = logging.getLogger(__name__)


class Retriever:
    """Serve a verified bundle. ``backend``: ``"onnx"`` (ONNX Runtime on ``device``), ``"torch"``
    (the modules rebuilt from the bundle's safetensors + specs, :mod:`models.bundle.torch_backend`) or any
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
        (:mod:`models.search.graphs`; torch backend on ``cuda`` only, else ignored). On by default:
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
        self.encoder_items = manifest.num_items  # the ids the encoder knows (items added later: not)
        self.score_mode: ScoreMode = manifest.score_mode
        index = bundle.index
        leaf_sizes = np.diff(index.leaf_offsets)  # [L]
        self.catalogue: Catalogue | None = None  # None: the bundle as trained (version 0)
        self.node_alias: Tensor | None = None  # [num_nodes] the node the decoder sees, when any differs
        self.dead_nodes: Tensor | None = None  # [num_nodes] bool: no live item below
        self.item_emb = torch.from_numpy(bundle.item_emb).to(self.device)  # [N+1, Dr]
        self._rows: DeviceRows | None = None  # the growing table, once a catalogue version exists
        self._use_index(index)
        # the rerank's weight on the beam's path score (models.search.rerank), set by the trainer
        self.path_weight = float(manifest.config.get("path_weight", 0.0))  # checked by the manifest
        # the beam's children fused with the query-to-centroid score (models.search.centroid_term)
        self.centroid_term = CentroidTerm.of(
            index, bundle.item_emb, manifest.config.get(CENTROID_WEIGHTS, ()), self.device
        )
        configured = manifest.config.get("beam_size")
        # the bundle's default beam: written at export by the rule of models.search.beam_policy (bundles
        # exported before it carry a trainer's value, or none: then the rule is applied here)
        self.default_beam_size = (
            int(configured)
            if isinstance(configured, int) and configured >= 1
            else default_beam(self.num_items, leaf_sizes)
        )
        use_graphs = cuda_graphs and self.device.type == "cuda" and self.backend.name == "torch"
        self.graphs = GraphRunner(self) if use_graphs else None
        log.info(
            "retriever for %s (%s, %d items, %d leaves, max leaf %d) on %s",
            manifest.name,
            manifest.fingerprint[:12],
            self.encoder_items,
            index.num_leaves,
            self.max_leaf_size,
            self.backend.device_info,
        )

    def _use_index(self, index: TreeIndex, live: np.ndarray | None = None) -> None:
        """Serve ``index`` (the bundle's, or a catalogue version's live tree) on the device."""
        self.num_items = index.num_items
        self.trie = DeviceTrie.from_index(index, self.device)
        self.leaf_start = index.leaf_start
        self.leaf_offsets = torch.as_tensor(index.leaf_offsets, dtype=torch.int64, device=self.device)
        self.leaf_items = torch.as_tensor(index.leaf_items, dtype=torch.int64, device=self.device)
        self.item_leaf = torch.as_tensor(
            index.item_path[:, -1], dtype=torch.int64, device=self.device
        )  # [N+1]
        leaf_sizes = np.diff(index.leaf_offsets)  # [L] (0: a leaf whose items were all removed)
        self.max_leaf_size = max(1, int(leaf_sizes.max()))
        self._cumsum_smallest = smallest_leaves_cumsum(leaf_sizes[leaf_sizes > 0])  # for beam_for
        self.lookup = ItemLookup.of(index, live)
        self.item_live = torch.as_tensor(self.lookup.live, device=self.device)  # [N+1] bool

    def with_catalogue(self, catalogue: Catalogue) -> Retriever:
        """A retriever over ``catalogue`` (a version of this bundle's catalogue) sharing this one's
        backend; this one keeps serving what it served. The device item table grows in the spare
        rows of a shared buffer (:class:`DeviceRows`), so a version costs its new rows, not N; on
        the CPU that buffer is the catalogue's own table (:class:`models.catalogue.catalogue.ItemTable`)."""
        if catalogue.fingerprint != self.bundle.manifest.fingerprint:
            raise ValueError(
                f"catalogue of bundle {catalogue.fingerprint[:12]} cannot serve on {self.bundle.manifest.fingerprint[:12]}"
            )
        out = copy.copy(self)
        out.catalogue = catalogue
        out._use_index(catalogue.index, catalogue.live)
        if self.device.type == "cpu":  # the catalogue's own table serves: no second copy in host memory
            out.item_emb = torch.from_numpy(catalogue.item_emb)  # [N+1, Dr] a view of its buffer
        else:
            rows = self._rows or DeviceRows(self.item_emb)
            out._rows = rows.with_rows(catalogue.item_emb, self.item_emb.shape[0])
            out.item_emb = out._rows.view(catalogue.num_rows)
        alias = catalogue.decoder_node
        out.node_alias = (
            torch.as_tensor(alias, dtype=torch.int64, device=self.device) if catalogue.aliased else None
        )
        dead = catalogue.live_count == 0
        out.dead_nodes = torch.as_tensor(dead, device=self.device) if dead.any() else None
        # the graphs hold their version's tables: the new version's are captured now, before it
        # serves (this runs on the catalogue thread), for every shape the serving runner holds
        out.graphs = self.graphs.for_version(out) if self.graphs is not None else None
        return out

    @property
    def catalogue_version(self) -> int:
        return 0 if self.catalogue is None else self.catalogue.version

    @property
    def device_info(self) -> str:
        return self.backend.device_info

    def beam_for(self, k: int, beam_size: int | None, num_excluded: int, max_beam: int | None = None) -> int:
        """The beam answering ``k`` items: ``beam_size`` (``None``: the bundle's default) widened so
        that the beam's leaves hold ``k + num_excluded`` items, within ``max_beam``
        (:func:`models.search.beam_policy.beam_for_k`)."""
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
        if history.min() < 0 or history.max() > self.encoder_items:
            raise ValueError(
                f"history holds ids outside 0..{self.encoder_items} (dense ids the encoder knows, 0 = padding)"
            )
        hist = torch.from_numpy(history).to(self.device)
        return hist, hist > 0

    def encode(self, histories: Sequence[np.ndarray]) -> EncoderStates:
        history, mask = self.pad_histories(histories)
        memory, query = self.backend.encode(history, mask)
        return EncoderStates(memory=memory, memory_mask=mask, query=query)

    # ------------------------------------------------------------------ search
    def leaf_candidates(self, leaves: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``leaves [B,b]`` global ids (-1 pad) -> (items [B,C], valid [B,C], leaf column [B,C]);
        C = max items over rows, the items of a row's leaves packed left to right
        (:func:`models.search.rerank.packed_leaf_items`)."""
        return packed_leaf_items(
            leaves, self.leaf_start, self.leaf_offsets, self.leaf_items, self.max_leaf_size
        )

    def excluded(self, items: Tensor, exclude: Sequence[np.ndarray]) -> Tensor:
        """``items [B,C]`` -> bool ``[B,C]``: item is in its row's exclude list (batched searchsorted)."""
        return in_rows(items, exclude, "exclude", self.lookup.num_rows)[1]

    def search(
        self,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray] | None = None,
        allow: Sequence[np.ndarray | None] | None = None,
        *,
        fill: bool | Sequence[int] = False,
    ) -> RetrievalResult:
        """Beam search then rerank. ``exclude``: per row, dense ids never to return; ``allow``: per
        row, the only dense ids it may return (``None``: any). Both cut the beam's branches too.
        ``fill``: as :meth:`rerank`. The stages of :meth:`staged_search`, run in one go."""
        return self.staged_search(states, k, beam_size, exclude, allow, fill=fill).run()

    def beam(
        self,
        states: EncoderStates,
        beam_size: int,
        exclude: Sequence[np.ndarray] | None = None,
        allow: Sequence[np.ndarray | None] | None = None,
    ) -> BeamResult:
        """The beam search alone: the ``beam_size`` best leaves ``[B,b]`` and their path scores."""
        memory, memory_mask, query = self.on_device(states)
        start = self.beam_begin(states.batch_size, beam_size, exclude, allow)
        search = StagedSearch(
            self.trie, self.scorer(memory, memory_mask, query), start, lambda found: found, "leaves"
        )
        return search.run()

    def beam_begin(
        self,
        batch_size: int,
        beam_size: int,
        exclude: Sequence[np.ndarray] | None = None,
        allow: Sequence[np.ndarray | None] | None = None,
    ) -> BeamState:
        """The beams at the root, with the catalogue's dead nodes and the rows' constraints cut."""
        keys = node_keys(self.lookup, batch_size, exclude, allow, self.device)
        return beam_start(self.trie, batch_size, beam_size, self.score_mode, self.dead_nodes, keys)

    def staged_search(
        self,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray] | None = None,
        allow: Sequence[np.ndarray | None] | None = None,
        *,
        fill: bool | Sequence[int] = False,
    ) -> StagedSearch[RetrievalResult]:
        """:meth:`search` as stages: one per beam-search level, then the rerank (``"rerank"``)."""
        check_search_args(k, beam_size)
        memory, memory_mask, query = self.on_device(states)  # [B,T,D], [B,T], [B,Dr]
        start = self.beam_begin(states.batch_size, beam_size, exclude, allow)

        def rerank(found: BeamResult) -> RetrievalResult:
            return self.rerank(found, query, k, exclude, allow, fill=fill)

        return StagedSearch(self.trie, self.scorer(memory, memory_mask, query), start, rerank)

    def on_device(self, states: EncoderStates) -> tuple[Tensor, Tensor, Tensor]:
        """``(memory [B,T,D], memory_mask [B,T], query [B,Dr] float32)`` on the retriever's device."""
        return (
            states.memory.to(self.device),
            states.memory_mask.to(self.device),
            states.query.to(self.device, torch.float32),
        )

    def scorer(
        self, memory: Tensor, memory_mask: Tensor, query: Tensor
    ) -> BackendScorer | CentroidFusedScorer:
        """The incremental decoder step over this batch's states ``memory [B,T,D]``, ``memory_mask
        [B,T]``, ``query [B,Dr]`` (the search carries its cache), with the bundle's centroid term."""
        inner = BackendScorer(self.backend, memory, memory_mask, self.node_alias)
        return step_scorer(inner, self.centroid_term, query)

    def candidates(
        self,
        found: BeamResult,
        query: Tensor,
        exclude: Sequence[np.ndarray] | None,
        allow: Sequence[np.ndarray | None] | None = None,
    ) -> Candidates:
        """The items of the beam's leaves (``found``), ``query [B,Dr]``: their inner products and
        their leaves' path scores, minus ``exclude``, within ``allow``."""
        items, valid, cols = self.leaf_candidates(found.leaves)  # [B, C] each
        num_scored = valid.sum(dim=1)  # [B] before exclusion: every leaf item is scored
        if exclude is not None:
            valid = valid & ~self.excluded(items, exclude)
        if allow is not None:
            valid = valid & item_member(items, allow, self.lookup.num_rows)
        ip = torch.bmm(self.item_emb[items], query[:, :, None])[:, :, 0]  # [B, C]
        return Candidates(items, valid, ip, found.scores.float().gather(1, cols), num_scored)

    def rerank(
        self,
        found: BeamResult,
        query: Tensor,
        k: int,
        exclude: Sequence[np.ndarray] | None,
        allow: Sequence[np.ndarray | None] | None = None,
        *,
        fill: bool | Sequence[int] = False,
    ) -> RetrievalResult:
        """The beam's leaves (``found``), ``query [B,Dr]`` -> the top ``k`` items of those leaves by
        the rerank score (:mod:`models.search.rerank`: ``query · item_emb`` plus the bundle's
        ``path_weight`` x the leaf's path score), minus ``exclude``, within ``allow``. ``fill``: a row
        left with fewer than ``k`` (or than its own target, one per row) takes the rest from exact
        search over what it may return (:func:`dense_fill`), merged into its list by score."""
        leaves = found.leaves
        B = leaves.shape[0]
        cands = self.candidates(found, query, exclude, allow)
        scores = cands.scores(self.path_weight)  # [B, C]
        kk = min(k, scores.shape[1])
        top_scores, top_idx = torch.topk(scores, kk, dim=1)  # [B, k']
        top_items = cands.items.gather(1, top_idx).masked_fill(~cands.valid.gather(1, top_idx), 0)
        counts = [cands.valid.sum(dim=1)[:, None], cands.num_scored[:, None]]
        # two device-to-host copies (the first waits for the device), not one per output
        host = torch.cat([top_items, leaves, *counts], dim=1).cpu().numpy()  # [B, k' + b + 2]
        out_items = np.zeros((B, k), np.int64)
        out_scores = np.full((B, k), -np.inf, np.float32)
        out_items[:, :kk] = host[:, :kk]
        out_scores[:, :kk] = top_scores.float().cpu().numpy()
        filled = np.zeros(B, np.int64)
        offset = fill_offset(found.scores.float(), self.path_weight).cpu().numpy()  # [B]

        def complete(targets: Sequence[int]) -> None:  # rows short of their target: exact search
            args = (out_items, out_scores, filled, targets, query, exclude, allow, offset)
            fill_rows(self.lookup, self.item_emb, *args)

        if allow is not None:  # small allow-lists: the exact top-k over them (constraints docstring)
            small = [r for r, a in enumerate(allow) if a is not None and len(a) <= EXACT_ALLOW_ITEMS]
            out_items[small], out_scores[small] = 0, -np.inf
            complete([k if r in small else 0 for r in range(B)])
        if fill is not False:
            complete([k] * B if fill is True else [min(k, int(t)) for t in fill])
        return RetrievalResult(
            items=out_items,
            scores=out_scores,
            num_candidates=host[:, -2],
            leaves=host[:, kk:-2],
            num_scored=host[:, -1],
            dense_filled=filled,
        )

    def retrieve(
        self,
        histories: Sequence[np.ndarray],
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray] | None = None,
        *,
        exclude_history: bool = False,
        allow: Sequence[np.ndarray | None] | None = None,
        fill: bool | Sequence[int] = False,
    ) -> RetrievalResult:
        """encode + search; ``exclude_history`` adds each row's (full) history to its exclusions.
        Histories hold dense ids the encoder knows (items added to the catalogue later: skipped by the caller)."""
        check_search_args(k, beam_size)
        if exclude_history:
            extra = exclude if exclude is not None else [np.zeros(0, np.int64)] * len(histories)
            exclude = [
                np.concatenate([np.asarray(h, np.int64), np.asarray(e, np.int64)])
                for h, e in zip(histories, extra, strict=True)
            ]
        plain = allow is None and fill is False  # the graphs hold exclusions, not allow-lists or the fill
        if self.graphs is not None and len(histories) > 0 and plain:
            graphed = self.graphs.retrieve(histories, k, beam_size, exclude)
            if graphed is not None:
                return graphed
        return self.search(self.encode(histories), k, beam_size, exclude, allow, fill=fill)

    def warmup(self, beam_size: int = 8, batch_size: int = 2) -> None:
        """Run one retrieval on dummy histories so that the backends allocate before traffic."""
        histories = [np.arange(1, min(self.num_items, self.max_history) + 1, dtype=np.int64)] * batch_size
        self.retrieve(histories, k=10, beam_size=beam_size)
