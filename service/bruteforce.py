"""Exact inner-product top-K over the whole item table: the baseline the generative path is measured
against (``GENRET_SEARCH_MODE=bruteforce``), served through the same batcher, cache and routes."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def bruteforce_topk(
    query: Tensor, item_emb: Tensor, k: int, exclude: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``query [B, Dr]`` against ``item_emb [N+1, Dr]`` (row 0 = padding) -> dense ids and scores ``[B, k]``.

    Padding (0) and excluded items never appear; ids are 0 and scores -inf where fewer than k exist.
    """
    num_rows = item_emb.shape[0]
    scores = query.to(item_emb.dtype) @ item_emb.T  # [B, N+1]
    scores[:, 0] = float("-inf")
    if exclude is not None:
        for row, ids in enumerate(exclude):
            if len(ids):
                scores[row, torch.as_tensor(ids, dtype=torch.long, device=scores.device)] = float("-inf")
    take = min(k, num_rows)
    top_scores, top_ids = torch.topk(scores, take, dim=1)  # [B, take]
    ids = top_ids.cpu().numpy().astype(np.int64)
    vals = top_scores.float().cpu().numpy()
    ids[~np.isfinite(vals)] = 0
    if take < k:
        pad = k - take
        ids = np.pad(ids, ((0, 0), (0, pad)))
        vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, vals
