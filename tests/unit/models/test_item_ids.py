"""The bundle's raw ids both ways without a Python object per item: the same answers as the list
and dict they replace, on the ids a request may send."""

from __future__ import annotations

import numpy as np
import pytest

from models.bundle.item_ids import DenseIds, RawIds, as_dict, dense_many

IDS = np.array(["", "b", "a", "c\x00x", "zz", "item-10", "item-9"])  # row 0: padding


def reference() -> dict[str, int]:
    return {str(raw): i for i, raw in enumerate(IDS.tolist()) if i > 0}


def test_dense_ids_answer_what_a_dict_answers() -> None:
    ids, ref = DenseIds(IDS), reference()
    asked = ["a", "zz", "item-9", "c\x00x", "item-10", "b", "c", "", "zzz", "item-1", "a\x00", "ITEM-9"]
    assert ids.many(asked) == [ref.get(raw) for raw in asked]
    assert dense_many(ids, asked) == dense_many(ref, asked)
    assert len(ids) == len(ref) and set(ids) == set(ref) and as_dict(ids) == ref
    assert ids["item-10"] == 5 and ids.get("nope") is None and "a" in ids and "" not in ids
    with pytest.raises(KeyError):
        ids["nope"]


def test_an_id_the_array_cannot_hold_is_never_confused_with_one_it_holds() -> None:
    """numpy drops trailing NULs and a wider id never fits the array's width: both are unknown."""
    ids = DenseIds(IDS)
    assert ids.many(["zz\x00", "zz" + "z" * 40, "b\x00\x00"]) == [None, None, None]


def test_raw_ids_read_as_strings() -> None:
    raw = RawIds(IDS)
    assert len(raw) == len(IDS) and raw[2] == "a" and type(raw[2]) is str
    assert list(raw) == IDS.tolist() and raw[1:3] == ["b", "a"]
    with pytest.raises(ValueError, match="unicode"):
        RawIds(np.arange(3))


def test_an_empty_catalogue_knows_no_id() -> None:
    assert DenseIds(np.array([""])).many(["a", ""]) == [None, None]
