"""TDR's layer-wise sampled softmax, its two negative samplers and the rectified labels, as pure torch.

Paper: Liu et al., "Deep Tree-based Retrieval for Efficient Recommendation: Theory and Method".

* eq. 6-7   layer-wise multi-class cross-entropy (softmax over all nodes of a level)
* eq. 17-18 sampled softmax: only the positive and ``m`` sampled negatives of the level; negatives get
  the logit correction ``o - ln(m q)`` -> :func:`sampled_softmax_loss`
* 5.2       samplers: uniform over the other nodes of the level (``q = 1 / (c(j) - 1)``)
  -> :func:`uniform_negatives`; top-down (``m`` root-to-leaf paths, each child drawn with the softmax
  over its siblings, ``q`` = product of those edge softmaxes) -> :func:`topdown_negatives`
* eq. 15    rectified labels: the loss of level ``j`` is weighted by ``1`` when the target is the
  estimator's best item under its level-``j`` ancestor, else ``0`` -> :func:`rectified_weights`

A tree here is a dense children table ``children[num_nodes, C]`` (global node ids, -1 padded, node 0
is the root; :func:`children_table` builds it from the index CSR) and the paths of the items
``item_path[N+1, L]`` (global node id of each item's ancestor at levels 1..L).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RECTIFY_MODES = ("hard", "ratio")

# (users[K] user row of each row, candidates[K, C] global node ids, -1 padded) -> scores[K, C]
PairScorer = Callable[[Tensor, Tensor], Tensor]


def children_table(child_offsets: np.ndarray, child_ids: np.ndarray, max_branching: int) -> Tensor:
    """Dense children of every node from the index CSR: [num_nodes, max_branching] int64, -1 padded."""
    num_nodes = len(child_offsets) - 1
    counts = np.diff(child_offsets)  # [num_nodes]
    if counts.max(initial=0) > max_branching:
        raise ValueError(f"a node has {counts.max()} children, more than max_branching={max_branching}")
    table = np.full((num_nodes, max(max_branching, 1)), -1, dtype=np.int64)
    rows = np.repeat(np.arange(num_nodes), counts)  # [num_nodes-1]
    cols = np.arange(len(child_ids)) - np.repeat(child_offsets[:-1], counts)
    table[rows, cols] = child_ids
    return torch.from_numpy(table)


def sampled_softmax_loss(
    pos_logits: Tensor,
    neg_logits: Tensor,
    neg_log_q: Tensor,
    *,
    neg_valid: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Eq. 17-18: cross-entropy of the positive among itself and ``m`` sampled negatives.

    pos_logits: [R] raw score ``o`` of the positive node of each row (a row = one example at one level);
    neg_logits: [R, m] raw scores of the sampled negatives; neg_log_q: [R, m] ``ln q`` of each draw;
    neg_valid: [R, m] bool, False for draws to drop (accidental hits of the positive, padding);
    weights: [R] per-row loss weight (rectified labels; ``None`` = 1) -> scalar, the weighted sum
    over rows divided by R.

    Negatives get ``o - ln(m q)``; the positive keeps ``o`` (``- ln 1``). With ``q`` proportional to
    ``exp(o)`` the gradient is unbiased for every ``m``; for any other ``q`` it tends to the full-softmax
    gradient as ``m`` grows (tests/unit/training/test_tdr_sampling.py checks both).
    """
    if pos_logits.dim() != 1 or neg_logits.dim() != 2 or neg_logits.shape[0] != pos_logits.shape[0]:
        raise ValueError(
            f"pos_logits must be [R] and neg_logits [R, m], got {tuple(pos_logits.shape)} "
            f"and {tuple(neg_logits.shape)}"
        )
    if neg_log_q.shape != neg_logits.shape:
        raise ValueError(
            f"neg_log_q {tuple(neg_log_q.shape)} must match neg_logits {tuple(neg_logits.shape)}"
        )
    m = neg_logits.shape[1]
    corrected = neg_logits - (math.log(m) + neg_log_q)  # [R, m]
    if neg_valid is not None:
        corrected = corrected.masked_fill(~neg_valid, float("-inf"))
    logits = torch.cat([pos_logits[:, None], corrected], dim=1)  # [R, 1+m]
    nll = -F.log_softmax(logits, dim=1)[:, 0]  # [R]
    if weights is not None:
        nll = nll * weights
    return nll.sum() / max(pos_logits.shape[0], 1)


def level_sizes(item_path: Tensor, num_levels: int) -> list[tuple[int, int]]:
    """(first global id, number of nodes) of each level 1..L, from the items' paths [N+1, L]."""
    out = []
    for j in range(num_levels):
        col = item_path[1:, j]
        lo, hi = int(col.min()), int(col.max())
        out.append((lo, hi - lo + 1))
    return out


