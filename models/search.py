"""Batched constrained beam search over the index trie, in torch.

One Python loop over the L levels; nothing loops over queries or beams. At each level the live
beams of all queries are flattened to ``Bb`` rows, their children come from the device CSR in one
gather (padded to ``max_branching`` with -1), the scorer is called once, and one ``topk`` per query
picks the next beams among all ``w * C`` expanded children. Paths never leave the trie (only real
children are ever candidates) and never repeat a leaf (a node has one parent, and the beams of a
query are distinct nodes, so their children are distinct).

Score modes:

* ``logprob`` (URI, SEATER): log-softmax of the scorer's output over the real (non-padded)
  children of a beam, summed along the path. Excluded children are removed *after* the
  normalisation, so a path's score stays the model's log-probability of that path.
* ``node`` (TDR): the raw score of a node; the children of all beams of a query are ranked
  against each other, and a leaf's final score is its own score.

Staged form: :func:`beam_start`, then :func:`beam_step` once per level, then :func:`beam_finish`
(:func:`beam_search` is exactly that loop); a caller may run other work between two levels — the
service's shadow lane gives way to primary batches there.

The beam width may exceed the number of nodes of a level (e.g. ``b`` > level-1 branching): the
surplus beams are padding (score -inf, node -1) and are not passed to the scorer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from models.index import TreeIndex

Scorer = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(beam_query [Bb] int64, prefix [Bb, S] int64 global ids root first, candidates [Bb, C] int64,
-1 padded) -> scores [Bb, C]``. Scores at padded candidates are ignored."""

ScoreMode = Literal["logprob", "node"]
SCORE_MODES: tuple[str, ...] = ("logprob", "node")


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

    def done(self, trie: DeviceTrie) -> bool:
        return self.depth >= trie.levels


def beam_start(
    trie: DeviceTrie,
    batch_size: int,
    beam_size: int,
    score_mode: ScoreMode,
    exclude_nodes: Tensor | None = None,
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
    )


def beam_step(trie: DeviceTrie, scorer: Scorer, state: BeamState) -> BeamState:
    """Expand every live beam by one level: one scorer call, one ``topk`` per query."""
    if state.done(trie):
        raise ValueError(f"the search already reached the leaves (depth {state.depth} of {trie.levels})")
    dev = trie.device
    B, b, C = state.batch_size, state.beam_size, trie.max_branching
    nodes, scores, alive, paths = state.nodes, state.scores, state.alive, state.paths
    exclude_nodes = state.exclude_nodes
    root = torch.zeros(B, 1, 1, dtype=torch.int64, device=dev)

    w = nodes.shape[1]
    flat_alive = alive.reshape(-1)  # [B*w]
    rows = flat_alive.nonzero().squeeze(1)  # [Bb] live beams only
    beam_query = torch.div(rows, w, rounding_mode="floor")  # [Bb]
    prefix = torch.cat([root.expand(B, w, 1), paths], dim=2).reshape(B * w, -1)[rows]  # [Bb, S]
    cand = trie.children(nodes.reshape(-1)[rows])  # [Bb, C]
    valid = cand >= 0  # [Bb, C]
    # no scorer call when every beam of every query is dead (all excluded)
    raw = scorer(beam_query, prefix, cand) if rows.numel() else torch.zeros(cand.shape, device=dev)
    if raw.shape != cand.shape:
        raise ValueError(f"scorer returned shape {tuple(raw.shape)}, expected {tuple(cand.shape)}")
    raw = raw.to(torch.float32)
    if state.score_mode == "logprob":
        logp = torch.log_softmax(raw.masked_fill(~valid, float("-inf")), dim=-1)  # [Bb, C]
        total = scores.reshape(-1)[rows][:, None] + logp
    else:
        total = raw
    if exclude_nodes is not None:
        safe = cand.clamp(min=0)
        if exclude_nodes.dim() == 1:
            excluded = exclude_nodes[safe]  # [Bb, C]
        else:
            excluded = exclude_nodes[beam_query[:, None], safe]  # [Bb, C]
        valid = valid & ~excluded
    total = total.masked_fill(~valid, float("-inf"))

    # back to [B, w*C] (dead beams contribute only padding), then one topk per query
    all_total = torch.full((B * w, C), float("-inf"), device=dev)
    all_total[rows] = total
    all_valid = torch.zeros(B * w, C, dtype=torch.bool, device=dev)
    all_valid[rows] = valid
    all_cand = torch.full((B * w, C), -1, dtype=torch.int64, device=dev)
    all_cand[rows] = cand
    # rank valid entries above padding even when their score is -inf or NaN
    lowest = torch.finfo(torch.float32).min
    key = torch.where(all_valid, all_total.nan_to_num(nan=lowest, neginf=lowest), float("-inf"))
    k = min(b, w * C)
    _, top_idx = torch.topk(key.reshape(B, w * C), k, dim=1)  # [B, k]
    top_scores = torch.gather(all_total.reshape(B, w * C), 1, top_idx)  # [B, k]
    alive = torch.gather(all_valid.reshape(B, w * C), 1, top_idx)  # [B, k]
    nodes = torch.gather(all_cand.reshape(B, w * C), 1, top_idx)  # [B, k]
    src = torch.div(top_idx, C, rounding_mode="floor")  # [B, k] beam each child came from
    parent_paths = torch.gather(paths, 1, src[:, :, None].expand(B, k, paths.shape[2]))  # [B, k, depth]
    paths = torch.cat([parent_paths, nodes[:, :, None]], dim=2)  # [B, k, depth+1]
    return replace(
        state,
        nodes=nodes.masked_fill(~alive, -1),
        scores=top_scores.masked_fill(~alive, float("-inf")),
        alive=alive,
        paths=paths,
        depth=state.depth + 1,
    )


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


def beam_search(
    trie: DeviceTrie,
    scorer: Scorer,
    batch_size: int,
    beam_size: int,
    score_mode: ScoreMode,
    exclude_nodes: Tensor | None = None,
) -> BeamResult:
    """Find the ``beam_size`` best leaves of each of ``batch_size`` queries.

    ``exclude_nodes``: boolean ``[num_nodes]`` (same for all queries) or ``[B, num_nodes]``; an
    excluded node is never expanded nor returned (its subtree is cut). The same search in stages
    (one level per call, e.g. to let other work run in between) is :func:`beam_start`,
    :func:`beam_step` until ``state.done(trie)``, :func:`beam_finish`; this function is exactly that.
    """
    state = beam_start(trie, batch_size, beam_size, score_mode, exclude_nodes)
    while not state.done(trie):
        state = beam_step(trie, scorer, state)
    return beam_finish(trie, state)
