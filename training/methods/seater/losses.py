"""The three SEATER training losses (Si et al. 2024, eqs. 5, 6 and 8) as pure torch functions.

* :func:`generation_loss`  — teacher-forced cross-entropy along the identifier path, where each step is
  a softmax over the children of the current node only (eq. 4 / 5).
* :func:`alignment_loss`   — InfoNCE pulling every token embedding toward its parent's, in-batch
  negatives, cosine similarity over a temperature (eq. 6).
* :func:`ranking_loss`     — pairwise triplet loss over the positive identifier and ``q`` sampled
  identifiers with different shared-prefix lengths, adaptive margin ``beta * (num_a - num_b)`` and
  similarity ``sigmoid(z_x^T W z_y)`` (eq. 8).
* :func:`sample_ranking_negatives` — draws the ``q`` identifiers for the ranking loss from the tree.

Nothing here knows about modules, optimisers or data: the trainer (``training/seater.py``) feeds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.nets.decoder import PAD_SCORE
from training.methods.seater.config import SeaterConfig
from training.methods.seater.model import SeaterModel, TreeTables


def generation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Eq. 5: ``-sum_i log p(y_i | x, y_<i)``, averaged over the batch.

    logits: [B, L, C] decoder scores of the children of the level-i prefix node; ``-inf`` where a
        node has fewer than C children (those never receive probability).
    target: [B, L] int64 position of the true child among the C candidates of each level.
    Returns a scalar.
    """
    if logits.dim() != 3 or target.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, L, C] and target [B, L]; got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    log_probs = torch.log_softmax(logits, dim=-1)  # [B, L, C]
    picked = log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, L]
    return -picked.sum(dim=1).mean()


