"""The default-beam rule and the widening a request for k needs."""

from __future__ import annotations

import numpy as np
import pytest

from models.search.beam_policy import (
    CANDIDATE_FRACTION,
    MAX_BEAM,
    MIN_CANDIDATES,
    beam_for_k,
    default_beam,
    smallest_leaves_cumsum,
    target_candidates,
)


def test_target_is_a_share_of_the_catalogue_with_a_floor() -> None:
    assert target_candidates(1682) == MIN_CANDIDATES  # MovieLens-100k: the floor
    assert target_candidates(12_101) == int(CANDIDATE_FRACTION * 12_101) == 121  # Beauty: at most 1%
    assert target_candidates(40) == 40  # never more than the catalogue
    with pytest.raises(ValueError):
        target_candidates(0)


@pytest.mark.parametrize(
    ("num_items", "leaf_size", "expected"),
    [
        (12_101, 1, 121),  # one item per leaf (SEATER, TDR): beam = candidates
        (12_000, 12, 10),  # buckets of 12 (URI): 120 candidates / 12 items per leaf
        (1_000_000, 1, MAX_BEAM),  # clamped to the upper bound
        (50, 1, 50),  # and to the number of leaves
    ],
)
def test_default_beam(num_items: int, leaf_size: int, expected: int) -> None:
    sizes = np.full(max(1, num_items // leaf_size), leaf_size)
    assert default_beam(num_items, sizes) == expected


def test_widening_holds_k_plus_excluded_items_whichever_leaves_the_beam_picks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 30, size=int(rng.integers(5, 60)))
        cum = smallest_leaves_cumsum(sizes)
        k, excluded, beam = int(rng.integers(1, 100)), int(rng.integers(0, 50)), int(rng.integers(1, 20))
        b = beam_for_k(k, beam, excluded, cum)
        assert b >= beam
        if b < len(sizes):  # not capped: the b smallest leaves already hold k + excluded items
            assert np.sort(sizes)[:b].sum() >= k + excluded
            assert b == beam or np.sort(sizes)[: b - 1].sum() < k + excluded  # and b is the fewest


def test_widening_on_single_item_leaves_and_its_bound() -> None:
    cum = smallest_leaves_cumsum(np.ones(1000, np.int64))
    assert beam_for_k(50, 20, 0, cum) == 50
    assert beam_for_k(50, 20, 7, cum) == 57
    assert beam_for_k(10, 100, 5, cum) == 100  # never narrower than asked
    assert beam_for_k(200, 100, 0, cum, max_beam=128) == 128  # within the bound
    assert beam_for_k(5000, 10, 0, cum) == 1000  # at most every leaf
