"""URI's losses (Li et al., "Making Transformer Decoders Better Differentiable Indexers"), as pure torch.

Notation of the paper: at index level ``l`` the shared decoder gives a distribution over the ``k``
tokens of that level for a query (``P_Q``) and for an item (``P_I``). ``H(a, b)`` is the cross-entropy
``-sum a log b`` and ``H(b)`` the entropy. All functions take *logits* (the decoder's raw scores over
the ``k`` tokens) and return a scalar averaged over the batch, so that terms of one level add up
without a per-term normalisation.

* eq. 8  E-step     ``H(P_I, P_Q)``       -> :func:`e_step_loss`
* eq. 9  M-step     ``H(P_Q, P_I)``       -> :func:`m_step_loss`
*        commitment ``H(P_I)``            -> :func:`commitment_loss`
* eq. 10 balance    ``H_w(U^k, E[P_I])``  -> :func:`balance_loss` (weights: :func:`balance_weights`)
* eq. 11 memory     ``sum_i H(C^i, P_Q^i) + H(C^i, P_I^i)`` -> :func:`memory_loss`
* 4.3    ranker     sampled softmax over the positive and its negatives -> :func:`sampled_softmax_loss`

The two cross-entropies stop the gradient through their *target* distribution by default: the E-step
fits the queries to the current (soft) index, the M-step fits the index (the items) to the queries,
which is the EM reading of section 4.1. ``detach_target=False`` gives the undetached variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"{names} must both be [B, k] with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def cross_entropy_between(target_logits: Tensor, logits: Tensor, *, detach_target: bool = True) -> Tensor:
    """``H(softmax(target_logits), softmax(logits))`` averaged over rows.

    target_logits: [B, k]; logits: [B, k] -> scalar.
    """
    _check_pair(target_logits, logits, "target_logits and logits")
    target = F.softmax(target_logits, dim=-1)  # [B, k]
    if detach_target:
        target = target.detach()
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def e_step_loss(query_logits: Tensor, item_logits: Tensor, *, detach_target: bool = True) -> Tensor:
    """Eq. 8, ``H(P_I, P_Q)``: the query learns the token distribution of its positive item.

    query_logits: [B, k] (row b = the query of pair b); item_logits: [B, k] (its positive item) -> scalar.
    """
    return cross_entropy_between(item_logits, query_logits, detach_target=detach_target)


def m_step_loss(query_logits: Tensor, item_logits: Tensor, *, detach_target: bool = True) -> Tensor:
    """Eq. 9 first term, ``H(P_Q, P_I)``: the item learns the expected distribution of its queries.

    query_logits: [B, k]; item_logits: [B, k] -> scalar.
    """
    return cross_entropy_between(query_logits, item_logits, detach_target=detach_target)


def commitment_loss(item_logits: Tensor) -> Tensor:
    """Eq. 6, ``H(P_I)``: mean entropy of the items' distributions, pushing each towards one-hot.

    item_logits: [M, k] (positive and random items) -> scalar.
    """
    if item_logits.dim() != 2:
        raise ValueError(f"item_logits must be [M, k], got {tuple(item_logits.shape)}")
    log_p = F.log_softmax(item_logits, dim=-1)  # [M, k]
    return -(log_p.exp() * log_p).sum(-1).mean()


def balance_weights(mean_probs: Tensor) -> Tensor:
    """Eq. 10 adaptive weights ``w_j = |1/k - log E[p_j]| + 1``.

    mean_probs: [..., k] (``E_y[P_I]`` over the batch's items) -> [..., k]. The caller stops their gradient.
    """
    if mean_probs.dim() < 1:
        raise ValueError(f"mean_probs must be [..., k], got {tuple(mean_probs.shape)}")
    k = mean_probs.shape[-1]
    return (1.0 / k - torch.log(mean_probs)).abs() + 1.0


def balance_loss(
    item_logits: Tensor, *, adaptive: bool = True, groups: Tensor | None = None, eps: float = 1e-9
) -> Tensor:
    """Eq. 10, ``-sum_j sg(w_j) (1/k) log E_y[p_j]`` over the batch's items (eq. 7 when not adaptive).

    item_logits: [M, k] (positive and random items) -> scalar. ``groups[M]`` (int64, optional):
    the items' parent nodes; the loss is then the mean over the groups present of the loss within
    each group, so that every parent's children are balanced, not only the level as a whole.
    """
    if item_logits.dim() != 2:
        raise ValueError(f"item_logits must be [M, k], got {tuple(item_logits.shape)}")
    k = item_logits.shape[1]
    probs = F.softmax(item_logits, dim=-1)  # [M, k]
    if groups is None:
        mean_probs = probs.mean(0, keepdim=True)  # [1, k]
    else:
        if groups.shape != item_logits.shape[:1]:
            raise ValueError(f"groups must be [M] = [{item_logits.shape[0]}], got {tuple(groups.shape)}")
        _, slot = torch.unique(groups, return_inverse=True)  # [M] in 0..G-1
        G = int(slot.max()) + 1
        sums = probs.new_zeros(G, k).index_add(0, slot, probs)  # [G, k]
        counts = probs.new_zeros(G).index_add(0, slot, torch.ones_like(slot, dtype=probs.dtype))  # [G]
        mean_probs = sums / counts[:, None]  # [G, k]
    mean_probs = mean_probs.clamp_min(eps)
    log_mean = torch.log(mean_probs)  # [G, k]
    weights = balance_weights(mean_probs.detach()) if adaptive else torch.ones_like(log_mean)
    return -(weights * log_mean).sum(-1).mean() / k


def memory_loss(query_logits: list[Tensor], item_logits: list[Tensor], codes: Tensor) -> Tensor:
    """Eq. 11 for the already assigned levels ``1..l``: ``sum_i H(C^i, P_Q^i) + H(C^i, P_I^i)``.

    query_logits[i]: [B, k_i] for the query at level i (teacher-forced with the item's codes before i);
    item_logits[i]: [B, k_i] for the item at level i; codes: [B, l] int64 assigned tokens of the item.
    Returns a scalar (0 when no level is assigned yet, eq. 11 with ``L^0_memory = 0``).
    """
    if len(query_logits) != len(item_logits):
        raise ValueError(f"{len(query_logits)} query levels but {len(item_logits)} item levels")
    if not query_logits:
        return codes.new_zeros((), dtype=torch.float32)
    if codes.dim() != 2 or codes.shape[1] < len(query_logits):
        raise ValueError(f"codes must be [B, >= {len(query_logits)}], got {tuple(codes.shape)}")
    total = query_logits[0].new_zeros(())
    for level, (q, i) in enumerate(zip(query_logits, item_logits, strict=True)):
        target = codes[:, level]  # [B]
        total = total + F.cross_entropy(q, target) + F.cross_entropy(i, target)
    return total


def sampled_softmax_loss(query: Tensor, positive: Tensor, negatives: Tensor) -> Tensor:
    """Section 4.3 ranker: softmax over ``[positive, negatives]`` of inner products, positive at 0.

    query: [B, D]; positive: [B, D]; negatives: [B, n, D] -> scalar.
    """
    if query.shape != positive.shape or negatives.dim() != 3 or negatives.shape[0] != query.shape[0]:
        raise ValueError(
            f"expected query [B, D], positive [B, D], negatives [B, n, D]; got {tuple(query.shape)}, "
            f"{tuple(positive.shape)}, {tuple(negatives.shape)}"
        )
    pos = (query * positive).sum(-1, keepdim=True)  # [B, 1]
    neg = torch.einsum("bd,bnd->bn", query, negatives)  # [B, n]
    logits = torch.cat([pos, neg], dim=1)  # [B, 1+n]
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))