def alignment_loss(child_emb: Tensor, parent_emb: Tensor, parent_ids: Tensor, tau: float) -> Tensor:
    """Eq. 6: InfoNCE between each token and its parent, the other parents of the batch as negatives.

    child_emb:  [M, D] embeddings of M tokens j.
    parent_emb: [M, D] embeddings of their parents p(j) (row i is the positive of row i).
    parent_ids: [M] int64 token ids of the parents: a parent that appears on several rows is the
        positive of each of them, so its duplicates are removed from the denominator (a sibling's
        parent is the same token, not a negative).
    tau: temperature > 0.
    Returns the mean over the M tokens of ``-log(exp(cos(e_j, e_p)/tau) / sum_k exp(cos(e_j, e_k)/tau))``
    where k runs over the distinct parent tokens of the batch.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if child_emb.shape != parent_emb.shape or parent_ids.shape != child_emb.shape[:1]:
        raise ValueError(
            f"child_emb and parent_emb must both be [M, D] and parent_ids [M]; got "
            f"{tuple(child_emb.shape)}, {tuple(parent_emb.shape)}, {tuple(parent_ids.shape)}"
        )
    child = F.normalize(child_emb, dim=-1)  # [M, D]
    parent = F.normalize(parent_emb, dim=-1)  # [M, D]
    logits = child @ parent.T / tau  # [M, M] cos(e_i, e_p(k)) / tau
    m = parent_ids.shape[0]
    same = parent_ids.unsqueeze(0) == parent_ids.unsqueeze(1)  # [M, M]
    # keep only the first occurrence of every parent token as a column
    first = torch.arange(m, device=parent_ids.device)
    first_of = (
        torch.where(same, first.unsqueeze(0), m).min(dim=1).values
    )  # [M] first column holding row's parent
    duplicate_col = first_of != first  # [M] column k repeats an earlier parent
    logits = logits.masked_fill(duplicate_col.unsqueeze(0), float("-inf"))
    positive = logits.gather(1, first_of.unsqueeze(1)).squeeze(1)  # [M]
    return (torch.logsumexp(logits, dim=1) - positive).mean()


def pair_similarity(z_x: Tensor, z_y: Tensor, w: Tensor) -> Tensor:
    """``s(p, q) = sigmoid(p^T W q)``: z_x [B, D], z_y [B, Q, D], w [D, D] -> [B, Q]."""
    return torch.sigmoid(torch.einsum("bd,de,bqe->bq", z_x, w, z_y))


def ranking_loss(z_x: Tensor, z_y: Tensor, shared: Tensor, w: Tensor, beta: float) -> Tensor:
    """Eq. 8: pairwise triplet loss with an adaptive margin, averaged over the batch.

    z_x: [B, D] mean-pooled encoder states.
    z_y: [B, Q, D] mean-pooled decoder states of Q identifiers (the positive and q negatives).
    shared: [B, Q] number of tokens each identifier shares with the positive (the positive has L).
    w: [D, D] bilinear similarity weights.
    For every pair (a, b) with shared[a] > shared[b]:
    ``max(0, s(z_x, z_b) - s(z_x, z_a) + beta * (shared[a] - shared[b]))``; summed over pairs.
    """
    if z_y.dim() != 3 or z_x.shape[0] != z_y.shape[0] or shared.shape != z_y.shape[:2]:
        raise ValueError(
            f"z_x must be [B, D], z_y [B, Q, D], shared [B, Q]; got {tuple(z_x.shape)}, "
            f"{tuple(z_y.shape)}, {tuple(shared.shape)}"
        )
    sim = pair_similarity(z_x, z_y, w)  # [B, Q]
    diff = (shared.unsqueeze(2) - shared.unsqueeze(1)).to(sim.dtype)  # [B, Q(a), Q(b)] num_a - num_b
    hinge = torch.relu(sim.unsqueeze(1) - sim.unsqueeze(2) + beta * diff)  # [B, a, b]: s_b - s_a + margin
    return (hinge * (diff > 0)).sum(dim=(1, 2)).mean()


def sample_ranking_negatives(
    item_path: Tensor, positives: Tensor, shared_lengths: list[int], generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sample one identifier per shared-prefix length for every positive item.

    item_path: [N+1, L] int64 global node ids of each item's path (row 0 = padding, never sampled).
    positives: [B] int64 dense ids of the positive items.
    shared_lengths: the q prefix lengths (each in 0..L-1) the negatives must share with the positive.
    Returns (negatives [B, q] dense ids, shared [B, q] int64 number of tokens each shares with its
    positive). A negative shares exactly the requested prefix when the tree has such an item (a node
    with a single child cannot provide one; the drawn item then shares more tokens and ``shared``
    says so). Sampling is by rejection over uniform items; items that would share too much keep
    being re-drawn for a bounded number of rounds.
    """
    num_items = item_path.shape[0] - 1
    levels = item_path.shape[1]
    if any(not 0 <= s < levels for s in shared_lengths):
        raise ValueError(f"shared prefix lengths must be in [0, {levels - 1}], got {shared_lengths}")
    pos_path = item_path[positives]  # [B, L]
    b = positives.shape[0]
    out = torch.empty(b, len(shared_lengths), dtype=torch.int64, device=item_path.device)
    # Draw within the subtree of the ancestor at depth s: items are contiguous per subtree when sorted
    # by path, so sample a rank uniformly from the subtree's item range.
    order = _lexsort_paths(item_path[1:])  # [N] items sorted by path
    sorted_paths = item_path[1:][order]  # [N, L]
    for col, s in enumerate(shared_lengths):
        if s == 0:
            lo = torch.zeros(b, dtype=torch.int64, device=item_path.device)
            hi = torch.full((b,), num_items, dtype=torch.int64, device=item_path.device)
        else:
            anc = pos_path[:, s - 1]  # [B] ancestor at level s
            col_vals = sorted_paths[:, s - 1].contiguous()  # [N] sorted by path, so sorted here too
            lo = torch.searchsorted(col_vals, anc.contiguous())
            hi = torch.searchsorted(col_vals, anc.contiguous(), right=True)
        # exclude the positive's own child subtree at depth s+1 by rejection (a few rounds)
        pick = _uniform_in(lo, hi, generator)
        for _ in range(8):
            cand = order[pick] + 1
            clash = item_path[cand, s] == pos_path[:, s]
            if not bool(clash.any()):
                break
            pick = torch.where(clash, _uniform_in(lo, hi, generator), pick)
        out[:, col] = order[pick] + 1
    shared = _shared_prefix(item_path[out], pos_path.unsqueeze(1))  # [B, q]
    return out, shared


def _lexsort_paths(paths: Tensor) -> Tensor:
    """Permutation sorting [N, L] paths lexicographically (stable sorts from the last level up)."""
    order = torch.arange(paths.shape[0], device=paths.device)
    for level in range(paths.shape[1] - 1, -1, -1):
        order = order[torch.argsort(paths[order, level], stable=True)]
    return order


