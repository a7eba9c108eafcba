"""SASRec's next-item loss: a full softmax, or a sampled one with the log-q correction."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.methods.sasrec.config import SASRecConfig
from training.methods.sasrec.model import SASRecModule


def next_item_loss(
    module: SASRecModule,
    net: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: SASRecConfig,
    log_q: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Next-item cross-entropy over ``inputs/targets [B, L]`` (0 = padding).

    ``net`` runs the forward pass: ``module`` itself, or its DDP wrapper under torchrun.
    ``log_q [N+1]``: the in-batch sampling log-probability of every item.
    """
    hidden = net(inputs)  # [B, L, D]
    mask = targets > 0
    h = hidden[mask]  # [P, D]
    pos = targets[mask]  # [P]
    emb = module.item_emb.weight  # [N+1, D]
    if config.loss == "full":
        return F.cross_entropy(module.item_logits(h), pos)
    if config.negatives == "in_batch":
        logits = h @ emb[pos].T - log_q[pos][None, :]  # [P, P], log-q corrected
        same = pos[None, :] == pos[:, None]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))  # other rows' copies of the positive
        return F.cross_entropy(logits, torch.arange(len(pos), device=pos.device))
    num_items = emb.shape[0] - 1
    neg = torch.randint(1, num_items + 1, (config.num_negatives,), generator=generator).to(emb.device)  # [M]
    pos_logit = (h * emb[pos]).sum(-1, keepdim=True)  # [P, 1]
    neg_logit = (h @ emb[neg].T).masked_fill(neg[None, :] == pos[:, None], float("-inf"))  # [P, M]
    correction = math.log(config.num_negatives / num_items)  # uniform q: the same for every candidate
    logits = torch.cat([pos_logit, neg_logit], dim=1) - correction  # [P, 1+M]
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device))
