"""``items.npz`` of a bundle: the item table, checked (read by :func:`models.bundle.bundle.load_bundle`).

```
item_emb   [N+1, Dr] float32   rerank vectors, row 0 = 0 (padding)
item_ids   [N+1]     unicode   raw item ids, item_ids[0] == ""
popularity [N+1]     float32   training interactions per item
attr_offsets, attr_values, attr_vocab   optional: item attributes (models/bundle/attributes.py)
```

Errors are ``ValueError`` naming the array; the loader prefixes the bundle and file name.
Nothing is unpickled (``allow_pickle=False``; ids are fixed-width unicode arrays).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.bundle.attributes import ARRAYS as ATTRIBUTE_ARRAYS
from models.bundle.attributes import ItemAttributes

REQUIRED = ("item_emb", "item_ids", "popularity")


@dataclass(frozen=True, eq=False)
class ItemTable:
    item_emb: np.ndarray  # [N+1, Dr] float32
    item_ids: np.ndarray  # [N+1] unicode
    popularity: np.ndarray  # [N+1] float32
    attributes: ItemAttributes | None


def read_items(file: Path, rows: int, Dr: int) -> ItemTable:
    """Read and check ``items.npz`` for ``rows`` = N+1 dense ids and vectors of width ``Dr``."""
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in (*REQUIRED, *ATTRIBUTE_ARRAYS) if k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read: {exc}") from exc
    missing = set(REQUIRED) - set(arrays)
    if missing:
        raise ValueError(f"missing arrays {sorted(missing)}")
    item_emb, item_ids, popularity = (arrays[k] for k in REQUIRED)
    if item_emb.shape != (rows, Dr) or item_emb.dtype != np.float32:
        raise ValueError(
            f"item_emb is {item_emb.dtype}{list(item_emb.shape)}, expected float32[{rows}, {Dr}] "
            f"(num_items + 1 rows, dims.query columns)"
        )
    if not np.isfinite(item_emb).all():
        raise ValueError("item_emb has NaN or infinite values")
    if item_ids.shape != (rows,) or item_ids.dtype.kind != "U":
        raise ValueError(f"item_ids is {item_ids.dtype}{list(item_ids.shape)}, expected unicode[{rows}]")
    if item_ids[0] != "":
        raise ValueError(f"item_ids[0] must be '' (padding), got {item_ids[0]!r}")
    if len(set(item_ids.tolist())) != rows:  # a hash set: np.unique sorts strings, ~10x slower
        raise ValueError("item_ids has duplicate raw ids")
    if popularity.shape != (rows,) or popularity.dtype != np.float32:
        raise ValueError(
            f"popularity is {popularity.dtype}{list(popularity.shape)}, expected float32[{rows}]"
        )
    return ItemTable(item_emb, item_ids, popularity, _attributes(arrays, rows))


def _attributes(arrays: dict[str, np.ndarray], rows: int) -> ItemAttributes | None:
    present = [k for k in ATTRIBUTE_ARRAYS if k in arrays]
    if not present:
        return None
    if len(present) != len(ATTRIBUTE_ARRAYS):
        missing = sorted(set(ATTRIBUTE_ARRAYS) - set(present))
        raise ValueError(f"has {present} but not {missing} (item attributes need all three)")
    return ItemAttributes.from_arrays(
        arrays["attr_vocab"], arrays["attr_offsets"], arrays["attr_values"], rows=rows
    )
