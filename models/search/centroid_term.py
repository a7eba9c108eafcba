"""The beam's choice of children fused with the query-to-centroid score (a bundle's
``config.leaf_centroid_weights``, checked by :mod:`models.bundle.manifest`; chosen by
:mod:`training.centroid_rule` on validation users).

At level ``l`` (1 = the root's children) the step's score of each child ``c`` gains
``weights[l] * (query · centroid[c])`` before the beam normalises it (``logprob`` bundles: a
product of experts, renormalised per level): ``query [B, Dr]`` is the rerank vector of the beam's
user and ``centroid[c]`` the mean rerank vector of the items below ``c`` in the bundle as trained.
The path score the rerank reads (``path_weight``) is the fused one. All weights 0 (the default,
and what the rule keeps when the term does not gain) is the decoder alone.

A grown catalogue's new nodes reach the scorer through ``node_alias`` as an existing node, and take
that node's centroid: the bundle's centroids stay fixed across catalogue versions (a delta moves a
mean by its share of the node's items; the bundle's next training recomputes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.bundle.backend import BackendScorer
from models.catalogue.tree_arrays import centroid_sums, subtree_counts
from models.index import TreeIndex


def node_centroids(index: TreeIndex, item_emb: np.ndarray) -> np.ndarray:
    """``[num_nodes, Dr]`` float32: the mean of ``item_emb [N+1, Dr]`` over the items below each
    node (a single-item leaf: its item; a node without items: 0)."""
    sums = centroid_sums(index, item_emb, unit=False)  # [S, Dr] float64
    means = np.zeros((index.num_nodes, item_emb.shape[1]), np.float64)
    means[: len(sums)] = sums / np.maximum(subtree_counts(index)[: len(sums), None], 1)
    if len(sums) < index.num_nodes:  # single-item leaves
        leaves = np.arange(index.leaf_start, index.num_nodes)
        means[leaves] = item_emb[index.leaf_items[index.leaf_offsets[leaves - index.leaf_start]]]
    return means.astype(np.float32)


@dataclass(frozen=True)
class CentroidTerm:
    """``centroids [num_nodes, Dr]`` and ``weights [L+1]`` (index = the candidates' level; 0 unused)."""

    centroids: Tensor
    weights: Tensor

    @classmethod
    def of(
        cls, index: TreeIndex, item_emb: np.ndarray, weights: Sequence[float], device: torch.device
    ) -> CentroidTerm | None:
        """The term of a bundle whose ``weights`` are not all 0, else None (no centroids held)."""
        if not any(weights):
            return None
        centroids = torch.from_numpy(node_centroids(index, item_emb)).to(device)
        return cls(centroids, torch.tensor([0.0, *weights], dtype=torch.float32, device=device))

    def near(self, query: Tensor, beam_query: Tensor, candidates: Tensor) -> Tensor:
        """``query [B, Dr]``, ``beam_query [Bb]``, ``candidates [Bb, C]`` (-1 pad) -> ``[Bb, C]``
        inner products of each beam's query with its candidates' centroids (0 at padding)."""
        rows = self.centroids.index_select(0, candidates.clamp(min=0).reshape(-1))  # [Bb*C, Dr]
        rows = rows.reshape(*candidates.shape, -1)  # [Bb, C, Dr]
        near = (rows * query.index_select(0, beam_query)[:, None, :]).sum(-1)  # [Bb, C]
        return near.masked_fill(candidates < 0, 0.0)

    def fused(
        self, scores: Tensor, query: Tensor, beam_query: Tensor, prefix: Tensor, candidates: Tensor
    ) -> Tensor:
        """``scores [Bb, C]`` of the candidates at level ``prefix.shape[1]`` plus the weighted term."""
        weight = self.weights[prefix.shape[1]]
        return scores + weight * self.near(query, beam_query, candidates).to(scores.dtype)


class CentroidFusedScorer:
    """A :class:`models.search.beam.StepScorer`: ``inner``'s step with the :class:`CentroidTerm` of
    one batch's ``query [B, Dr]`` added (the candidates seen through ``inner``'s ``node_alias``, as
    the decoder sees them)."""

    def __init__(self, inner: BackendScorer, term: CentroidTerm, query: Tensor) -> None:
        self.inner, self.term, self.query = inner, term, query
        self.node_alias = inner.node_alias
        self.cache_width = inner.cache_width

    def step(
        self, beam_query: Tensor, prefix: Tensor, candidates: Tensor, cache: Tensor
    ) -> tuple[Tensor, Tensor]:
        scores, cache_out = self.inner.step(beam_query, prefix, candidates, cache)  # [Bb, C], [Bb, 1, W]
        seen = candidates
        if self.node_alias is not None:
            seen = torch.where(candidates >= 0, self.node_alias[candidates.clamp(min=0)], candidates)
        return self.term.fused(scores, self.query, beam_query, prefix, seen), cache_out


def step_scorer(
    inner: BackendScorer, term: CentroidTerm | None, query: Tensor
) -> BackendScorer | CentroidFusedScorer:
    """``inner`` itself without a term, else fused with it."""
    return inner if term is None else CentroidFusedScorer(inner, term, query)
