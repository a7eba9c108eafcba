"""Static-shape retrieval, the search that CUDA graphs capture (the serving hot path on ``cuda``).

Why: eager retrieval on a GPU launches a few hundred small kernels per batch from Python (the
encoder, one decoder step per level, the top-k of every level, the rerank) and reads counts back
to size the rerank; at serving batch sizes each kernel runs for microseconds, so a batch costs
its launch overhead and host syncs, flat in the batch size. A CUDA graph records the kernel
sequence once per shape and replays it with one launch and no host round trip inside.

A graph needs static shapes and no host reads, so :func:`static_retrieve` is the retrieval with:

* the batch padded up to a power-of-two bucket (padded rows: empty histories, results dropped);
* histories left-padded to ``max_history`` (the encoder counts positions from the most recent
  item and masks padding, so extra left padding leaves the outputs unchanged);
* exclusions as a sorted ``[B, E]`` table padded with ``int64`` max, ``E`` a power of two;
* rerank candidates in a fixed ``[B, b * max_leaf]`` layout (the eager path packs them left,
  which needs the counts on the host; the candidate *sets* are the same).

History and exclusion table travel in one ``int64`` host array (one host-to-device copy), the
outputs in two device-to-host copies. :func:`static_search` is the same search from encoder states
(:func:`pack_states`: the service's path, states encoded or taken from its cache). Both are plain
tensor code: they run eagerly on any device (the tests hold them to
:meth:`models.search.retriever.Retriever.retrieve` / ``search`` on the CPU), and
:class:`models.search.graph_runner.GraphRunner` captures them per shape key on ``cuda``.

Catalogue versions (docs/live_catalogue.md): the static search reads a version's dead nodes (no
live item below: never expanded), its decoder aliases (an added leaf scored as an existing node)
and its live items (a removed item neither fills nor empties a leaf), all as tensors of fixed
shape per version. A graph holds the tables of the version it was captured on, so
:meth:`models.search.graph_runner.GraphRunner.for_version` captures the next version's graphs, for every shape the serving
runner holds, before that version is swapped in (:meth:`models.search.retriever.Retriever.with_catalogue`
runs on the catalogue thread, off the request path): every version serves at version 0's speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from models.bundle.backend import BackendScorer
from models.index import ScoreMode
from models.search.beam import DeviceTrie, NodeKeys, beam_start
from models.search.centroid_term import CentroidTerm, step_scorer
from models.search.rerank import fill_offset, fused_scores
from models.search.retrieval_types import EncoderStates, RetrievalResult
from models.search.staged import StagedSearch

if TYPE_CHECKING:
    from models.bundle.backend import DecoderBackend
    from models.search.beam import BeamResult

EXCLUDE_PAD = np.iinfo(np.int64).max
"""Pads the sorted exclusion table (never a dense item id)."""


class StaticTables(Protocol):
    """What the static-shape search reads of a retriever (:class:`models.search.retriever.Retriever`
    has all of it): the backend, the device trie and the leaf and item tables."""

    backend: DecoderBackend
    trie: DeviceTrie
    score_mode: ScoreMode
    device: torch.device
    max_history: int
    encoder_items: int  # the ids the encoder knows (items added later: never in a history)
    num_items: int
    max_leaf_size: int
    leaf_start: int
    leaf_offsets: Tensor  # [num_leaves + 1]
    leaf_items: Tensor  # [num items in leaves]
    item_leaf: Tensor  # [N+1] global id of each item's leaf
    item_live: Tensor  # [N+1] bool: may be returned (row 0 and removed items: False)
    item_emb: Tensor  # [N+1, Dr]
    dead_nodes: Tensor | None  # [num_nodes] bool: no live item below (None: every node has one)
    node_alias: Tensor | None  # [num_nodes] the node the decoder sees (None: each node itself)
    path_weight: float  # the rerank's weight on the beam's path score (models.search.rerank)
    centroid_term: CentroidTerm | None  # the beam's centroid term (models.search.centroid_term)


def bucket(n: int) -> int:
    """The power of two >= ``n`` (>= 1): batch and exclusion widths a graph is captured for."""
    return 1 << max(0, int(n) - 1).bit_length()


def pack_requests(
    histories: Sequence[np.ndarray],
    exclude: Sequence[np.ndarray] | None,
    rows: int,
    max_history: int,
    num_items: int,
) -> np.ndarray:
    """``-> [rows, max_history + E] int64``: left-padded histories | sorted exclusions padded high.

    ``rows >= len(histories)``; the rows past the batch are empty histories with no exclusions.
    """
    B = len(histories)
    if B == 0 or rows < B:
        raise ValueError(f"need 1 <= len(histories) <= rows, got {B} and {rows}")
    excl = pack_exclusions(exclude, B, rows)  # [rows, E]
    packed = np.zeros((rows, max_history + excl.shape[1]), np.int64)  # [rows, T + E]
    packed[:, max_history:] = excl
    for i, h in enumerate(histories):
        recent = np.asarray(h, dtype=np.int64).reshape(-1)[-max_history:]
        if len(recent):
            packed[i, max_history - len(recent) : max_history] = recent
    history = packed[:B, :max_history]
    if history.min() < 0 or history.max() > num_items:
        raise ValueError(f"history holds ids outside 0..{num_items} (dense ids, 0 = padding)")
    return packed


def pack_exclusions(exclude: Sequence[np.ndarray] | None, batch: int, rows: int) -> np.ndarray:
    """``-> [rows, E] int64``: each row's exclusions sorted and deduplicated, padded with
    :data:`EXCLUDE_PAD`; ``E`` the power of two holding the longest row (rows past ``batch``: none)."""
    excl = [np.unique(np.asarray(e, np.int64).reshape(-1)) for e in exclude] if exclude is not None else []
    if exclude is not None and len(excl) != batch:
        raise ValueError(f"exclude has {len(excl)} rows, the batch has {batch}")
    out = np.full((rows, bucket(max((len(e) for e in excl), default=1))), EXCLUDE_PAD, np.int64)
    for i, e in enumerate(excl):
        out[i, : len(e)] = e
    return out


def pack_states(
    states: EncoderStates,
    exclude: Sequence[np.ndarray] | None,
    rows: int,
    max_history: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A batch's encoder states in :func:`static_search`'s shapes, on ``device``:
    ``(memory [rows, max_history, D], mask [rows, max_history], query [rows, Dr] float32,
    excl [rows, E])``; memory left-padded (masked positions: no decoder reads them), rows past the
    batch empty."""
    B, T, D = states.memory.shape
    if max_history < T or rows < B:
        raise ValueError(f"states of {B} rows x {T} positions do not fit {rows} x {max_history}")
    dev = device
    memory = torch.zeros(rows, max_history, D, dtype=states.memory.dtype, device=dev)
    memory[:B, max_history - T :] = states.memory.to(dev)
    mask = torch.zeros(rows, max_history, dtype=torch.bool, device=dev)
    mask[:B, max_history - T :] = states.memory_mask.to(dev)
    query = torch.zeros(rows, states.query.shape[1], dtype=torch.float32, device=dev)
    query[:B] = states.query.to(dev, torch.float32)
    excl = torch.from_numpy(pack_exclusions(exclude, B, rows)).to(dev)
    return memory, mask, query, excl


