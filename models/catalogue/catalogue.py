"""The live catalogue: a serving bundle's items plus numbered deltas (docs/live_catalogue.md).

A bundle is immutable; its catalogue changes through :class:`Delta` s. Version 0 is the bundle as
trained, version ``n`` is version ``n-1`` with delta ``n`` applied by :meth:`Catalogue.apply`, a
pure and deterministic function: replicas that apply the same deltas in the same order hold the
same catalogue (dense ids, trie, tables).

* Added items get dense ids after the last one and a place in the tree from
  :func:`models.catalogue.placement.place_items`; new leaves get global node ids after the last node (so every
  leaf stays at level L and ``leaf = node - leaf_start`` still holds), and the decoder sees each as
  an existing node (``decoder_node``), so its signature does not change.
* A removed item leaves its leaf (never returned again) but keeps its dense id and row, so
  histories that hold it still encode. Nodes left with no live item are ``dead`` (never expanded).
* The item table grows in place in spare rows (:class:`ItemTable`): a version is a prefix view of
  one buffer, so adding a few items does not copy the catalogue. Version 0 shares the bundle's own
  array (no copy held for a delta that may never come); the first added item copies it once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from models.bundle.item_ids import DenseIds, RawIds, as_dict, dense_many
from models.catalogue.carried import consistent
from models.catalogue.delta import Delta, DeltaError, NewItem, delta_vectors
from models.catalogue.descent import unit_rows
from models.catalogue.placement import Placement, PlacementTree, place_items, yield_gil
from models.catalogue.tree_arrays import (
    add_rows,
    added_sums,
    centroid_sums,
    children_csr,
    live_leaves,
    subtree_counts,
    summed_levels,
)
from models.index import TreeIndex

if TYPE_CHECKING:
    from models.bundle.bundle import Bundle

__all__ = ["ApplyReport", "Catalogue", "Delta", "DeltaError", "ItemTable", "NewItem"]

SPARE_ROWS = 0.25  # spare share of the item table allocated when it grows (amortised appends)


class ItemTable:
    """An append-only ``[rows, Dr]`` float32 buffer shared by consecutive catalogue versions.

    A version holds ``view(rows)``; appending writes rows past every view handed out so far, so no
    older version sees them. Appending to anything but the newest version copies (never clobbers).
    """

    def __init__(self, rows: np.ndarray) -> None:
        """``rows`` is held, not copied (version 0: the bundle's array, never written: it has no
        spare row, so the first append copies it into a buffer of its own)."""
        self._used = rows.shape[0]
        self._buf = rows

    def view(self, rows: int) -> np.ndarray:
        return self._buf[:rows]

    def appended(self, rows: int, new: np.ndarray) -> ItemTable:
        """The table of ``rows`` rows plus ``new [M, Dr]``: this buffer when it has room, else a copy."""
        total = rows + new.shape[0]
        if rows == self._used and total <= self._buf.shape[0]:
            self._buf[rows:total] = new
            self._used = total
            return self
        cap = total + math.ceil(SPARE_ROWS * total)
        buf = np.zeros((cap, self._buf.shape[1]), np.float32)
        buf[:rows] = self._buf[:rows]
        buf[rows:total] = new
        grown = ItemTable(buf)
        grown._used = total
        return grown


@dataclass(frozen=True)
class ApplyReport:
    """What one delta did."""

    version: int
    added: int
    removed: int
    new_leaves: int
    joined_copies: int  # added items that joined a near copy's leaf
    over_capacity: int  # added items that joined a full leaf (no room anywhere near)
    dense_ids: tuple[int, ...]  # dense id of each added item, in the delta's order
    placement: tuple[Placement, ...] = ()  # where each added item went (what a published record carries)
    carried: bool = False  # the placement came with the delta (models/catalogue/carried.py), not computed


@dataclass(frozen=True)
class Catalogue:
    """One version of a bundle's catalogue (host arrays; :meth:`Retriever.with_catalogue` serves it)."""

    version: int
    fingerprint: str  # the bundle's
    index: TreeIndex  # the live tree: new leaves appended, leaf_items = live items only (not validated)
    decoder_node: np.ndarray  # [num_nodes] int64: the node whose token embedding the decoder uses
    parent: np.ndarray  # [num_nodes] int64, -1 for the root
    leaf_of: np.ndarray  # [N+1] int64 global leaf node of every item (-1 for row 0)
    live: np.ndarray  # [N+1] bool: may be returned (row 0 and removed items: False)
    live_count: np.ndarray  # [num_nodes] int64 live items below each node
    centroid_sum: (
        np.ndarray
    )  # [S, Dr] float64 sums of unit item vectors below nodes 0..S-1 (S: see centroid_sums)
    table: ItemTable
    item_ids: Sequence[str]  # [N+1] raw ids, "" for row 0 (version 0: the bundle's RawIds)
    dense_of: Mapping[str, int]  # live raw id -> dense id (version 0: the bundle's DenseIds)
    popularity: np.ndarray  # [N+1] float32 (0 for added items)
    attributes: tuple[tuple[str, ...], ...]  # raw attribute ids of added items (dense id N0+1..)
    base_items: int  # N0: items of the bundle as trained
    leaf_capacity: int  # the most items a leaf takes from placement (the bundle's largest leaf)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        item_ids: Sequence[str] | None = None,
        dense_of: Mapping[str, int] | None = None,
    ) -> Catalogue:
        """Version 0: the bundle as trained. ``item_ids`` / ``dense_of``: the bundle's raw ids and
        their inverse as a caller already holds them (the service's loaded model), so that version 0
        shares them instead of building a second id map (at 1M items: ~100 MiB and a second)."""
        index = bundle.index
        emb = np.asarray(bundle.item_emb, np.float32)
        rows = emb.shape[0]
        leaf_of = np.full(rows, -1, np.int64)
        leaf_of[1:] = index.item_path[1:, -1]
        live = np.ones(rows, bool)
        live[0] = False
        ids = item_ids if item_ids is not None else RawIds(bundle.item_ids)
        if len(ids) != rows:
            raise ValueError(f"item_ids holds {len(ids)} ids, the bundle {rows} rows")
        return cls(
            version=0,
            fingerprint=bundle.manifest.fingerprint,
            index=index,
            decoder_node=np.arange(index.num_nodes, dtype=np.int64),
            parent=index.parents(),
            leaf_of=leaf_of,
            live=live,
            live_count=subtree_counts(index),
            centroid_sum=centroid_sums(index, emb),
            table=ItemTable(emb),
            item_ids=ids,
            dense_of=dense_of if dense_of is not None else DenseIds(bundle.item_ids),
            popularity=np.asarray(bundle.popularity, np.float32),
            attributes=(),
            base_items=rows - 1,
            leaf_capacity=int(np.diff(index.leaf_offsets).max()),
        )

    # ------------------------------------------------------------------ views
    @property
    def num_rows(self) -> int:
        """N+1: dense ids 0..N (removed items keep theirs)."""
        return len(self.item_ids)

    @property
    def num_items(self) -> int:
        return self.num_rows - 1

    @property
    def num_live(self) -> int:
        return int(self.live.sum())

    @property
    def item_emb(self) -> np.ndarray:
        """``[N+1, Dr]`` float32 (a view of the shared table: do not write)."""
        return self.table.view(self.num_rows)

    @property
    def aliased(self) -> bool:
        """Whether any node reaches the decoder as another node (added leaves exist)."""
        return bool((self.decoder_node != np.arange(len(self.decoder_node))).any())

    # ------------------------------------------------------------------ deltas
    def check(self, delta: Delta, content: Any = None) -> np.ndarray:
        """Validate ``delta`` against this version; the vectors of its added items ``[M, Dr]``.

        ``content``: the bundle's content tower (``vectors(list[list[str]]) -> [M, Dr]`` and
        ``has_known(attrs)``), used for an added item given without a vector.
        Raises :class:`DeltaError` naming the field.
        """
        return self._checked(delta, content)[0]

    def _checked(self, delta: Delta, content: Any) -> tuple[np.ndarray, list[int]]:
        """:meth:`check`'s vectors ``[M, Dr]`` and the dense ids of ``delta.remove``, in its order."""
        dim = self.item_emb.shape[1]
        seen: set[str] = set()
        # one search each for the listed ids (version 0's DenseIds), not one per id
        known = dense_many(self.dense_of, delta.remove)
        for i, (raw, dense) in enumerate(zip(delta.remove, known, strict=True)):
            if dense is None:
                raise DeltaError(f"remove[{i}]", f"item {raw!r} is not in the catalogue")
            if raw in seen:
                raise DeltaError(f"remove[{i}]", f"item {raw!r} is listed twice")
            seen.add(raw)
        added: set[str] = set()
        present = dense_many(self.dense_of, [item.id for item in delta.add])
        for i, (item, dense) in enumerate(zip(delta.add, present, strict=True)):
            if dense is not None and item.id not in seen:
                raise DeltaError(f"add[{i}].id", f"item {item.id!r} is already in the catalogue")
            if item.id in added:
                raise DeltaError(f"add[{i}].id", f"item {item.id!r} is added twice")
            added.add(item.id)
        return delta_vectors(delta.add, dim, content), [int(d) for d in known if d is not None]

    def apply(
        self,
        delta: Delta,
        content: Any = None,
        placement: Sequence[Placement] | None = None,
        pause: Callable[[], None] = yield_gil,
    ) -> tuple[Catalogue, ApplyReport]:
        """The next version: ``delta``'s removals, then its additions (a removed id may come back).
        ``placement``: where its writer placed the added items (a published record's); used when it
        fits this version (:func:`models.catalogue.carried.consistent`), else computed again, with
        ``pause()`` between chunks of items (:func:`models.catalogue.placement.place_items`)."""
        vectors, removed = self._checked(delta, content)  # [M, Dr], dense ids of delta.remove
        cat = self._removed(removed)
        return cat._added(delta.add, vectors, len(delta.remove), placement, pause)

    def _removed(self, dense: Sequence[int]) -> Catalogue:
        if not dense:
            return self
        ids = np.asarray(dense, np.int64)
        live = self.live.copy()
        live[ids] = False
        path = self.index.item_path[ids].astype(np.int64)  # [R, L]
        live_count = self.live_count.copy()
        live_count -= np.bincount(path.reshape(-1), minlength=len(live_count))
        live_count[0] -= len(ids)
        centroid_sum = self.centroid_sum.copy()
        unit = unit_rows(self.item_emb[ids])  # [R, Dr]
        for level in range(summed_levels(self.index, centroid_sum)):
            add_rows(centroid_sum, path[:, level], -unit)
        gone = set(int(d) for d in dense)
        dense_of = {raw: d for raw, d in as_dict(self.dense_of).items() if d not in gone}
        leaf_index = live_leaves(self.index, self.leaf_of, live)
        return replace(
            self,
            index=leaf_index,
            live=live,
            live_count=live_count,
            centroid_sum=centroid_sum,
            dense_of=dense_of,
        )

    def _added(
        self,
        items: Sequence[NewItem],
        vectors: np.ndarray,
        num_removed: int,
        placement: Sequence[Placement] | None = None,
        pause: Callable[[], None] = yield_gil,
    ) -> tuple[Catalogue, ApplyReport]:
        index = self.index
        M = len(items)
        carried = placement is not None and consistent(index, self.parent, placement, M)
        placed = (
            list(placement)
            if carried and placement is not None
            else place_items(self._tree(), vectors, pause)
        )
        first = self.num_rows
        dense = np.arange(first, first + M, dtype=np.int64)
        new_leaves = [p for p in placed if p.new_leaf]
        num_nodes = index.num_nodes + len(new_leaves)
        parent = np.concatenate([self.parent, np.asarray([p.parent for p in new_leaves], np.int64)])
        node_token = np.concatenate([index.node_token, np.asarray([p.token for p in new_leaves], np.int32)])
        decoder_node = np.concatenate(
            [self.decoder_node, np.asarray([p.alias for p in new_leaves], np.int64)]
        )
        leaf_of = np.concatenate([self.leaf_of, np.asarray([p.leaf for p in placed], np.int64)])
        live = np.concatenate([self.live, np.ones(M, bool)])
        path = np.concatenate([index.item_path, np.zeros((M, index.levels), np.int32)])
        path[first:, -1] = leaf_of[first:]
        node = np.asarray([p.parent for p in placed], np.int64)  # [M] each item's leaf's parent
        for level in range(index.levels - 2, -1, -1):  # up the tree, every item at once
            path[first:, level] = node
            node = parent[node]
        live_count, centroid_sum = added_sums(
            index, self.live_count, self.centroid_sum, path[first:].astype(np.int64), vectors, len(new_leaves)
        )
        level_offsets = index.level_offsets.copy()
        level_offsets[-1] = num_nodes
        child_offsets, child_ids = children_csr(parent)
        grown = replace(
            index,
            level_offsets=level_offsets,
            child_offsets=child_offsets,
            child_ids=child_ids,
            node_token=node_token,
            item_path=path,
            num_nodes=num_nodes,
            num_items=self.num_items + M,
            num_tokens=max(index.num_tokens, num_nodes) if index.token_scheme == "node" else index.num_tokens,
        )
        new_ids = [item.id for item in items]
        cat = replace(
            self,
            version=self.version + 1,
            index=live_leaves(grown, leaf_of, live),
            decoder_node=decoder_node,
            parent=parent,
            leaf_of=leaf_of,
            live=live,
            live_count=live_count,
            centroid_sum=centroid_sum,
            table=self.table.appended(self.num_rows, vectors),
            item_ids=(*self.item_ids, *new_ids),
            dense_of=as_dict(self.dense_of) | dict(zip(new_ids, dense.tolist(), strict=True)),
            popularity=np.concatenate([self.popularity, np.zeros(M, np.float32)]),
            attributes=self.attributes + tuple(item.attributes for item in items),
        )
        report = ApplyReport(
            version=cat.version,
            added=M,
            removed=num_removed,
            new_leaves=len(new_leaves),
            joined_copies=sum(p.near_copy for p in placed),
            over_capacity=sum(p.over_capacity for p in placed),
            dense_ids=tuple(int(d) for d in dense),
            placement=tuple(placed),
            carried=carried,
        )
        return cat, report

    def _tree(self) -> PlacementTree:
        return PlacementTree(
            index=self.index,
            parent=self.parent,
            leaf_of=self.leaf_of,
            live=self.live,
            centroid_sum=self.centroid_sum,
            item_emb=self.item_emb,
            leaf_capacity=self.leaf_capacity,
        )
