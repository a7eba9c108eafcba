"""Per-request constraints inside the search: allow-lists, exclusions, and a guaranteed k.

* :func:`node_keys`: what each row may return, as node constraints for the beam search
  (:class:`models.search.beam.NodeKeys`): with an allow-list, the nodes above at least one allowed,
  unexcluded live item (a per-subtree count above zero); with exclusions, the leaves every live item
  of which is excluded. The beam never spends width on a branch with nothing left to return.
* :func:`item_member`: the same constraints on the rerank's candidates (a URI bucket may hold
  allowed and other items).
* :func:`dense_fill`: when a row still has fewer than k items and more exist, the rest comes from
  exact inner product over the items the row may return (the response says how many).
* An allow-list of at most ``EXACT_ALLOW_ITEMS`` items is scored exactly instead: that costs
  ``|allow| x Dr`` multiply-adds (50,000 x 64 = 3.2M, well under a millisecond on one core), less than
  the beam's decoder steps, and answers the exact top-k over the allowed items whatever the index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.index import TreeIndex
from models.search.beam import NodeKeys, sorted_member

EXACT_ALLOW_ITEMS = 50_000  # allow-lists up to this size are scored exactly (module docstring)


@dataclass(frozen=True)
class ItemLookup:
    """The host arrays of one catalogue version that the constraints read."""

    item_path: np.ndarray  # [N+1, L] int32 global node per level (row 0: -1)
    leaf_size: np.ndarray  # [num_leaves] live items per leaf
    leaf_start: int
    num_nodes: int
    live: np.ndarray  # [N+1] bool: may be returned

    @classmethod
    def of(cls, index: TreeIndex, live: np.ndarray | None = None) -> ItemLookup:
        if live is None:
            live = np.ones(index.num_items + 1, bool)
            live[0] = False
        return cls(
            item_path=index.item_path,
            leaf_size=np.diff(index.leaf_offsets),
            leaf_start=index.leaf_start,
            num_nodes=index.num_nodes,
            live=live,
        )

    @property
    def num_rows(self) -> int:
        return len(self.live)

    def allowed_items(self, allow: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
        """The live items of ``allow`` not in ``exclude``, unique ascending."""
        a = np.unique(np.asarray(allow, np.int64))
        a = a[(a > 0) & (a < self.num_rows)]
        a = a[self.live[a]]
        if exclude is not None and len(exclude):
            a = a[~np.isin(a, exclude)]
        return a

    def full_leaves(self, exclude: np.ndarray) -> np.ndarray:
        """Leaves (global ids) all of whose live items are in ``exclude``."""
        e = np.unique(np.asarray(exclude, np.int64))
        e = e[(e > 0) & (e < self.num_rows)]
        e = e[self.live[e]]
        leaves, count = np.unique(self.item_path[e, -1].astype(np.int64), return_counts=True)
        return leaves[count >= self.leaf_size[leaves - self.leaf_start]]


def _rows(rows: Sequence[np.ndarray | None] | None, B: int, name: str) -> list[np.ndarray | None]:
    if rows is None:
        return [None] * B
    if len(rows) != B:
        raise ValueError(f"{name} has {len(rows)} rows, the batch has {B}")
    return [None if r is None else np.asarray(r, np.int64).reshape(-1) for r in rows]


def node_keys(
    lookup: ItemLookup,
    batch_size: int,
    exclude: Sequence[np.ndarray] | None,
    allow: Sequence[np.ndarray | None] | None,
    device: torch.device,
) -> NodeKeys | None:
    """The beam's node constraints for a batch (``None`` when no row has any)."""
    excl, allw = _rows(exclude, batch_size, "exclude"), _rows(allow, batch_size, "allow")
    n = lookup.num_nodes
    allowed, blocked = [], []
    allow_rows = np.zeros(batch_size, bool)
    for r in range(batch_size):
        if allw[r] is not None:
            allow_rows[r] = True
            items = lookup.allowed_items(allw[r], excl[r])  # type: ignore[arg-type]
            nodes = np.unique(lookup.item_path[items].astype(np.int64).reshape(-1))
            allowed.append(r * n + nodes)
        elif excl[r] is not None and len(excl[r]):  # type: ignore[arg-type]
            blocked.append(r * n + lookup.full_leaves(excl[r]))  # type: ignore[arg-type]
    if not allow_rows.any() and not any(len(b) for b in blocked):
        return None

    def keys(parts: list[np.ndarray]) -> Tensor:
        flat = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return torch.from_numpy(flat.astype(np.int64)).to(device)

    return NodeKeys(
        num_nodes=n,
        allow_rows=torch.from_numpy(allow_rows).to(device),
        allowed=keys(allowed),
        blocked=keys(blocked),
    )


