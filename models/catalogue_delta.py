"""A catalogue delta: items to add and to remove (docs/live_catalogue.md "Delta").

:meth:`Delta.from_json` checks the shape of the JSON (the body of ``POST /admin/items`` or a delta
file) and raises :class:`DeltaError` naming the field (``add[3].vector``); what depends on the
catalogue (ids present or not, vector width) is :meth:`models.catalogue.Catalogue.check`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_ID_LENGTH = 256
MAX_ATTRIBUTES = 256


class DeltaError(ValueError):
    """A delta that cannot apply; ``field`` locates the offending value (``add[3].vector``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class NewItem:
    id: str
    vector: np.ndarray | None  # [Dr] float32; None: the content tower maps the attributes
    attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delta:
    add: tuple[NewItem, ...] = ()
    remove: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.add) + len(self.remove)

    @classmethod
    def from_json(cls, obj: Any) -> Delta:
        if not isinstance(obj, dict):
            raise DeltaError("body", "expected a JSON object with 'add' and/or 'remove'")
        unknown = sorted(set(obj) - {"add", "remove"})
        if unknown:
            raise DeltaError(unknown[0], "unknown field (a delta has 'add' and 'remove')")
        add, remove = obj.get("add", []), obj.get("remove", [])
        if not isinstance(add, list):
            raise DeltaError("add", "expected a list of items")
        if not isinstance(remove, list):
            raise DeltaError("remove", "expected a list of item ids")
        if not add and not remove:
            raise DeltaError("body", "an empty delta: give 'add' or 'remove'")
        return cls(
            add=tuple(_new_item(item, f"add[{i}]") for i, item in enumerate(add)),
            remove=tuple(_item_id(raw, f"remove[{i}]") for i, raw in enumerate(remove)),
        )

    def to_json(self) -> dict[str, Any]:
        add = []
        for item in self.add:
            entry: dict[str, Any] = {"id": item.id}
            if item.vector is not None:
                entry["vector"] = [float(v) for v in item.vector]
            if item.attributes:
                entry["attributes"] = list(item.attributes)
            add.append(entry)
        return {"add": add, "remove": list(self.remove)}


def _item_id(raw: Any, field: str) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)  # JSON integers are ids too, as in requests
    if not isinstance(raw, str) or not 1 <= len(raw) <= MAX_ID_LENGTH:
        raise DeltaError(field, f"an item id is a string of 1..{MAX_ID_LENGTH} characters, got {raw!r:.80}")
    return raw


def _new_item(obj: Any, field: str) -> NewItem:
    if not isinstance(obj, dict):
        raise DeltaError(field, "expected an object with 'id' and 'vector' and/or 'attributes'")
    unknown = sorted(set(obj) - {"id", "vector", "attributes"})
    if unknown:
        raise DeltaError(f"{field}.{unknown[0]}", "unknown field")
    if "id" not in obj:
        raise DeltaError(f"{field}.id", "required")
    vector = obj.get("vector")
    if vector is not None:
        if not isinstance(vector, list) or not vector:
            raise DeltaError(f"{field}.vector", "expected a non-empty list of numbers")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vector):
            raise DeltaError(f"{field}.vector", "expected numbers only")
        if not all(math.isfinite(float(v)) for v in vector):
            raise DeltaError(f"{field}.vector", "holds NaN or an infinite value")
        vector = np.asarray(vector, np.float32)
    attributes = obj.get("attributes", [])
    if not isinstance(attributes, list) or len(attributes) > MAX_ATTRIBUTES:
        raise DeltaError(f"{field}.attributes", f"expected a list of at most {MAX_ATTRIBUTES} attribute ids")
    attrs = tuple(_item_id(a, f"{field}.attributes[{j}]") for j, a in enumerate(attributes))
    return NewItem(id=_item_id(obj["id"], f"{field}.id"), vector=vector, attributes=attrs)
