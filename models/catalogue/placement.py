"""Where an added item goes in the tree (docs/live_catalogue.md): a descent, then a leaf.

1. **Descent.** From the root, level by level, the item's unit vector is compared with the
   centroids (mean unit item vector) of the children of the ``DESCENT_WIDTH`` best nodes so far:
   a few comparisons per level, batched over the delta's items, so placement stays fast at
   millions of items. It yields the best parents of leaves, best first.
2. **Leaf, per parent in that order.** The parent's leaves are scored by their centroids.
   * A near copy (cosine >= ``NEAR_COPY_COSINE``) of an item: the item joins that item's leaf,
     whatever the capacity. Copies are looked for in the whole catalogue when that costs at most
     ``EXACT_COPY_BUDGET`` multiply-adds (small catalogues or deltas), else where the descent leads
     (the candidate parents' leaves; in a bucket tree, the best bucket).
   * Otherwise, with single-item leaves (SEATER, TDR): a new leaf beside its nearest leaf when the
     parent has room (fewer than ``max_branching`` children); the decoder scores it as that leaf.
   * With buckets (URI): the best bucket holding fewer than ``leaf_capacity`` items; else a new
     bucket under the parent, with a token no sibling uses, when the parent has room.
   * Neither: the next parent. No parent with room: the best leaf of the first parent
     (``over_capacity``).

The vectors are the rerank vectors (``items.npz``), the space the service scores items in. URI's
own item side (the token distribution of an item) is not part of a bundle, so URI places by the
same descent over its buckets' centroids.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from models.catalogue.descent import CHUNK as _CHUNK
from models.catalogue.descent import candidate_parents, unit_rows
from models.index import TreeIndex

NEAR_COPY_COSINE = 0.99  # an added item this close to an item joins its leaf
EXACT_COPY_BUDGET = 2e9  # multiply-adds allowed for an exact near-copy scan of the whole catalogue
YIELD_EVERY = 64  # items placed between two GIL releases


@dataclass(frozen=True)
class PlacementTree:
    """What placement reads from one catalogue version."""

    index: TreeIndex  # live: leaf_offsets/leaf_items hold live items only
    parent: np.ndarray  # [num_nodes] int64
    leaf_of: np.ndarray  # [N+1] int64
    live: np.ndarray  # [N+1] bool
    centroid_sum: np.ndarray  # [S, Dr] float64 unit-vector sums of nodes 0..S-1 (S >= leaf_start)
    item_emb: np.ndarray  # [N+1, Dr]
    leaf_capacity: int


@dataclass(frozen=True)
class Placement:
    leaf: int  # global node id of the leaf the item joins (new or existing)
    parent: int  # that leaf's parent
    new_leaf: bool
    token: int  # node_token of a new leaf (-1 otherwise)
    alias: int  # the existing node a new leaf reaches the decoder as (-1 otherwise)
    near_copy: bool = False
    over_capacity: bool = False


@dataclass
class _Growth:
    """What the items placed so far in this delta added (later items of the delta see it)."""

    next_node: int
    child_count: np.ndarray  # [num_nodes] int64 children of each node of the catalogue, new leaves included
    children: dict[int, list[int]] = field(default_factory=dict)  # parent -> new leaves
    members: dict[int, list[np.ndarray]] = field(default_factory=dict)  # leaf -> unit vectors added
    tokens: dict[int, int] = field(default_factory=dict)  # new leaf -> token
    aliases: dict[int, int] = field(default_factory=dict)  # new leaf -> alias
    placed: dict[int, list[tuple[int, np.ndarray]]] = field(
        default_factory=dict
    )  # parent -> (leaf, unit) of this delta


def yield_gil() -> None:
    """Let the serving threads take the GIL (an add runs beside live traffic)."""
    time.sleep(0)


def place_items(
    tree: PlacementTree, vectors: np.ndarray, pause: Callable[[], None] = yield_gil
) -> list[Placement]:
    """A place for each row of ``vectors [M, Dr]``, in order (each sees the ones before); ``pause()``
    every ``YIELD_EVERY`` items (the service paces its catalogue thread there)."""
    unit = unit_rows(vectors)  # [M, Dr]
    parents = candidate_parents(tree.index, tree.centroid_sum, unit)  # [M, P]
    copies = exact_copies(tree, unit)  # [M] the item each one nearly copies, -1 if none (or not scanned)
    buckets = tree.index.token_scheme == "level" and tree.leaf_capacity > 1
    quick = None if buckets else first_parent_leaves(tree, unit, parents[:, 0])
    growth = _Growth(next_node=tree.index.num_nodes, child_count=np.diff(tree.index.child_offsets))
    level_token_node = _token_nodes(tree.index) if buckets else {}  # only buckets take new level tokens
    out = []
    for i in range(len(unit)):
        if copies[i] > 0:
            leaf = int(tree.leaf_of[copies[i]])
            placed = Placement(leaf, int(tree.parent[leaf]), False, -1, -1, near_copy=True)
        elif quick is not None and quick[2][i]:
            fast = _place_quick(tree, growth, unit[i], parents[i], int(quick[0][i]), float(quick[1][i]))
            placed = fast or _place_one(tree, growth, unit[i], parents[i], level_token_node)
        else:
            placed = _place_one(tree, growth, unit[i], parents[i], level_token_node)
        out.append(placed)
        growth.members.setdefault(placed.leaf, []).append(unit[i])
        growth.placed.setdefault(placed.parent, []).append((placed.leaf, unit[i]))
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            pause()
    return out


def first_parent_leaves(
    tree: PlacementTree, unit: np.ndarray, parents: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Single-item leaves, batched: for each ``unit [M, Dr]`` row, the best leaf under its parent
    ``parents [M]`` and the cosine to that leaf's item: ``(leaf [M], cosine [M], usable [M])``;
    ``usable`` is False where a leaf there holds other than one live item (the per-item path decides)."""
    index = tree.index
    co, ci, lo_, items_ = index.child_offsets, index.child_ids, index.leaf_offsets, index.leaf_items
    M, D = unit.shape
    leaf, cos, usable = np.full(M, -1, np.int64), np.full(M, -2.0), np.zeros(M, bool)
    slot = np.arange(index.max_branching)
    for lo in range(0, M, _CHUNK):
        p = parents[lo : lo + _CHUNK]
        real = p >= 0
        start, count = co[p.clip(0)], np.diff(co)[p.clip(0)] * real  # [m]
        ok = slot[None, :] < count[:, None]  # [m, C]
        kids = np.where(ok, ci[(start[:, None] + slot).clip(max=len(ci) - 1)], -1)  # [m, C]
        j = (kids - index.leaf_start).clip(0)
        size = (lo_[j + 1] - lo_[j]) * ok  # [m, C]
        one = size == 1
        rows = items_[lo_[j].clip(max=len(items_) - 1)]  # [m, C] the item of a one-item leaf
        sims = np.einsum(
            "md,mcd->mc",
            unit[lo : lo + _CHUNK],
            unit_rows(tree.item_emb[rows].reshape(-1, D)).reshape(*rows.shape, D),
        )
        sims = np.where(one, sims, -np.inf)
        best = sims.argmax(axis=1)
        sl = slice(lo, lo + len(p))
        leaf[sl] = np.take_along_axis(kids, best[:, None], 1)[:, 0]
        cos[sl] = np.take_along_axis(sims, best[:, None], 1)[:, 0]
        usable[sl] = real & (one | ~ok).all(axis=1) & one.any(axis=1)
    return leaf, cos, usable


