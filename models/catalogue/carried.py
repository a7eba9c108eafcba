"""A placement computed once, by the delta's writer, and carried in the published record
(docs/live_catalogue.md "Placement computed once").

The writer applies a delta before publishing it (placement included); the record then carries
each added item's :class:`~models.catalogue.placement.Placement` as five base64 arrays, so that
replicas install the delta with array copies instead of searching the tree again:

    {"leaf": <int64>, "parent": <int64>, "token": <int64>, "alias": <int64>, "flags": <uint8>}

(little-endian; ``flags``: 1 = new leaf, 2 = near copy, 4 = over capacity). Placement is a pure
function of the version before the delta and the delta, so a carried placement is only a cache of
what the replica would compute: :func:`consistent` checks it against that version (every id in
range, new leaves numbered in order under leaf parents, existing leaves under their own parent), and
a placement that does not fit is ignored and computed again, never trusted into an index error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.catalogue.placement import Placement
from models.index import TreeIndex

NEW_LEAF, NEAR_COPY, OVER_CAPACITY = 1, 2, 4
_INTS = ("leaf", "parent", "token", "alias")


def to_json(placed: Sequence[Placement]) -> dict[str, str]:
    """The record's ``placement`` object for ``placed`` (one per added item, in order)."""
    cols = {name: np.asarray([getattr(p, name) for p in placed], "<i8") for name in _INTS}
    flags = np.asarray(
        [NEW_LEAF * p.new_leaf | NEAR_COPY * p.near_copy | OVER_CAPACITY * p.over_capacity for p in placed],
        "u1",
    )
    out = {name: _b64(col) for name, col in cols.items()}
    out["flags"] = _b64(flags)
    return out


def from_json(obj: Any, count: int) -> list[Placement] | None:
    """The placements a record carries for ``count`` added items; None when it carries none or a
    malformed one (then the replica places the items itself)."""
    if not isinstance(obj, dict) or set(obj) != {*_INTS, "flags"}:
        return None
    try:
        cols = {name: _array(obj[name], "<i8", count) for name in _INTS}
        flags = _array(obj["flags"], "u1", count)
    except ValueError:
        return None
    return [
        Placement(
            leaf=int(leaf),
            parent=int(parent),
            new_leaf=bool(flag & NEW_LEAF),
            token=int(token),
            alias=int(alias),
            near_copy=bool(flag & NEAR_COPY),
            over_capacity=bool(flag & OVER_CAPACITY),
        )
        for leaf, parent, token, alias, flag in zip(
            cols["leaf"].tolist(),
            cols["parent"].tolist(),
            cols["token"].tolist(),
            cols["alias"].tolist(),
            flags.tolist(),
            strict=True,
        )
    ]


def consistent(index: TreeIndex, parent: np.ndarray, placed: Sequence[Placement], count: int) -> bool:
    """Whether ``placed`` can be installed on the version with ``index`` / ``parent [num_nodes]``:
    one placement per item, new leaves numbered ``num_nodes, num_nodes+1, ...`` in order under a
    node of the level above the leaves, aliases and tokens naming nodes and tokens that exist, and
    an existing leaf placed under its own parent."""
    if len(placed) != count:
        return False
    lo = index.level_offsets
    first_parent, last_parent = int(lo[index.levels - 1]), int(lo[index.levels])  # leaf parents
    leaf_start, num_nodes = int(index.leaf_start), int(index.num_nodes)
    node_tokens = index.token_scheme == "node"  # a new leaf's token is itself; else a level token
    grown: dict[int, int] = {}  # new leaf -> its parent
    for p in placed:
        if p.new_leaf:
            ok = (
                p.leaf == num_nodes + len(grown)
                and first_parent <= p.parent < last_parent
                and leaf_start <= p.alias < num_nodes
                and (p.token == p.leaf if node_tokens else 0 <= p.token < int(index.num_tokens))
            )
            grown[p.leaf] = p.parent
        elif leaf_start <= p.leaf < num_nodes:
            ok = int(parent[p.leaf]) == p.parent
        else:
            ok = grown.get(p.leaf, -1) == p.parent
        if not ok:
            return False
    return True


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


def _array(raw: Any, dtype: str, count: int) -> np.ndarray:
    if not isinstance(raw, str):
        raise ValueError("not a base64 string")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from None
    a = np.frombuffer(data, dtype) if len(data) % np.dtype(dtype).itemsize == 0 else None
    if a is None or len(a) != count:
        raise ValueError(f"expected {count} values")
    return a
