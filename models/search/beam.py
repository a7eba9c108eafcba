"""Batched constrained beam search over the index trie, in torch.

One step per level (the loop over levels is the staged search); nothing loops over queries or beams, and no step waits on the
device (no host sync). At each level the ``w`` beams of each of the ``B`` queries are flattened to
``Bb = B*w`` rows grouped by query (a dead beam stays in place with only padded candidates), their
children come from the device CSR in one gather (padded to ``max_branching`` with -1), the scorer
is called once, and one ``topk`` per query picks the next beams among all ``w * C`` expanded
children. Paths never leave the trie (only real
children are ever candidates) and never repeat a leaf (a node has one parent, and the beams of a
query are distinct nodes, so their children are distinct).

Score modes:

* ``logprob`` (URI, SEATER): log-softmax of the scorer's output over the real (non-padded)
  children of a beam, summed along the path. Excluded children are removed *after* the
  normalisation, so a path's score stays the model's log-probability of that path.
* ``node`` (TDR): the raw score of a node; the children of all beams of a query are ranked
  against each other, and a leaf's final score is its own score.

Stages: :func:`beam_start`, then :func:`beam_step` once per level, then :func:`beam_finish`. The
loop over them is :class:`models.search.staged.StagedSearch` (and :func:`models.search.staged.beam_search`
for the leaves alone); this module holds no loop over levels.

Scorers: a plain :data:`Scorer` (the full prefix at every level), or a :class:`StepScorer` (the
serving decoder step): the search then carries each beam's cache (``[B, w, depth, W]``: the
scorer's state of every prefix position but the last) from parent to child, so the scorer
computes only the newest prefix position.

The beam width may exceed the number of nodes of a level (e.g. ``b`` > level-1 branching): the
surplus beams are padding (score -inf, node -1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from models.index import SCORE_MODES, ScoreMode, TreeIndex

Scorer = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(beam_query [Bb] int64, prefix [Bb, S] int64 global ids root first, candidates [Bb, C] int64,
-1 padded) -> scores [Bb, C]``. Scores at padded candidates are ignored."""


@runtime_checkable
class StepScorer(Protocol):
    """An incremental scorer (the serving form of the decoder step, :mod:`models.nets.decoder_step`).

    ``step(beam_query, prefix, candidates, cache [Bb, S-1, W]) -> (scores [Bb, C], cache_out [Bb, 1, W])``:
    ``cache`` holds what the scorer returned for the first ``S-1`` prefix positions of the beam
    (the search carries it from parent to child beam), ``cache_out`` is the state of the last one.
    """

    cache_width: int
    """W (0 for a stateless scorer)."""

    def step(
        self, beam_query: Tensor, prefix: Tensor, candidates: Tensor, cache: Tensor
    ) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class DeviceTrie:
    """The index CSR moved to a torch device once (for serving: at bundle load)."""

    child_offsets: Tensor  # [num_nodes+1] int64
    child_ids: Tensor  # [num_nodes-1] int64
    node_token: Tensor  # [num_nodes] int64
    level_offsets: Tensor  # [L+2] int64
    levels: int
    num_nodes: int
    max_branching: int
    leaf_start: int  # global id of leaf 0
    device: torch.device

    @classmethod
    def from_index(cls, index: TreeIndex, device: str | torch.device = "cpu") -> DeviceTrie:
        dev = torch.device(device)
        max_children = int(torch.from_numpy(index.child_offsets).diff().max())
        return cls(
            child_offsets=torch.as_tensor(index.child_offsets, dtype=torch.int64, device=dev),
            child_ids=torch.as_tensor(index.child_ids, dtype=torch.int64, device=dev),
            node_token=torch.as_tensor(index.node_token, dtype=torch.int64, device=dev),
            level_offsets=torch.as_tensor(index.level_offsets, dtype=torch.int64, device=dev),
            levels=index.levels,
            num_nodes=index.num_nodes,
            max_branching=max(index.max_branching, max_children),
            leaf_start=index.leaf_start,
            device=dev,
        )

    def children(self, nodes: Tensor) -> Tensor:
        """``nodes [M]`` global ids (-1 allowed) -> ``[M, max_branching]`` children, -1 padded."""
        safe = nodes.clamp(min=0)  # [M]
        start = self.child_offsets[safe]  # [M]
        count = self.child_offsets[safe + 1] - start  # [M]
        count = torch.where(nodes >= 0, count, torch.zeros_like(count))
        slot = torch.arange(self.max_branching, device=nodes.device)  # [C]
        valid = slot[None, :] < count[:, None]  # [M, C]
        idx = (start[:, None] + slot[None, :]).clamp(max=self.child_ids.numel() - 1)  # [M, C]
        return torch.where(valid, self.child_ids[idx], torch.full_like(idx, -1))


def sorted_member(keys: Tensor, query: Tensor) -> Tensor:
    """``query[...]`` int64 -> bool ``[...]``: the value is in ``keys`` (1-d, sorted ascending)."""
    if keys.numel() == 0:
        return torch.zeros(query.shape, dtype=torch.bool, device=query.device)
    pos = torch.searchsorted(keys, query.reshape(-1)).clamp(max=keys.numel() - 1)
    return (keys[pos] == query.reshape(-1)).reshape(query.shape)