def _place_quick(
    tree: PlacementTree, growth: _Growth, u: np.ndarray, parents: np.ndarray, best: int, cosine: float
) -> Placement | None:
    """Single-item leaves: the best of the first parent's leaves as the catalogue had them is known
    (``best``, ``cosine``); this delta's items placed under that parent are compared here. ``None``:
    another parent has room, the per-item path decides."""
    index = tree.index
    par = int(parents[0])
    for leaf, v in growth.placed.get(par, ()):  # this delta's items under the parent
        c = float(v @ u)
        if c >= NEAR_COPY_COSINE:
            return Placement(leaf, par, False, -1, -1, near_copy=True)
        if c > cosine and leaf >= index.num_nodes:  # a new leaf nearer than the catalogue's best
            best, cosine = leaf, c
    if cosine >= NEAR_COPY_COSINE:
        return Placement(best, par, False, -1, -1, near_copy=True)
    room = (growth.child_count[parents.clip(0)] < index.max_branching) & (parents >= 0)  # [P]
    if room[0]:
        alias = growth.aliases.get(best, best)
        token = growth.next_node if index.token_scheme == "node" else int(index.node_token[alias])
        return _new_leaf(growth, par, token, alias)
    if room[1:].any():
        return None
    return Placement(best, par, False, -1, -1, over_capacity=True)