def uniform_negatives(
    pos_nodes: Tensor, levels: list[tuple[int, int]], m: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Uniform sampler: ``m`` draws with replacement among the other nodes of each level.

    pos_nodes: [B, L] global id of the positive node per level; levels: (first id, count) per level
    -> (neg_nodes [B, L, m] global ids, neg_log_q [B, L, m] = ``-ln(c(j) - 1)``, valid [B, L, m]).
    A level with a single node has no negative: its draws are invalid.
    """
    b, num_levels = pos_nodes.shape
    if len(levels) != num_levels:
        raise ValueError(f"pos_nodes has {num_levels} levels but levels describes {len(levels)}")
    first = torch.tensor([lo for lo, _ in levels], dtype=torch.int64)  # [L]
    count = torch.tensor([c for _, c in levels], dtype=torch.int64)  # [L]
    others = (count - 1).clamp(min=1)  # [L]
    u = torch.rand((b, num_levels, m), generator=generator)  # [B, L, m]
    r = (u * others[None, :, None]).long().clamp(max=(others - 1)[None, :, None])  # [B, L, m] in [0, c-2]
    pos_local = (pos_nodes - first[None, :])[:, :, None]  # [B, L, 1]
    local = r + (r >= pos_local).long()  # skip the positive
    neg_nodes = first[None, :, None] + local  # [B, L, m]
    neg_log_q = (-torch.log(others.double())).float()[None, :, None].expand(b, num_levels, m)
    valid = (count > 1)[None, :, None].expand(b, num_levels, m)
    return neg_nodes, neg_log_q.contiguous(), valid.contiguous()


@torch.no_grad()
def topdown_negatives(
    score_pairs: PairScorer,
    children: Tensor,
    batch_size: int,
    num_levels: int,
    m: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-down sampler (section 5.2): ``m`` root-to-leaf paths per user, each child drawn with the
    softmax of the model's scores over its siblings.

    score_pairs(users[B], candidates[B, C']) -> scores[B, C'] scores nodes for user rows (here
    ``users = arange(B)``, the candidates of a row being the children of all its paths' current
    nodes, so the model reads each user once per level); children: [num_nodes, C] dense children
    table (-1 padded) -> (nodes [B, L, m] the node of each path at each level, log_q [B, L, m] the
    log of the product of the edge softmaxes from the root, which is the exact marginal probability
    of that node under one path draw, since a node has one root path).
    """
    users = torch.arange(batch_size)
    nodes = torch.zeros((batch_size, m), dtype=torch.int64)  # [B, m] start at the root
    log_q = torch.zeros((batch_size, m))  # [B, m]
    out_nodes, out_log_q = [], []
    for level in range(num_levels):
        cand = children[nodes]  # [B, m, C]
        c = cand.shape[2]
        if level == 0:  # every path starts at the root: score its children once
            scores = score_pairs(users, cand[:, 0]).float()[:, None, :].expand(batch_size, m, c)
        else:
            scores = score_pairs(users, cand.reshape(batch_size, m * c)).float().reshape(batch_size, m, c)
        logp = torch.log_softmax(scores.masked_fill(cand < 0, float("-inf")), dim=2)  # [B, m, C]
        pick = torch.multinomial(logp.reshape(-1, c).exp(), 1, generator=generator).reshape(batch_size, m, 1)
        nodes = cand.gather(2, pick)[:, :, 0]  # [B, m]
        if (nodes < 0).any():
            raise ValueError("top-down sampling reached a node without children before the leaf level")
        log_q = log_q + logp.gather(2, pick)[:, :, 0]
        out_nodes.append(nodes)
        out_log_q.append(log_q)
    return torch.stack(out_nodes, dim=1), torch.stack(out_log_q, dim=1)  # [B, L, m] each


def rectified_weights(item_scores: Tensor, targets: Tensor, item_path: Tensor, mode: str = "hard") -> Tensor:
    """Eq. 15 labels without normalisation (what the paper optimises): weight of level ``j`` is 1
    when the target is the estimator's best item among the items under its level-``j`` ancestor.

    item_scores: [B, N+1] estimator logits (``log eta`` up to a per-row constant; column 0 ignored);
    targets: [B] dense ids; item_path: [N+1, L] -> weights [B, L]. ``mode="hard"``: the paper's
    indicator in {0, 1} (ties count as best). ``mode="ratio"``: ``eta_target / max eta`` under the
    ancestor, in (0, 1], equal to 1 exactly where the indicator is (a smooth relaxation for a weak
    estimator). The leaf level (a single item) always gets 1.
    """
    if mode not in RECTIFY_MODES:
        raise ValueError(f"rectify mode must be one of {RECTIFY_MODES}, got {mode!r}")
    b, n1 = item_scores.shape
    num_levels = item_path.shape[1]
    scores = item_scores.float().clone()
    scores[:, 0] = float("-inf")
    target_score = scores.gather(1, targets[:, None])[:, 0]  # [B]
    out = torch.empty((b, num_levels))
    for j in range(num_levels):
        col = item_path[:, j].clamp(min=0).long()  # [N+1], padding row -> node 0 with score -inf
        num = int(col.max()) + 1
        best = torch.full((b, num), float("-inf")).scatter_reduce(
            1, col[None, :].expand(b, n1), scores, reduce="amax", include_self=True
        )  # [B, nodes]
        best_under = best.gather(1, col[targets][:, None])[:, 0]  # [B] best score under the ancestor
        if mode == "hard":
            out[:, j] = (target_score >= best_under).float()
        else:
            out[:, j] = torch.exp((target_score - best_under).clamp(max=0.0))
    return out
