"""The item index: a rooted tree of depth L whose leaves hold items (docs/CONTRACTS.md "models/index.py").

Nodes get global ids level by level (root = 0), and inside a level in lexicographic order of
their code prefix, so the children of a node are contiguous and the CSR ``child_ids`` is simply
``1 .. num_nodes-1`` for an index built by :meth:`TreeIndex.from_codes` (``validate`` does not
rely on that: any consistent CSR passes).

Codes are level-local cluster indices: ``codes[i, l]`` is the index (in ``[0, branching_l)``) of
item ``i``'s cluster among the children of its level-``l`` parent. Items with the same full code
share a leaf (URI buckets); with distinct codes every leaf holds one item (SEATER, TDR). A code
value that no item uses makes no node: an empty subtree simply does not exist. Every leaf is at
level L (codes have full length L); the clustering that produces the codes pads early stops with
single-child chains (see ``training/clustering.py``).

Token schemes (the decoder vocabulary):

* ``"level"`` (URI): a node's token is its code at its level, shared across parents and levels;
  ``num_tokens = max_branching``.
* ``"node"`` (SEATER, TDR): a node's token is its global node id; ``num_tokens = num_nodes``.

The root's token is 0 in both schemes; it is always position 0 of a prefix, never a candidate.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

TOKEN_SCHEMES = ("level", "node")
_ARRAYS = (
    "level_offsets",
    "child_offsets",
    "child_ids",
    "node_token",
    "leaf_offsets",
    "leaf_items",
    "item_path",
)
_FORMAT_VERSION = 1

ScoreMode = Literal["logprob", "node"]
"""How scores combine across levels: ``logprob`` (log-softmax over a beam's children, summed along the
path: URI, SEATER) or ``node`` (a node's raw score, ranked across all expanded children: TDR). A
bundle's manifest names it; the beam search reads it (:mod:`models.search.beam`)."""
SCORE_MODES: tuple[str, ...] = ("logprob", "node")


class IndexValidationError(ValueError):
    """The index arrays are inconsistent (message names the first broken invariant)."""


@dataclass(frozen=True)
class TreeIndex:
    """Tree index arrays (global node ids, CSR children, leaf -> items CSR, item -> path)."""

    level_offsets: np.ndarray  # [L+2] int64: level l holds nodes level_offsets[l] .. level_offsets[l+1]-1
    child_offsets: np.ndarray  # [num_nodes+1] int64
    child_ids: np.ndarray  # [num_nodes-1] int64
    node_token: np.ndarray  # [num_nodes] int32
    leaf_offsets: np.ndarray  # [num_leaves+1] int64; leaf j = global node level_offsets[L]+j
    leaf_items: np.ndarray  # [N] int64 dense item ids
    item_path: np.ndarray  # [N+1, L] int32 global node id per level, row 0 = -1
    token_scheme: str
    levels: int
    num_nodes: int
    num_items: int
    max_branching: int
    num_tokens: int

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(
        cls,
        codes: np.ndarray,
        branching: int | Sequence[int],
        token_scheme: str = "level",
    ) -> TreeIndex:
        """Build the index from per-item codes ``[N+1, L]`` (row 0, the padding item, is ignored).

        ``branching`` is the declared number of children per node, one int for every level or one
        per level; every code at level ``l`` must lie in ``[0, branching_l)``.
        """
        if token_scheme not in TOKEN_SCHEMES:
            raise ValueError(f"token_scheme must be one of {TOKEN_SCHEMES}, got {token_scheme!r}")
        body, branch = _checked_codes(codes, branching)  # [N, L], [L]
        num_items, levels = body.shape
        order, level_offsets, item_path, parents, tokens, leaf_node = _prefix_nodes(body)
        num_nodes = int(level_offsets[-1])

        child_counts = np.bincount(parents, minlength=num_nodes)
        child_offsets = np.zeros(num_nodes + 1, np.int64)
        np.cumsum(child_counts, out=child_offsets[1:])
        child_ids = np.arange(1, num_nodes, dtype=np.int64)  # parents are non-decreasing by construction

        leaf_start = int(level_offsets[levels])
        num_leaves = num_nodes - leaf_start
        leaf_of_sorted = leaf_node - leaf_start  # [N]
        leaf_offsets = np.zeros(num_leaves + 1, np.int64)
        np.cumsum(np.bincount(leaf_of_sorted, minlength=num_leaves), out=leaf_offsets[1:])
        leaf_items = (order + 1).astype(np.int64)  # sorted by leaf already

        max_branching = int(branch.max())
        if token_scheme == "level":
            node_token = tokens.astype(np.int32)
            num_tokens = max_branching
        else:
            node_token = np.arange(num_nodes, dtype=np.int32)
            num_tokens = num_nodes
        return cls(
            level_offsets=level_offsets,
            child_offsets=child_offsets,
            child_ids=child_ids,
            node_token=node_token,
            leaf_offsets=leaf_offsets,
            leaf_items=leaf_items,
            item_path=item_path,
            token_scheme=token_scheme,
            levels=levels,
            num_nodes=num_nodes,
            num_items=num_items,
            max_branching=max_branching,
            num_tokens=num_tokens,
        )

    # ------------------------------------------------------------------ derived views
    @property
    def num_leaves(self) -> int:
        return int(self.level_offsets[-1] - self.level_offsets[self.levels])

    @property
    def leaf_start(self) -> int:
        """Global node id of leaf 0."""
        return int(self.level_offsets[self.levels])

    def leaf_of_item(self) -> np.ndarray:
        """``[N+1]`` leaf index (0-based, not the global id) of every item, -1 for row 0."""
        out = np.full(self.num_items + 1, -1, np.int64)
        out[1:] = self.item_path[1:, -1].astype(np.int64) - self.leaf_start
        return out

    def items_of_leaf(self, leaf: int) -> np.ndarray:
        """Dense item ids in leaf ``leaf`` (0-based leaf index)."""
        return self.leaf_items[self.leaf_offsets[leaf] : self.leaf_offsets[leaf + 1]]

    def children(self, node: int) -> np.ndarray:
        """Global ids of the children of one node."""
        return self.child_ids[self.child_offsets[node] : self.child_offsets[node + 1]]

    def parents(self) -> np.ndarray:
        """``[num_nodes]`` parent global id of every node, -1 for the root."""
        parent = np.full(self.num_nodes, -1, np.int64)
        counts = np.diff(self.child_offsets)
        parent[self.child_ids] = np.repeat(np.arange(self.num_nodes, dtype=np.int64), counts)
        return parent

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check every invariant; raise :class:`IndexValidationError` naming the first broken one."""

        def fail(msg: str) -> None:
            raise IndexValidationError(f"invalid index: {msg}")

        L, n, N = self.levels, self.num_nodes, self.num_items
        lo = self.level_offsets
        if self.token_scheme not in TOKEN_SCHEMES:
            fail(f"token_scheme {self.token_scheme!r} not in {TOKEN_SCHEMES}")
        if L < 1 or lo.shape != (L + 2,):
            fail(f"level_offsets must have L+2={L + 2} entries, has shape {lo.shape}")
        if lo[0] != 0 or lo[1] != 1 or lo[-1] != n or (np.diff(lo) < 1).any():
            fail(f"level_offsets must start 0, 1, grow strictly and end at num_nodes={n}: {lo.tolist()}")
        shapes = {
            "child_offsets": (self.child_offsets, (n + 1,)),
            "child_ids": (self.child_ids, (n - 1,)),
            "node_token": (self.node_token, (n,)),
            "leaf_offsets": (self.leaf_offsets, (self.num_leaves + 1,)),
            "leaf_items": (self.leaf_items, (N,)),
            "item_path": (self.item_path, (N + 1, L)),
        }
        for name, (arr, shape) in shapes.items():
            if arr.shape != shape:
                fail(f"{name} has shape {arr.shape}, expected {shape}")
            if not np.issubdtype(arr.dtype, np.integer):
                fail(f"{name} has dtype {arr.dtype}, expected integers")
        co = self.child_offsets
        if co[0] != 0 or co[-1] != n - 1 or (np.diff(co) < 0).any():
            fail("child_offsets must start at 0, be non-decreasing and end at num_nodes-1")
        ci = self.child_ids
        if ((ci < 1) | (ci >= n)).any() or (np.bincount(ci, minlength=n)[1:] != 1).any():
            fail("every non-root node must be the child of exactly one node")
        level_of = np.repeat(np.arange(L + 1), np.diff(lo))  # [num_nodes]
        parent = self.parents()
        if (level_of[ci] != level_of[parent[ci]] + 1).any():
            fail("a child is not one level below its parent")
        counts = np.diff(co)
        if (counts[lo[L] :] != 0).any():
            fail("a leaf has children")
        if (counts[: lo[L]] == 0).any():
            node = int(np.flatnonzero(counts[: lo[L]] == 0)[0])
            fail(f"internal node {node} has no children (empty subtrees must not have nodes)")
        if counts.max() > self.max_branching:
            fail(f"a node has {counts.max()} children, more than max_branching={self.max_branching}")
        if ((self.node_token < 0) | (self.node_token >= self.num_tokens)).any():
            fail(f"node_token outside [0, num_tokens={self.num_tokens})")
        if self.token_scheme == "node" and not np.array_equal(self.node_token, np.arange(n)):
            fail("with token_scheme 'node' the token of a node must be its global id")
        lf = self.leaf_offsets
        if lf[0] != 0 or lf[-1] != N or (np.diff(lf) < 1).any():
            fail("leaf_offsets must start at 0, end at N and give every leaf at least one item")
        if not np.array_equal(np.sort(self.leaf_items), np.arange(1, N + 1)):
            fail("leaf_items must hold every dense item id 1..N exactly once")
        if (self.item_path[0] != -1).any():
            fail("item_path row 0 (padding) must be -1")
        path = self.item_path[1:].astype(np.int64)  # [N, L]
        if ((path < lo[1:-1][None, :]) | (path >= lo[2:][None, :])).any():
            fail("item_path holds a node outside its level")
        if (parent[path[:, 0]] != 0).any() or (parent[path[:, 1:]] != path[:, :-1]).any():
            fail("item_path is not a parent chain from the root")
        leaf_of_item = np.empty(N + 1, np.int64)
        leaf_of_item[self.leaf_items] = np.repeat(np.arange(self.num_leaves), np.diff(lf))
        if not np.array_equal(leaf_of_item[1:], path[:, -1] - lo[L]):
            fail("item_path's leaf disagrees with leaf_items")

    def stats(self) -> dict[str, Any]:
        """Depth, branching per level, leaf-size distribution and balance."""
        counts = np.diff(self.child_offsets)
        lo = self.level_offsets
        per_level = []
        for level in range(self.levels):
            c = counts[lo[level] : lo[level + 1]]
            per_level.append(
                {
                    "level": level + 1,
                    "nodes": int(lo[level + 2] - lo[level + 1]),
                    "branching_min": int(c.min()),
                    "branching_max": int(c.max()),
                    "branching_mean": float(c.mean()),
                }
            )
        sizes = np.diff(self.leaf_offsets)
        return {
            "levels": self.levels,
            "num_nodes": self.num_nodes,
            "num_leaves": self.num_leaves,
            "num_items": self.num_items,
            "max_branching": self.max_branching,
            "num_tokens": self.num_tokens,
            "token_scheme": self.token_scheme,
            "per_level": per_level,
            "leaf_size_min": int(sizes.min()),
            "leaf_size_max": int(sizes.max()),
            "leaf_size_mean": float(sizes.mean()),
            "leaf_size_p50": float(np.percentile(sizes, 50)),
            "leaf_size_p99": float(np.percentile(sizes, 99)),
            # 1.0 = all leaves the same size; max/mean grows as the tree gets less balanced
            "leaf_balance_max_over_mean": float(sizes.max() / sizes.mean()),
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``index.npz`` (plain arrays, no pickle). Returns the path written."""
        path = Path(path)
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        meta = np.asarray(
            [
                _FORMAT_VERSION,
                self.levels,
                self.num_nodes,
                self.num_items,
                self.max_branching,
                self.num_tokens,
            ],
            np.int64,
        )
        with path.open("wb") as fh:
            np.savez(fh, meta=meta, token_scheme=np.asarray(self.token_scheme), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path, *, validate: bool = True) -> TreeIndex:
        """Read an ``index.npz`` written by :meth:`save`; validated unless ``validate=False``."""
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                missing = [k for k in (*_ARRAYS, "meta", "token_scheme") if k not in data.files]
                if missing:
                    raise IndexValidationError(f"{path}: index.npz lacks arrays {missing}")
                arrays = {name: data[name] for name in _ARRAYS}
                meta = data["meta"].tolist()
                token_scheme = str(data["token_scheme"])
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            if isinstance(exc, IndexValidationError):
                raise
            raise IndexValidationError(f"{path}: cannot read index.npz: {exc}") from exc
        if len(meta) != 6 or meta[0] != _FORMAT_VERSION:
            raise IndexValidationError(
                f"{path}: unsupported index format {meta[:1]}, expected {_FORMAT_VERSION}"
            )
        _, levels, num_nodes, num_items, max_branching, num_tokens = (int(v) for v in meta)
        index = cls(
            **arrays,
            token_scheme=token_scheme,
            levels=levels,
            num_nodes=num_nodes,
            num_items=num_items,
            max_branching=max_branching,
            num_tokens=num_tokens,
        )
        if validate:
            index.validate()
        return index


def _checked_codes(codes: np.ndarray, branching: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``codes [N+1, L]`` checked against ``branching``: returns the item rows ``[N, L]`` int64
    (padding row dropped) and the per-level branching ``[L]`` int64."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] < 2 or codes.shape[1] < 1:
        raise ValueError(f"codes must be [N+1, L] with N >= 1 and L >= 1, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    levels = codes.shape[1]
    branch = np.asarray([branching] * levels if isinstance(branching, int) else list(branching), np.int64)
    if branch.shape != (levels,) or (branch < 1).any():
        raise ValueError(f"branching must be >= 1, one value or one per level ({levels}), got {branching}")
    body = codes[1:].astype(np.int64)  # [N, L]
    bad = (body < 0) | (body >= branch[None, :])
    if bad.any():
        item, level = np.argwhere(bad)[0]
        raise ValueError(
            f"code of item {item + 1} at level {level + 1} is {body[item, level]}, outside [0, {branch[level]})"
        )
    return body, branch


def _prefix_nodes(
    body: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One node per distinct code prefix, numbered level by level in prefix order.

    ``body`` is ``[N, L]`` item codes. Returns ``order [N]`` (items sorted by full code, 0-based),
    ``level_offsets [L+2]``, ``item_path [N+1, L]`` int32 (row 0 = -1), ``parents [num_nodes-1]``
    (the parent of nodes ``1..num_nodes-1``), ``tokens [num_nodes]`` (each node's code at its
    level, root 0) and ``leaf_node [N]`` (the global leaf node of each sorted item).
    """
    num_items, levels = body.shape
    # Sort items by full code: every level's prefixes are then sorted too.
    order = np.lexsort(body.T[::-1])  # [N], primary key = level 1
    sorted_codes = body[order]  # [N, L]
    level_offsets = np.zeros(levels + 2, np.int64)
    level_offsets[1] = 1
    item_path = np.full((num_items + 1, levels), -1, np.int32)
    parent_of_level: list[np.ndarray] = []  # per level: global parent id of each node [n_l]
    tokens = [np.zeros(1, np.int64)]  # root token 0
    prev_node_of_item = np.zeros(num_items, np.int64)  # sorted items -> global node at previous level
    for level in range(levels):
        # a new node starts wherever the prefix up to this level changes
        new = np.ones(num_items, bool)
        new[1:] = (sorted_codes[1:, : level + 1] != sorted_codes[:-1, : level + 1]).any(axis=1)
        local = np.cumsum(new) - 1  # [N] node index within the level
        first = np.flatnonzero(new)  # [n_l] first sorted item of each node
        start = level_offsets[level + 1]
        level_offsets[level + 2] = start + first.size
        node_of_item = start + local
        parent_of_level.append(prev_node_of_item[first])
        tokens.append(sorted_codes[first, level])
        item_path[order + 1, level] = node_of_item
        prev_node_of_item = node_of_item
    parents = np.concatenate(parent_of_level)
    return order, level_offsets, item_path, parents, np.concatenate(tokens), prev_node_of_item