def exact_copies(tree: PlacementTree, unit: np.ndarray) -> np.ndarray:
    """``unit [M, Dr]`` -> ``[M]`` the live item each row nearly copies (cosine >= NEAR_COPY_COSINE),
    -1 where none; all -1 when the scan would exceed ``EXACT_COPY_BUDGET``."""
    live = np.flatnonzero(tree.live)
    out = np.full(len(unit), -1, np.int64)
    if len(live) == 0 or len(unit) * len(live) * unit.shape[1] > EXACT_COPY_BUDGET:
        return out
    sims = unit @ unit_rows(tree.item_emb[live]).T  # [M, n]
    best = sims.argmax(axis=1)
    hit = sims[np.arange(len(unit)), best] >= NEAR_COPY_COSINE
    out[hit] = live[best[hit]]
    return out


def _place_one(
    tree: PlacementTree, growth: _Growth, u: np.ndarray, parents: np.ndarray, token_node: dict[int, int]
) -> Placement:
    index = tree.index
    buckets = index.token_scheme == "level" and tree.leaf_capacity > 1
    first: tuple[int, int] | None = None  # (parent, best leaf) of the first parent tried
    for par in (int(p) for p in parents if p >= 0):
        room = int(growth.child_count[par]) < index.max_branching
        if first is not None and not room and not buckets:
            continue  # full, and its near copies were looked for in the first parent already
        leaves, cent, sizes, members, owner = _leaf_stats(tree, growth, par, with_members=not buckets)
        if not leaves:
            continue
        order = np.argsort(-(cent @ u), kind="stable")  # leaves by centroid, best first
        if buckets:  # a bucket's near copies are in its best bucket
            members, owner = _members(tree, growth, leaves[int(order[0])]), None
        if len(members):
            sims = members @ u
            hit = int(sims.argmax())
            if float(sims[hit]) >= NEAR_COPY_COSINE:
                leaf = leaves[int(order[0])] if owner is None else leaves[int(owner[hit])]
                return Placement(leaf, par, False, -1, -1, near_copy=True)
        if first is None:
            first = (par, leaves[int(order[0])])
        if buckets:
            for j in order.tolist():
                if sizes[j] < tree.leaf_capacity:
                    return Placement(leaves[j], par, False, -1, -1)
            token = _free_token(tree, growth, par, token_node)
            if room and token >= 0:
                return _new_leaf(growth, par, token, token_node[token])
            continue
        if room:
            nearest = leaves[int(order[0])]
            alias = growth.aliases.get(nearest, nearest)
            token = growth.next_node if index.token_scheme == "node" else int(index.node_token[alias])
            return _new_leaf(growth, par, token, alias)
    if first is None:
        raise ValueError("no leaf under any candidate parent: the catalogue has no live item to place beside")
    return Placement(first[1], first[0], False, -1, -1, over_capacity=True)


def _new_leaf(growth: _Growth, parent: int, token: int, alias: int) -> Placement:
    leaf = growth.next_node
    growth.next_node += 1
    growth.children.setdefault(parent, []).append(leaf)
    growth.child_count[parent] += 1
    growth.tokens[leaf] = token
    growth.aliases[leaf] = alias
    return Placement(leaf, parent, True, token, alias)