def in_rows(items: Tensor, rows: Sequence[np.ndarray | None], name: str, width: int) -> tuple[Tensor, Tensor]:
    """``items [B, C]`` dense ids below ``width``, ``rows``: per row a list of ids or ``None`` ->
    ``(listed [B], member [B, C])`` bool: the row has a list, the item is in it (one sorted array of
    ``row * width + id`` keys; no read of ``items`` on the host)."""
    B = items.shape[0]
    lists = _rows(rows, B, name)
    parts = [r * width + np.unique(a[(a >= 0) & (a < width)]) for r, a in enumerate(lists) if a is not None]
    listed = torch.tensor([a is not None for a in lists], dtype=torch.bool, device=items.device)
    flat = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    keys = torch.from_numpy(flat.astype(np.int64)).to(items.device)
    key = torch.arange(B, device=items.device)[:, None] * width + items
    return listed, sorted_member(keys, key)


def item_member(items: Tensor, allow: Sequence[np.ndarray | None], width: int) -> Tensor:
    """``items [B, C]`` -> bool ``[B, C]``: the item may be returned under its row's allow-list
    (rows without one: every item)."""
    listed, member = in_rows(items, allow, "allow", width)
    return ~listed[:, None] | member


def dense_fill(
    lookup: ItemLookup,
    item_emb: Tensor,
    query: Tensor,
    have: np.ndarray,
    need: int,
    allow: np.ndarray | None,
    exclude: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``need`` more items for one row by exact ``query [Dr] · item_emb [N+1, Dr]`` over the
    items it may return (its allow-list, else every live item) minus ``exclude`` and ``have``:
    ``(items [m], scores [m])``, best first."""
    if allow is not None:
        cands = lookup.allowed_items(allow, exclude)
    else:
        cands = np.flatnonzero(lookup.live)
        if exclude is not None and len(exclude):
            cands = cands[~np.isin(cands, exclude)]
    cands = cands[~np.isin(cands, have)]
    if len(cands) == 0 or need < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    idx = torch.from_numpy(cands).to(item_emb.device)
    scores = item_emb.index_select(0, idx) @ query  # [n]
    top_scores, top = torch.topk(scores, min(need, len(cands)))
    return cands[top.cpu().numpy()], top_scores.float().cpu().numpy()


def fill_rows(
    lookup: ItemLookup,
    item_emb: Tensor,
    items: np.ndarray,
    scores: np.ndarray,
    filled: np.ndarray,
    targets: Sequence[int],
    query: Tensor,
    exclude: Sequence[np.ndarray] | None,
    allow: Sequence[np.ndarray | None] | None,
    offset: np.ndarray | None = None,
) -> None:
    """Complete, in place, every row of ``items [B,k]`` / ``scores [B,k]`` holding fewer than its
    target by :func:`dense_fill` (``query [B, Dr]``), then order the row by score (the fill may find
    better items than the beam did); ``filled [B]`` counts the items added. ``offset [B]`` is added
    to the inner products of the items a row takes (:func:`models.search.rerank.fill_offset`)."""
    counts = (items > 0).sum(axis=1)
    for r in np.flatnonzero(counts < np.asarray(targets)).tolist():
        k = int(targets[r])
        have = items[r][items[r] > 0]
        more, more_scores = dense_fill(
            lookup,
            item_emb,
            query[r],
            have,
            k - len(have),
            None if allow is None else allow[r],
            None if exclude is None else np.asarray(exclude[r], np.int64),
        )
        n, m = len(have), len(more)
        items[r, n : n + m] = more
        scores[r, n : n + m] = more_scores + (0.0 if offset is None else offset[r])
        order = np.argsort(-scores[r, : n + m], kind="stable")
        items[r, : n + m], scores[r, : n + m] = items[r, order], scores[r, order]
        filled[r] += m