def static_leaf_candidates(tables: StaticTables, leaves: Tensor) -> tuple[Tensor, Tensor]:
    """``leaves [B,b]`` global ids (-1 pad) -> (items [B, b*M], valid [B, b*M]), ``M`` = max leaf size.

    Leaf ``j``'s items sit at columns ``j*M .. j*M + size - 1`` (no packing: no host read)."""
    B, b = leaves.shape
    M = tables.max_leaf_size
    present = leaves >= 0  # [B, b]
    leaf = (leaves - tables.leaf_start).clamp(min=0)  # [B, b]
    start = tables.leaf_offsets[leaf]  # [B, b]
    count = (tables.leaf_offsets[leaf + 1] - start) * present  # [B, b]
    slot = torch.arange(M, device=leaves.device)  # [M]
    valid = slot[None, None, :] < count[:, :, None]  # [B, b, M]
    idx = (start[:, :, None] + slot).clamp(max=tables.leaf_items.numel() - 1)  # [B, b, M]
    items = torch.where(valid, tables.leaf_items[idx], 0)  # [B, b, M]
    return items.reshape(B, b * M), valid.reshape(B, b * M)


def static_blocked_keys(tables: StaticTables, excl: Tensor) -> NodeKeys:
    """``excl [B, E]`` (sorted, padded high) -> the leaves all of whose items a row excludes, as the
    beam's :class:`models.search.beam.NodeKeys` (what :func:`models.search.constraints.node_keys` blocks on the
    eager path), in static shapes: ``[B*E]`` sorted keys, a sentinel above every key where an
    exclusion does not empty its leaf. Memory ``B x E x E``, not ``B x num_nodes``."""
    B = excl.shape[0]  # excl [B, E]
    N = tables.num_items
    n = tables.trie.num_nodes
    real = (excl > 0) & (excl <= N)  # [B, E]
    real = real & tables.item_live[excl.clamp(min=0, max=N)]  # a removed item empties no leaf
    leaf = torch.where(real, tables.item_leaf[excl.clamp(min=0, max=N)], -1)  # [B, E] global ids
    same = (leaf[:, :, None] == leaf[:, None, :]) & real[:, :, None] & real[:, None, :]  # [B, E, E]
    size = (
        tables.leaf_offsets[(leaf - tables.leaf_start).clamp(min=0) + 1]
        - tables.leaf_offsets[(leaf - tables.leaf_start).clamp(min=0)]
    )  # [B, E] items of each exclusion's leaf
    full = real & (same.sum(dim=2) >= size)  # [B, E] the exclusion's leaf has no item left
    rows = torch.arange(B, device=excl.device)[:, None]
    sentinel = torch.full_like(leaf, B * n)  # above every key
    keys, _ = torch.sort(torch.where(full, rows * n + leaf, sentinel).reshape(-1))
    return NodeKeys(
        num_nodes=n,
        allow_rows=torch.zeros(B, dtype=torch.bool, device=excl.device),
        allowed=torch.zeros(0, dtype=torch.int64, device=excl.device),
        blocked=keys,
    )