@dataclass(frozen=True)
class NodeKeys:
    """Per-row node constraints of one batch, as sorted ``row * num_nodes + node`` keys.

    ``allowed``: the nodes above at least one item a row may return (only rows with
    ``allow_rows[row]`` are restricted; other rows allow every node). ``blocked``: nodes none of whose
    items a row may return (its excluded leaves). A node that fails either is never expanded, so a
    beam never spends width on a branch with nothing left to return.
    """

    num_nodes: int
    allow_rows: Tensor  # [B] bool
    allowed: Tensor  # [A] int64 sorted keys
    blocked: Tensor  # [E] int64 sorted keys

    def valid(self, beam_query: Tensor, cand: Tensor) -> Tensor:
        """``beam_query [Bb]``, ``cand [Bb, C]`` (-1 padded) -> bool ``[Bb, C]``: allowed, not blocked."""
        key = beam_query[:, None] * self.num_nodes + cand.clamp(min=0)  # [Bb, C]
        ok = ~sorted_member(self.blocked, key)
        restricted = self.allow_rows[beam_query][:, None]  # [Bb, 1]
        return ok & (~restricted | sorted_member(self.allowed, key))


@dataclass(frozen=True)
class BeamResult:
    leaves: Tensor  # [B, b] global leaf node ids, -1 where fewer than b leaves exist
    scores: Tensor  # [B, b] path scores (-inf where padded), sorted descending
    paths: Tensor  # [B, b, L] global node ids (-1 where padded)


@dataclass(frozen=True)
class BeamState:
    """The beams of a search between two levels (what :func:`beam_step` takes and returns).

    ``w`` is the live beam width at this depth (1 at the root, then ``min(b, w * C)``).
    """

    nodes: Tensor  # [B, w] global node ids, -1 where dead
    scores: Tensor  # [B, w] path scores, -inf where dead
    alive: Tensor  # [B, w] bool
    paths: Tensor  # [B, w, depth] global node ids below the root
    depth: int  # levels expanded so far (0 = at the root)
    batch_size: int
    beam_size: int
    score_mode: ScoreMode
    exclude_nodes: Tensor | None  # [num_nodes] or [B, num_nodes] bool, on the trie's device
    cache: Tensor | None = None  # [B, w, depth, W] a StepScorer's state of prefix positions 0..depth-1
    node_keys: NodeKeys | None = None  # per-row node constraints (allow-lists, fully excluded leaves)

    def done(self, trie: DeviceTrie) -> bool:
        return self.depth >= trie.levels


def beam_start(
    trie: DeviceTrie,
    batch_size: int,
    beam_size: int,
    score_mode: ScoreMode,
    exclude_nodes: Tensor | None = None,
    node_keys: NodeKeys | None = None,
) -> BeamState:
    """Validate the arguments and put ``batch_size`` searches at the root (no scorer call)."""
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    if batch_size < 1 or beam_size < 1:
        raise ValueError(f"batch_size and beam_size must be >= 1, got {batch_size} and {beam_size}")
    dev = trie.device
    B = batch_size
    if exclude_nodes is not None:
        exclude_nodes = exclude_nodes.to(device=dev, dtype=torch.bool)
        if exclude_nodes.shape not in ((trie.num_nodes,), (B, trie.num_nodes)):
            raise ValueError(
                f"exclude_nodes must be [num_nodes={trie.num_nodes}] or [B={B}, num_nodes], "
                f"got {tuple(exclude_nodes.shape)}"
            )
    return BeamState(
        nodes=torch.zeros(B, 1, dtype=torch.int64, device=dev),  # [B, w] start at the root
        scores=torch.zeros(B, 1, dtype=torch.float32, device=dev),  # [B, w]
        alive=torch.ones(B, 1, dtype=torch.bool, device=dev),  # [B, w]
        paths=torch.zeros(B, 1, 0, dtype=torch.int64, device=dev),  # [B, w, depth] below the root
        depth=0,
        batch_size=B,
        beam_size=beam_size,
        score_mode=score_mode,
        exclude_nodes=exclude_nodes,
        node_keys=node_keys,
    )


