"""TDR's training loss: a softmax over the nodes of every level (eq. 6-7) estimated by sampled
softmax (eq. 17-18) with the uniform or the top-down sampler (:mod:`.sampling`), optionally weighted
by the rectified labels of eq. 15 (SASRec's logits standing in for ``eta``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from models.index import TreeIndex
from training.methods.tdr.config import TDRConfig
from training.methods.tdr.model import TDRModel
from training.methods.tdr.sampling import (
    children_table,
    level_sizes,
    rectified_weights,
    sampled_softmax_loss,
    topdown_negatives,
    uniform_negatives,
)


@dataclass(frozen=True)
class TreeTensors:
    """The index as the trainer reads it: paths, levels and dense children."""

    item_path: Tensor  # [N+1, L] int64 global node ids (row 0 = -1)
    levels: list[tuple[int, int]]  # (first global id, count) per level 1..L
    children: Tensor  # [num_nodes, C] int64, -1 padded

    @classmethod
    def from_index(cls, index: TreeIndex) -> TreeTensors:
        path = torch.from_numpy(index.item_path.astype(np.int64))
        return cls(
            item_path=path,
            levels=level_sizes(path, index.levels),
            children=children_table(index.child_offsets, index.child_ids, index.max_branching),
        )


def batch_loss(
    model: TDRModel,
    tree: TreeTensors,
    cfg: TDRConfig,
    histories: Tensor,
    targets: Tensor,
    weights: Tensor | None,
    generator: torch.Generator,
) -> Tensor:
    """Sampled-softmax loss of one batch, summed over levels (eq. 20), averaged over examples.

    histories: [B, T] (0 = padding); targets: [B] dense ids; weights: [B, L] rectified labels or None.
    """
    b, L, m = targets.shape[0], len(tree.levels), cfg.num_negatives
    recent, recent_mask = model.recent(histories)  # [B, W, D], [B, W]
    pos = tree.item_path[targets]  # [B, L]
    if cfg.sampler == "uniform":
        neg, log_q, valid = uniform_negatives(pos, tree.levels, m, generator)  # [B, L, m] each
    else:

        def score_pairs(users: Tensor, cand: Tensor) -> Tensor:
            return model.scorer.score(recent[users], recent_mask[users], cand)

        neg, log_q = topdown_negatives(score_pairs, tree.children, b, L, m, generator)  # [B, L, m]
        valid = neg != pos[:, :, None]  # accidental hits of the positive are dropped
    cand = torch.cat([pos[:, :, None], neg], dim=2).reshape(b, L * (1 + m))  # [B, L(1+m)]
    scores = model.scorer.score(recent, recent_mask, cand).reshape(b * L, 1 + m)  # [B*L, 1+m]
    w = weights.reshape(b * L) if weights is not None else None
    loss = sampled_softmax_loss(
        scores[:, 0], scores[:, 1:], log_q.reshape(b * L, m), neg_valid=valid.reshape(b * L, m), weights=w
    )
    return loss * L  # sum over levels, mean over examples


@torch.no_grad()
def rectified_labels(
    sasrec: Any,
    histories: np.ndarray,
    targets: np.ndarray,
    item_path: Tensor,
    mode: str = "hard",
    batch_size: int = 1024,
) -> Tensor:
    """Eq. 15 weights ``[P, L]`` of every training pair, SASRec's logits standing in for ``eta``."""
    out = []
    for start in tqdm(range(0, len(targets), batch_size), desc="tdr rectified labels", leave=False):
        rows = [h[h > 0] for h in histories[start : start + batch_size]]
        scores = sasrec.score_items(rows)  # [b, N+1]
        t = torch.from_numpy(targets[start : start + batch_size])
        out.append(rectified_weights(scores, t, item_path, mode))
    return torch.cat(out) if out else torch.zeros((0, item_path.shape[1]))


class TDRLoss(nn.Module):
    """The training step as a module (DDP hooks ``forward``):
    ``(histories[B, W], targets[B], weights[B, L] | None, generator) -> loss`` on the current ``tree``."""

    def __init__(self, model: TDRModel, cfg: TDRConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.tree: TreeTensors | None = None

    def forward(
        self, histories: Tensor, targets: Tensor, weights: Tensor | None, generator: torch.Generator
    ) -> Tensor:
        assert self.tree is not None, "set TDRLoss.tree first"
        return batch_loss(self.model, self.tree, self.cfg, histories, targets, weights, generator)