def static_retrieve(
    tables: StaticTables, packed: Tensor, history_len: int, k: int, beam_size: int
) -> tuple[Tensor, Tensor]:
    """``packed [B, T+E]`` (:func:`pack_requests`, on the device) -> ``(ints [B, k+b+2] int64,
    scores [B, k+1] float32)``; ``ints`` = items ``[:k]`` (0 pad) | leaves ``[k:k+b]`` (-1 pad) |
    candidates after exclusion | items scored; ``scores`` = the items' rerank scores ``[:k]`` | the
    row's fill offset (:func:`models.search.rerank.fill_offset`). Encode, then :func:`static_search`; static shapes,
    no host read: capturable."""
    history = packed[:, :history_len]  # [B, T]
    excl = packed[:, history_len:].contiguous()  # [B, E] sorted, padded high
    mask = history > 0  # [B, T]
    memory, query = tables.backend.encode(history, mask)  # [B,T,D], [B,Dr]
    return static_search(tables, memory, mask, query, excl, k, beam_size)


def static_search(
    tables: StaticTables, memory: Tensor, mask: Tensor, query: Tensor, excl: Tensor, k: int, beam_size: int
) -> tuple[Tensor, Tensor]:
    """Encoder states ``memory [B,T,D]``, ``mask [B,T]``, ``query [B,Dr]`` and exclusions ``excl
    [B,E]`` -> :func:`static_retrieve`'s outputs (what the service searches with: states it
    encoded or took from its cache). The search's own stages
    (:class:`models.search.staged.StagedSearch`) with :func:`static_rerank` as the last one."""
    B = memory.shape[0]
    blocked = static_blocked_keys(tables, excl)
    start = beam_start(tables.trie, B, beam_size, tables.score_mode, tables.dead_nodes, blocked)

    def rerank(found: BeamResult) -> tuple[Tensor, Tensor]:
        return static_rerank(tables, found, query, excl, k)

    inner = BackendScorer(tables.backend, memory, mask, tables.node_alias)
    scorer = step_scorer(inner, tables.centroid_term, query)
    return StagedSearch(tables.trie, scorer, start, rerank).run()


def static_rerank(
    tables: StaticTables, found: BeamResult, query: Tensor, excl: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """The beam's leaves (``found``), ``query [B,Dr]``, ``excl [B,E]`` -> :func:`static_retrieve`'s
    outputs: the top ``k`` items of the leaves by the rerank score (:mod:`models.search.rerank`),
    minus the exclusions, in the fixed candidate layout (leaf ``j``'s items in columns ``j*M ..``)."""
    leaves = found.leaves
    B = leaves.shape[0]
    items, valid = static_leaf_candidates(tables, leaves)  # [B, C]
    num_scored = valid.sum(dim=1)  # [B] before exclusion
    pos = torch.searchsorted(excl, items).clamp(max=excl.shape[1] - 1)  # [B, C]
    valid = valid & (excl.gather(1, pos) != items)
    ip = torch.bmm(tables.item_emb[items], query.float()[:, :, None])[:, :, 0]  # [B, C]
    path = found.scores.float().repeat_interleave(tables.max_leaf_size, dim=1)  # [B, C] each leaf's score
    scores = fused_scores(ip, path, tables.path_weight).masked_fill(~valid, float("-inf"))
    kk = min(k, scores.shape[1])
    top_scores, top_idx = torch.topk(scores, kk, dim=1)  # [B, k']
    top_items = items.gather(1, top_idx).masked_fill(~valid.gather(1, top_idx), 0)  # [B, k']
    if kk < k:  # fewer candidates than k: pad as the eager path does
        top_items = torch.cat([top_items, top_items.new_zeros(B, k - kk)], dim=1)
        top_scores = torch.cat([top_scores, top_scores.new_full((B, k - kk), float("-inf"))], dim=1)
    counts = torch.stack([valid.sum(dim=1), num_scored], dim=1)  # [B, 2]
    offset = fill_offset(found.scores.float(), tables.path_weight)[:, None]  # [B, 1]
    return torch.cat([top_items, leaves, counts], dim=1), torch.cat([top_scores.float(), offset], dim=1)


def unpack_result(ints: np.ndarray, scores: np.ndarray, batch: int, k: int) -> RetrievalResult:
    """The host copies of :func:`static_retrieve`'s outputs -> the first ``batch`` rows' result
    (the fill offset, ``scores[:, k]``, is the caller's to read)."""
    return RetrievalResult(
        items=ints[:batch, :k],
        scores=scores[:batch, :k],
        num_candidates=ints[:batch, -2],
        leaves=ints[:batch, k:-2],
        num_scored=ints[:batch, -1],
    )
