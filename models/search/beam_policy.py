"""How wide the beam is: one rule for every bundle's default, and the widening a request for k needs.

**Default beam (one rule for every method).** A bundle's default beam targets a number of items
scored per query (candidates) that grows with the catalogue:
``target = min(N, max(MIN_CANDIDATES, floor(CANDIDATE_FRACTION * N)))``, converted to leaves through the
index's mean leaf size (``beam = ceil(target / mean_leaf_size)``: SEATER and TDR leaves hold one
item, URI's buckets several) and clamped to ``[MIN_BEAM, min(MAX_BEAM, num_leaves)]``.
The fraction is the issue's budget (at most 1% of the catalogue scored); the floor keeps small
catalogues from scoring fewer items than a ranking of 20 needs to be good. The constants were read
off the validation-user frontier (``genret frontier --eval-split valid``) on MovieLens-100k, the
synthetic planted data and Beauty; the figures are in ``docs/results.md`` ("Retrieval quality").
Trainers write the result to the bundle manifest's ``config.beam_size`` at export.

**Widening for k.** A request for ``k`` items with ``e`` excluded ids needs leaves holding at least
``k + e`` items whichever leaves the beam picks: the smallest ``b`` such that the ``b`` smallest
leaves hold ``k + e`` items (:func:`beam_for_k`), bounded by ``max_beam``. Each row's beam depends
on that row alone, so a row gets the same answer in any batch.
"""

from __future__ import annotations

import math

import numpy as np

CANDIDATE_FRACTION = 0.01  # share of the catalogue scored per query at the default beam
MIN_CANDIDATES = 100  # floor on the candidates targeted (5x a ranking of 20)
MIN_BEAM = 1
MAX_BEAM = 256  # = the service's default GENRET_MAX_BEAM_SIZE


def target_candidates(num_items: int) -> int:
    """Items to score per query at the default beam, for a catalogue of ``num_items``."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    share = math.floor(CANDIDATE_FRACTION * num_items)  # floor: never more than the fraction
    return min(num_items, max(MIN_CANDIDATES, share))


def default_beam(num_items: int, leaf_sizes: np.ndarray, max_beam: int = MAX_BEAM) -> int:
    """The default beam of an index whose leaves hold ``leaf_sizes [L]`` items (the rule above)."""
    sizes = np.asarray(leaf_sizes, dtype=np.int64)
    if sizes.ndim != 1 or len(sizes) == 0 or sizes.min() < 1:
        raise ValueError("leaf_sizes must be a non-empty 1-d array of sizes >= 1")
    mean_leaf = float(sizes.sum()) / len(sizes)
    beam = math.ceil(target_candidates(num_items) / mean_leaf)
    return max(MIN_BEAM, min(beam, max_beam, len(sizes)))


def smallest_leaves_cumsum(leaf_sizes: np.ndarray) -> np.ndarray:
    """``[L]`` items held by the ``i+1`` smallest leaves (what :func:`beam_for_k` searches)."""
    return np.cumsum(np.sort(np.asarray(leaf_sizes, dtype=np.int64)))


def beam_for_k(
    k: int, beam_size: int, num_excluded: int, cumsum_smallest: np.ndarray, max_beam: int | None = None
) -> int:
    """The beam that answers ``k`` items with ``num_excluded`` ids excluded: ``beam_size`` widened
    to the fewest leaves sure to hold ``k + num_excluded`` items, at most ``max_beam`` (and the
    number of leaves). Never narrower than ``beam_size``."""
    if k < 1 or beam_size < 1 or num_excluded < 0:
        raise ValueError(
            f"need k >= 1, beam_size >= 1, num_excluded >= 0; got {k}, {beam_size}, {num_excluded}"
        )
    num_leaves = len(cumsum_smallest)
    need = int(np.searchsorted(cumsum_smallest, k + num_excluded, side="left")) + 1
    cap = num_leaves if max_beam is None else min(num_leaves, max_beam)
    return max(beam_size, min(need, cap))