def beam_step(trie: DeviceTrie, scorer: Scorer | StepScorer, state: BeamState) -> BeamState:
    """Expand every beam by one level: one scorer call, one ``topk`` per query.

    The scorer sees all ``Bb = B*w`` beams grouped by query (``beam_query[i] = i // w``); a dead
    beam has only padded candidates, so its scores are ignored. A :class:`StepScorer` also gets
    each beam's cache, and a child beam inherits its parent's cache plus the parent's ``cache_out``.
    """
    if state.done(trie):
        raise ValueError(f"the search already reached the leaves (depth {state.depth} of {trie.levels})")
    dev = trie.device
    B, b, C = state.batch_size, state.beam_size, trie.max_branching
    nodes, paths, d = state.nodes, state.paths, state.depth
    w = nodes.shape[1]
    beam_query = torch.arange(B, device=dev)[:, None].expand(B, w).reshape(-1)  # [Bb] = i // w
    root = torch.zeros(B, w, 1, dtype=torch.int64, device=dev)
    prefix = torch.cat([root, paths.clamp(min=0)], dim=2).reshape(B * w, d + 1)  # [Bb, S] dead: any path
    cand = trie.children(nodes.reshape(-1))  # [Bb, C], dead beams: all -1
    cache_out: Tensor | None = None
    if isinstance(scorer, StepScorer):
        W = scorer.cache_width
        cache = state.cache if state.cache is not None else torch.zeros(B, w, d, W, device=dev)
        raw, cache_out = scorer.step(beam_query, prefix, cand, cache.reshape(B * w, d, W))
    else:
        raw = scorer(beam_query, prefix, cand)
    if raw.shape != cand.shape:
        raise ValueError(f"scorer returned shape {tuple(raw.shape)}, expected {tuple(cand.shape)}")
    total, valid = expand_scores(state, raw.to(torch.float32), cand, beam_query)  # [Bb, C] each
    # rank valid entries above padding even when their score is -inf or NaN
    lowest = torch.finfo(torch.float32).min
    key = torch.where(valid, total.nan_to_num(nan=lowest, neginf=lowest), float("-inf"))
    k = min(b, w * C)
    _, top_idx = torch.topk(key.reshape(B, w * C), k, dim=1)  # [B, k]
    top_scores = torch.gather(total.reshape(B, w * C), 1, top_idx)  # [B, k]
    alive = torch.gather(valid.reshape(B, w * C), 1, top_idx)  # [B, k]
    nodes = torch.gather(cand.reshape(B, w * C), 1, top_idx)  # [B, k]
    src = torch.div(top_idx, C, rounding_mode="floor")  # [B, k] beam each child came from
    parent_paths = torch.gather(paths, 1, src[:, :, None].expand(B, k, d))  # [B, k, depth]
    new_cache = None
    if cache_out is not None:  # the parent's cache and its new position, for every child beam
        parent = (src + torch.arange(B, device=dev)[:, None] * w).reshape(-1)  # [B*k] flat parent row
        both = torch.cat([cache.reshape(B * w, d, W), cache_out.reshape(B * w, 1, W)], dim=1)
        new_cache = both.index_select(0, parent).reshape(B, k, d + 1, W)  # [B, k, depth+1, W]
    return replace(
        state,
        nodes=nodes.masked_fill(~alive, -1),
        scores=top_scores.masked_fill(~alive, float("-inf")),
        alive=alive,
        paths=torch.cat([parent_paths, nodes[:, :, None]], dim=2),  # [B, k, depth+1]
        depth=d + 1,
        cache=new_cache,
    )


def expand_scores(state: BeamState, raw: Tensor, cand: Tensor, beam_query: Tensor) -> tuple[Tensor, Tensor]:
    """``raw[Bb,C]`` scorer output -> (path score of every child [Bb,C], valid [Bb,C]): real, not
    excluded children of live beams. ``logprob``: normalised over the real children, then summed."""
    valid = cand >= 0  # [Bb, C]
    if state.score_mode == "logprob":
        logp = torch.log_softmax(raw.masked_fill(~valid, float("-inf")), dim=-1)  # [Bb, C] NaN on dead rows
        total = state.scores.reshape(-1)[:, None] + logp
    else:
        total = raw
    if state.exclude_nodes is not None:
        safe = cand.clamp(min=0)
        if state.exclude_nodes.dim() == 1:
            excluded = state.exclude_nodes[safe]  # [Bb, C]
        else:
            excluded = state.exclude_nodes[beam_query[:, None], safe]  # [Bb, C]
        valid = valid & ~excluded
    if state.node_keys is not None:
        valid = valid & state.node_keys.valid(beam_query, cand)
    return total.masked_fill(~valid, float("-inf")), valid


def beam_finish(trie: DeviceTrie, state: BeamState) -> BeamResult:
    """The leaves of a finished search, padded to ``beam_size``."""
    if not state.done(trie):
        raise ValueError(f"the search is at depth {state.depth}, the leaves are at {trie.levels}")
    dev = trie.device
    B, b = state.batch_size, state.beam_size
    nodes, scores, alive = state.nodes, state.scores, state.alive
    w = nodes.shape[1]
    paths = state.paths.masked_fill(~alive[:, :, None], -1)  # [B, w, L]
    if w < b:  # fewer nodes than the beam at some level: pad to b
        pad = b - w
        nodes = torch.cat([nodes, torch.full((B, pad), -1, dtype=torch.int64, device=dev)], dim=1)
        scores = torch.cat([scores, torch.full((B, pad), float("-inf"), device=dev)], dim=1)
        paths = torch.cat(
            [paths, torch.full((B, pad, trie.levels), -1, dtype=torch.int64, device=dev)], dim=1
        )
    return BeamResult(leaves=nodes, scores=scores, paths=paths)
