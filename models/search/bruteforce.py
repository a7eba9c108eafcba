"""Exact inner-product top-K over the whole item table: the baseline the generative path is measured
against (``GENRET_SEARCH_MODE=bruteforce``), served through the same batcher, cache and routes.

The table is scored in chunks of :data:`CHUNK_ROWS` items, each chunk's top-k kept, and the
``chunks × k`` survivors cut to k at the end: the same items and scores as scoring the whole table
at once, with ``[B, CHUNK_ROWS]`` scores in memory instead of ``[B, N+1]`` (a 64-row batch over
10M items would be a 2.5 GB matrix per batch).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

CHUNK_ROWS = 65_536


def _exclusions(exclude: list[np.ndarray] | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Every excluded (row, item) pair as two flat ``[P]`` int64 tensors."""
    if not exclude:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    ids = [np.asarray(e, np.int64).reshape(-1) for e in exclude]
    rows = np.repeat(np.arange(len(ids), dtype=np.int64), [len(e) for e in ids])
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    return torch.from_numpy(rows).to(device), torch.from_numpy(flat).to(device)


def bruteforce_topk(
    query: Tensor, item_emb: Tensor, k: int, exclude: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``query [B, Dr]`` against ``item_emb [N+1, Dr]`` (row 0 = padding) -> dense ids and scores ``[B, k]``.

    Padding (0) and excluded items never appear; ids are 0 and scores -inf where fewer than k exist.
    """
    num_rows = item_emb.shape[0]
    q = query.to(item_emb.dtype)  # [B, Dr]
    ex_rows, ex_ids = _exclusions(exclude, item_emb.device)
    best_scores, best_ids = [], []
    for lo in range(0, num_rows, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, num_rows)
        scores = q @ item_emb[lo:hi].T  # [B, c]
        if lo == 0:
            scores[:, 0] = float("-inf")  # padding
        inside = (ex_ids >= lo) & (ex_ids < hi)
        if bool(inside.any()):
            scores[ex_rows[inside], ex_ids[inside] - lo] = float("-inf")
        top_scores, top_idx = torch.topk(scores, min(k, hi - lo), dim=1)  # [B, k']
        best_scores.append(top_scores)
        best_ids.append(top_idx + lo)
    scores_all, ids_all = torch.cat(best_scores, dim=1), torch.cat(best_ids, dim=1)  # [B, chunks*k']
    take = min(k, num_rows)
    top_scores, pos = torch.topk(scores_all, take, dim=1)  # [B, take]
    ids = ids_all.gather(1, pos).cpu().numpy().astype(np.int64)
    vals = top_scores.float().cpu().numpy()
    ids[~np.isfinite(vals)] = 0
    if take < k:
        pad = k - take
        ids = np.pad(ids, ((0, 0), (0, pad)))
        vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, vals
