"""A catalogue delta: items to add and to remove (docs/live_catalogue.md "Delta").

:meth:`Delta.from_json` checks the shape of the JSON (the body of ``POST /admin/items`` or a delta
file) and raises :class:`DeltaError` naming the field (``add[3].vector``); what depends on the
catalogue (ids present or not, vector width) is :meth:`models.catalogue.catalogue.Catalogue.check`'s.

A vector is a JSON list of numbers (``vector``) or the base64 of its little-endian float32 bytes
(``vector_f32``: a quarter of the text, parsed without a float at a time); delta files are written
in the second form (``to_json(compact=True)``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

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
    def from_json(cls, obj: Any, pause: Callable[[], None] | None = None) -> Delta:
        """The delta of a JSON object; ``pause()`` between chunks of ``PAUSE_ITEMS`` added items."""
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
            add=tuple(_paused((_new_item(item, f"add[{i}]") for i, item in enumerate(add)), pause)),
            remove=tuple(_item_id(raw, "remove", f"[{i}]") for i, raw in enumerate(remove)),
        )

    def with_vectors(self, vectors: np.ndarray) -> Delta:
        """This delta with every added item's vector given (``vectors [M, Dr]``, e.g. the content
        tower's as its writer computed them): what a writer publishes, so replicas need no tower."""
        add = tuple(
            replace(item, vector=np.array(v, np.float32)) for item, v in zip(self.add, vectors, strict=True)
        )
        return Delta(add=add, remove=self.remove)

    def to_json(self, compact: bool = False) -> dict[str, Any]:
        """The JSON form; ``compact``: vectors as ``vector_f32`` (base64 of little-endian float32)."""
        add = []
        for item in self.add:
            entry: dict[str, Any] = {"id": item.id}
            if item.vector is not None and compact:
                entry["vector_f32"] = base64.b64encode(item.vector.astype("<f4").tobytes()).decode("ascii")
            elif item.vector is not None:
                entry["vector"] = [float(v) for v in item.vector]
            if item.attributes:
                entry["attributes"] = list(item.attributes)
            add.append(entry)
        return {"add": add, "remove": list(self.remove)}


PAUSE_ITEMS = 256


def _paused(items: Iterable[T], pause: Callable[[], None] | None) -> Iterator[T]:
    for i, item in enumerate(items):
        if pause is not None and i % PAUSE_ITEMS == PAUSE_ITEMS - 1:
            pause()
        yield item


def _item_id(raw: Any, field: str, suffix: str = "") -> str:
    """``raw`` as an item id; the error names ``field + suffix`` (joined only on an error)."""
    if type(raw) is str and 1 <= len(raw) <= MAX_ID_LENGTH and raw.isprintable():
        return raw  # the usual case, checked before anything else is built
    if isinstance(raw, int) and not isinstance(raw, bool):
        return _item_id(str(raw), field, suffix)  # JSON integers are ids too, as in requests
    if not isinstance(raw, str) or not 1 <= len(raw) <= MAX_ID_LENGTH:
        raise DeltaError(
            field + suffix, f"an item id is a string of 1..{MAX_ID_LENGTH} characters, got {raw!r:.80}"
        )
    # control characters, lone surrogates (not UTF-8: every answer holding it would fail)
    raise DeltaError(field + suffix, f"an item id is printable text, got {raw!r:.80}")


_ITEM_KEYS = frozenset({"id", "vector", "vector_f32", "attributes"})


def _new_item(obj: Any, field: str) -> NewItem:
    if not isinstance(obj, dict):
        raise DeltaError(field, "expected an object with 'id' and 'vector' and/or 'attributes'")
    if not _ITEM_KEYS.issuperset(obj):
        raise DeltaError(f"{field}.{sorted(set(obj) - _ITEM_KEYS)[0]}", "unknown field")
    if "id" not in obj:
        raise DeltaError(f"{field}.id", "required")
    if "vector" in obj and "vector_f32" in obj:
        raise DeltaError(f"{field}.vector_f32", "give 'vector' or 'vector_f32', not both")
    vector = _vector(obj["vector"], f"{field}.vector") if obj.get("vector") is not None else None
    if obj.get("vector_f32") is not None:
        vector = _vector_f32(obj["vector_f32"], field)
    attributes = obj.get("attributes", [])
    if not isinstance(attributes, list) or len(attributes) > MAX_ATTRIBUTES:
        raise DeltaError(f"{field}.attributes", f"expected a list of at most {MAX_ATTRIBUTES} attribute ids")
    attrs = tuple(_item_id(a, field, f".attributes[{j}]") for j, a in enumerate(attributes))
    return NewItem(id=_item_id(obj["id"], field, ".id"), vector=vector, attributes=attrs)


_NUMBER_TYPES = frozenset({float, int})
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _vector(raw: Any, field: str) -> np.ndarray:
    if not isinstance(raw, list) or not raw:
        raise DeltaError(field, "expected a non-empty list of numbers")
    if not set(map(type, raw)) <= _NUMBER_TYPES:  # bools and strings are not numbers
        raise DeltaError(field, "expected numbers only")
    wide = np.asarray(raw, np.float64)
    if not np.isfinite(wide).all() or np.abs(wide).max() > _FLOAT32_MAX:
        raise DeltaError(field, "holds NaN or an infinite value (or a number beyond float32)")
    return wide.astype(np.float32)


def _vector_f32(raw: Any, field: str) -> np.ndarray:
    """``raw``: base64 of little-endian float32; errors name ``field.vector_f32``."""
    try:
        data = binascii.a2b_base64(raw, strict_mode=True) if isinstance(raw, str) else b""
    except (binascii.Error, ValueError):
        data = b""
    if not data or len(data) % 4:
        raise DeltaError(
            f"{field}.vector_f32", "expected the base64 of a non-empty little-endian float32 array"
        )
    return _finite(np.frombuffer(data, "<f4").astype(np.float32), f"{field}.vector_f32")


def _finite(vector: np.ndarray, field: str) -> np.ndarray:
    if not np.isfinite(vector).all():
        raise DeltaError(field, "holds NaN or an infinite value (or a number beyond float32)")
    return vector


def delta_vectors(items: Sequence[NewItem], dim: int, content: Any) -> np.ndarray:
    """``[M, Dr]`` float32: each added item's vector, or the content tower's from its attributes."""
    out = np.zeros((len(items), dim), np.float32)
    need = [i for i, item in enumerate(items) if item.vector is None]
    for i, item in enumerate(items):
        if item.vector is not None:
            if item.vector.shape != (dim,):
                raise DeltaError(
                    f"add[{i}].vector", f"has {item.vector.shape[0]} values, the bundle's items have {dim}"
                )
            out[i] = item.vector
    for i in need:
        attrs = list(items[i].attributes)
        if content is None:
            raise DeltaError(f"add[{i}].vector", "required: this bundle has no content tower")
        if not content.has_known(attrs):
            raise DeltaError(
                f"add[{i}].vector", "required: none of the item's attributes is known to the content tower"
            )
    if need:
        out[need] = np.asarray(content.vectors([list(items[i].attributes) for i in need]), np.float32)
    return out