def _leaf_stats(
    tree: PlacementTree, growth: _Growth, parent: int, *, with_members: bool
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The leaves under ``parent`` (the catalogue's, then this delta's): ``(leaves, centroids [n, Dr]
    unit, live sizes [n], members [m, Dr] unit, owner [m])``. Centroids come from ``centroid_sum``
    when it holds leaves (buckets; members are then not gathered), else from the leaves' items."""
    index = tree.index
    dim = tree.item_emb.shape[1]
    base = index.child_ids[index.child_offsets[parent] : index.child_offsets[parent + 1]]
    extra_leaves = growth.children.get(parent, [])
    leaves = base.tolist() + extra_leaves
    j = base - index.leaf_start
    starts = index.leaf_offsets[j]
    base_sizes = index.leaf_offsets[j + 1] - starts
    sizes = np.concatenate([base_sizes, np.zeros(len(extra_leaves), np.int64)])
    sums = np.zeros((len(leaves), dim), np.float64)
    members = np.zeros((0, dim), np.float32)
    owner = np.zeros(0, np.int64)
    stored = tree.centroid_sum.shape[0] > base.max(initial=0)  # the sums hold leaves (buckets)
    if stored:
        sums[: len(base)] = tree.centroid_sum[base]
    if with_members or not stored:
        first = np.cumsum(base_sizes) - base_sizes  # [n] each leaf's first member row
        owner = np.repeat(np.arange(len(base)), base_sizes)
        slots = np.repeat(starts - first, base_sizes) + np.arange(int(base_sizes.sum()))
        members = unit_rows(tree.item_emb[index.leaf_items[slots]])
        if not stored and len(members):
            full = np.flatnonzero(base_sizes > 0)  # members are grouped by owner, in leaf order
            sums[full] = np.add.reduceat(members, first[full], axis=0)
    extra_rows, extra_owner = [], []
    for n, leaf in enumerate(leaves):
        extra = growth.members.get(leaf)
        if extra:
            sums[n] += np.sum(extra, axis=0)
            sizes[n] += len(extra)
            extra_rows.extend(extra)
            extra_owner.extend([n] * len(extra))
    if with_members and extra_rows:
        members = np.concatenate([members, np.stack(extra_rows)])
        owner = np.concatenate([owner, np.asarray(extra_owner, np.int64)])
    return leaves, unit_rows(sums), sizes, members, owner


def _members(tree: PlacementTree, growth: _Growth, leaf: int) -> np.ndarray:
    """Unit vectors ``[n, Dr]`` of the live items of ``leaf`` (the catalogue's, then this delta's)."""
    index = tree.index
    parts = []
    if leaf < index.num_nodes:
        j = leaf - index.leaf_start
        rows = index.leaf_items[index.leaf_offsets[j] : index.leaf_offsets[j + 1]]
        parts.append(unit_rows(tree.item_emb[rows]))
    extra = growth.members.get(leaf)
    if extra:
        parts.append(np.stack(extra))
    return np.concatenate(parts) if parts else np.zeros((0, tree.item_emb.shape[1]), np.float32)


def _token_nodes(index: TreeIndex) -> dict[int, int]:
    """Level scheme: level-L token -> the first leaf carrying it (what a new leaf's decoder alias is)."""
    if index.token_scheme != "level":
        return {}
    leaves = np.arange(index.leaf_start, len(index.node_token))
    tokens = index.node_token[leaves]
    first: dict[int, int] = {}
    for node, tok in zip(leaves.tolist(), tokens.tolist(), strict=True):
        first.setdefault(int(tok), int(node))
    return first


def _free_token(tree: PlacementTree, growth: _Growth, parent: int, token_node: dict[int, int]) -> int:
    """A level-L token no child of ``parent`` uses and some leaf carries (so the decoder knows it); -1 if none."""
    index = tree.index
    kids = index.child_ids[index.child_offsets[parent] : index.child_offsets[parent + 1]]
    used = {int(t) for t in index.node_token[kids]} | {
        growth.tokens[x] for x in growth.children.get(parent, [])
    }
    free = [t for t in sorted(token_node) if t not in used]
    return free[0] if free else -1
