"""Item attributes (CSR over dense ids): lookups both ways, extension for added items, checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.bundle.attributes import ItemAttributes


def table() -> ItemAttributes:
    # dense ids 0 (padding), 1..4
    return ItemAttributes.from_rows([[], ["brand-a", "12"], [], ["12", "7"], ["7", "7"]])


def test_rows_and_lookups() -> None:
    attrs = table()
    assert attrs.num_rows == 5
    assert attrs.vocab.tolist() == ["brand-a", "12", "7"]
    assert attrs.offsets.dtype == np.int64 and attrs.values.dtype == np.int64
    assert attrs.attributes_of(0) == [] and attrs.attributes_of(2) == []
    assert sorted(attrs.attributes_of(1)) == ["12", "brand-a"]
    assert attrs.attributes_of(4) == ["7"]  # repeated ids count once
    assert attrs.items_with(["12"]).tolist() == [1, 3]
    assert attrs.items_with(["7", "brand-a"]).tolist() == [1, 3, 4]  # any of them
    assert attrs.items_with(["nope"]).tolist() == [] and attrs.items_with([]).dtype == np.int64
    assert attrs.index_of("7") == 2 and attrs.index_of("8") is None
    with pytest.raises(IndexError):
        attrs.attributes_of(5)


def test_extended_appends_rows_and_unknown_attribute_ids() -> None:
    attrs = table()
    more = attrs.extended([["7", "new"], []])
    assert more.num_rows == 7 and attrs.num_rows == 5  # the original is unchanged
    assert more.vocab.tolist() == ["brand-a", "12", "7", "new"]
    assert sorted(more.attributes_of(5)) == ["7", "new"] and more.attributes_of(6) == []
    assert more.items_with(["7"]).tolist() == [3, 4, 5]
    assert more.items_with(["new"]).tolist() == [5]
    again = ItemAttributes.from_arrays(more.vocab, more.offsets, more.values, rows=7)  # still valid
    assert again.items_with(["12"]).tolist() == [1, 3]


def test_from_rows_refuses_attributes_on_the_padding_row() -> None:
    with pytest.raises(ValueError, match="padding"):
        ItemAttributes.from_rows([["x"], ["y"]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"offsets": np.array([0, 0, 2, 2, 4], np.int64)}, "expected num_items"),
        ({"offsets": np.array([0, 0, 3, 2, 4, 5], np.int64)}, "must rise"),
        ({"offsets": np.array([0, 1, 2, 3, 4, 5], np.int64)}, "row 0"),
        ({"offsets": np.array([0, 0, 2, 2, 4, 5], np.int32)}, "attr_offsets is int32"),
        ({"values": np.array([0, 1, 1, 2, 9], np.int64)}, "must index attr_vocab"),
        ({"values": np.array([0, 1, 1, -1, 2], np.int64)}, "must index attr_vocab"),
        ({"vocab": np.array(["a", "a", "b"])}, "duplicate"),
        ({"vocab": np.array([1, 2, 3])}, "attr_vocab is int"),
    ],
)
def test_from_arrays_refuses_bad_arrays(change: dict[str, np.ndarray], message: str) -> None:
    good = table()
    arrays = {"vocab": good.vocab, "offsets": good.offsets, "values": good.values} | change
    with pytest.raises(ValueError, match=message):
        ItemAttributes.from_arrays(**arrays, rows=5)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(st.lists(st.sampled_from("abcdefg"), max_size=4), min_size=1, max_size=20),
    query=st.lists(st.sampled_from("abcdefgxy"), max_size=3),
)
def test_items_with_matches_a_scan(rows: list[list[str]], query: list[str]) -> None:
    attrs = ItemAttributes.from_rows([[], *rows])
    want = [i + 1 for i, r in enumerate(rows) if set(r) & set(query)]
    assert attrs.items_with(query).tolist() == want
    for i, r in enumerate(rows):
        assert sorted(attrs.attributes_of(i + 1)) == sorted(set(r))