def _uniform_in(lo: Tensor, hi: Tensor, generator: torch.Generator | None) -> Tensor:
    """One uniform integer in [lo, hi) per row; lo, hi [B] int64."""
    u = torch.rand(lo.shape, generator=generator, device=lo.device, dtype=torch.float64)
    return (lo + (u * (hi - lo).to(torch.float64)).floor().to(torch.int64)).clamp(max=hi - 1)


def _shared_prefix(paths: Tensor, reference: Tensor) -> Tensor:
    """Number of leading tokens ``paths`` [..., L] shares with ``reference`` [..., L] (broadcast)."""
    equal = (paths == reference).to(torch.int64)  # [..., L]
    return equal.cumprod(dim=-1).sum(dim=-1)


# ---------------------------------------------------------------------------------------------- one step
@dataclass(frozen=True)
class LossParts:
    total: Tensor
    gen: Tensor
    ali: Tensor
    rank: Tensor


def seater_losses(
    model: SeaterModel,
    tables: TreeTables,
    cfg: SeaterConfig,
    history: Tensor,
    target: Tensor,
    generator: torch.Generator | None = None,
) -> LossParts:
    """The three losses on one batch: ``history[B, T]`` (0 = pad), ``target[B]`` dense ids."""
    mask = history > 0  # [B, T]
    memory, _ = model.encoder(history, mask)  # [B, T, D]
    B = history.shape[0]
    L = tables.item_path.shape[1]
    path = tables.paths[target]  # [B, L+1] root .. leaf
    paths = path[:, None]  # [B, 1, L+1]
    shared = None
    if cfg.rank:
        shared_lengths = list(range(L - 1, -1, -1))[: cfg.num_negatives]  # most similar first
        negatives, shared = sample_ranking_negatives(tables.item_path, target, shared_lengths, generator)
        paths = torch.cat([paths, tables.paths[negatives]], dim=1)  # [B, 1+q, L+1]
    all_states = model.path_states(memory, mask, paths)  # [B, 1+q, L+1, D]
    states = all_states[:, 0]  # [B, L+1, D] the positive

    # generation (eq. 5): position i predicts the level-(i+1) node among the children of path[i]
    cand = tables.children[path[:, :L]]  # [B, L, C]
    cand_emb = model.tokens(cand.clamp(min=0))  # [B, L, C, D]
    logits = torch.einsum("bld,blcd->blc", states[:, :L], cand_emb).masked_fill(cand < 0, PAD_SCORE)
    gen = generation_loss(logits, tables.child_pos[path[:, 1:]])
    zero = gen.new_zeros(())

    ali = zero
    if cfg.align and L >= 2:
        # eq. 6 level by level (a level's tokens against the distinct parents of the batch at the level
        # above): a token's own children are never among its negatives. Level 1 has a single parent
        # (the root), where InfoNCE is identically 0, so it is skipped.
        parts = []
        for level in range(2, L + 1):
            child, parent = path[:, level], path[:, level - 1]  # [B]
            parts.append(alignment_loss(model.tokens(child), model.tokens(parent), parent, cfg.tau))
        ali = torch.stack(parts).mean()

    rnk = zero
    if shared is not None:
        z_y = all_states.mean(dim=2)  # [B, 1+q, D] MEAN(Y) of each identifier (eq. 7)
        positive = torch.full((B, 1), L, dtype=shared.dtype, device=shared.device)
        weights = mask.to(memory.dtype)  # [B, T]
        z_x = (memory * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)  # [B, D]
        rnk = ranking_loss(z_x, z_y, torch.cat([positive, shared], dim=1), model.rank_w, cfg.beta)

    total = gen + cfg.lambda_align * ali + cfg.lambda_rank * rnk
    return LossParts(total=total, gen=gen, ali=ali, rank=rnk)


class SeaterLoss(nn.Module):
    """The training step as a module (DDP hooks ``forward``): ``(history[B, T], target[B]) -> (total, gen, ali, rank)``."""

    def __init__(self, model: SeaterModel, tables: TreeTables, cfg: SeaterConfig) -> None:
        super().__init__()
        self.model = model
        self.tables = tables
        self.cfg = cfg

    def forward(
        self, history: Tensor, target: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        parts = seater_losses(self.model, self.tables, self.cfg, history, target, generator)
        return parts.total, parts.gen, parts.ali, parts.rank
