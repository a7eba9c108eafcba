"""The rerank's score: the inner product, fused with the beam's path score when the bundle says so.

``score(item) = query · item_emb[item] + path_weight × path(leaf of item)``

* ``path`` is the beam's score of the item's leaf (:class:`models.search.beam.BeamResult`): the
  summed log-probabilities of its path (``logprob`` bundles) or the leaf's own score (``node``).
  What the decoder learned then counts in the final order, not only in which leaves are read.
* ``path_weight`` is the manifest's ``config.path_weight``, chosen by the trainer on validation
  users (:mod:`training.path_weight`); 0 (bundles written before it, or where validation users
  gained nothing) is the plain inner product, bit for bit.
* An item found outside the beam (the dense fill, the exact top-k of a small allow-list) has no path
  of its own: it is scored as if it sat in the row's lowest-scored beam leaf (:func:`fill_offset`),
  so that the fill still completes a list rather than outranking what the beam found for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Candidates:
    """The items of a beam's leaves with both halves of their score, before the top-k."""

    items: Tensor  # [B, C] dense ids (0 where padded)
    valid: Tensor  # [B, C] bool: a leaf item the row may return (exclusions and allow-lists applied)
    ip: Tensor  # [B, C] float32 query · item_emb
    path: Tensor  # [B, C] float32 the beam's score of the item's leaf (-inf where padded)
    num_scored: Tensor  # [B] items scored: every leaf item, before exclusion

    def scores(self, weight: float) -> Tensor:
        """``[B, C]`` rerank scores at ``weight`` (:func:`fused_scores`), -inf where not valid."""
        return fused_scores(self.ip, self.path, weight).masked_fill(~self.valid, float("-inf"))


def fused_scores(ip: Tensor, leaf_score: Tensor, weight: float) -> Tensor:
    """``ip [B,C]`` inner products, ``leaf_score [B,C]`` the beam score of each candidate's leaf ->
    ``[B,C]`` rerank scores (``ip`` itself when ``weight`` is 0; a padded leaf's -inf adds 0)."""
    if weight == 0.0:
        return ip
    finite = torch.isfinite(leaf_score)
    return ip + weight * torch.where(finite, leaf_score, torch.zeros_like(leaf_score))


def fill_offset(path: Tensor, weight: float) -> Tensor:
    """``path [B,b]`` -> ``[B]`` what an item outside the beam adds to its inner product:
    ``weight`` × the row's lowest finite leaf score (0 for a row without leaves, or ``weight`` 0)."""
    if weight == 0.0:
        return path.new_zeros(path.shape[0])
    finite = torch.isfinite(path)
    low = torch.where(finite, path, torch.full_like(path, float("inf"))).min(dim=1).values  # [B]
    return weight * torch.where(torch.isfinite(low), low, torch.zeros_like(low))


def packed_leaf_items(
    leaves: Tensor, leaf_start: int, leaf_offsets: Tensor, leaf_items: Tensor, max_leaf_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``leaves [B,b]`` global ids (-1 pad) -> ``(items [B,C], valid [B,C], cols [B,C])``, C = the
    most items any row's leaves hold; ``cols`` is each candidate's leaf column in ``leaves``.

    The items of a row's leaves are packed left to right (no gaps between leaves) from the CSR
    ``leaf_offsets [L+1]`` / ``leaf_items``; leaf node ``leaf_start + i`` is CSR row ``i``.
    """
    B, b = leaves.shape
    present = leaves >= 0
    leaf = (leaves - leaf_start).clamp(min=0)  # [B, b]
    start = leaf_offsets[leaf]  # [B, b]
    count = (leaf_offsets[leaf + 1] - start) * present  # [B, b]
    if max_leaf_size == 1:  # single-item leaves (SEATER, TDR): a plain gather, candidate j in leaf j
        held = count > 0  # [B, b] a leaf whose item was removed holds none
        cols = torch.arange(b, device=leaves.device).expand(B, b)
        if leaf_items.numel() == 0:  # every item removed: nothing to gather
            return torch.zeros_like(leaves, dtype=torch.int64), held, cols
        return torch.where(held, leaf_items[start.clamp(max=leaf_items.numel() - 1)], 0), held, cols
    flat_count = count.reshape(-1)  # [B*b]
    total = int(flat_count.sum())
    C = max(1, int(count.sum(dim=1).max()))
    items = torch.zeros(B, C, dtype=torch.int64, device=leaves.device)
    valid = torch.zeros(B, C, dtype=torch.bool, device=leaves.device)
    cols = torch.zeros(B, C, dtype=torch.int64, device=leaves.device)
    if total == 0:
        return items, valid, cols
    seg = torch.repeat_interleave(torch.arange(B * b, device=leaves.device), flat_count, output_size=total)
    seg_first = torch.cumsum(flat_count, 0) - flat_count  # [B*b] first flat slot of each leaf
    within = torch.arange(total, device=leaves.device) - seg_first[seg]  # [total] offset inside its leaf
    row_first = (count.cumsum(dim=1) - count).reshape(-1)  # [B*b] column of each leaf's first item
    row, col = torch.div(seg, b, rounding_mode="floor"), row_first[seg] + within
    items[row, col] = leaf_items[start.reshape(-1)[seg] + within]
    valid[row, col] = True
    cols[row, col] = seg % b
    return items, valid, cols
