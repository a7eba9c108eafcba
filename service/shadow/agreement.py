"""What the shadow lane compares and carries: agreement measures between two ranked lists (pure
functions), one model's answer as the lane sees it, and one shadow job. Read by the lane, its JSONL
log and the quality monitor; imports nothing of the project."""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Req = TypeVar("Req")


# ---- agreement measures (pure) ------------------------------------------------------------------


def overlap_at_k(primary: Sequence[Hashable], shadow: Sequence[Hashable], k: int) -> float:
    """|top-k(primary) ∩ top-k(shadow)| / k', with k' = min(k, longer list) (1.0 when both are empty)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    a, b = set(primary[:k]), set(shadow[:k])
    denom = min(k, max(len(primary), len(shadow)))
    return 1.0 if denom == 0 else len(a & b) / denom


def jaccard(primary: Sequence[Hashable], shadow: Sequence[Hashable]) -> float:
    """|A ∩ B| / |A ∪ B| over the two item sets (1.0 when both are empty)."""
    a, b = set(primary), set(shadow)
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def rank_biased_overlap(primary: Sequence[Hashable], shadow: Sequence[Hashable], p: float = 0.9) -> float:
    """Extrapolated rank-biased overlap RBO_ext (Webber, Moffat, Zobel 2010, eq. 32), in [0, 1].

    Top-weighted agreement of two rankings of distinct items: depth d weighs p^(d-1)(1-p), so with
    p = 0.9 the first 10 ranks carry ~86 % of the weight. Lists may differ in length (s <= l):
        RBO_ext = (1-p)/p * (sum_{d=1..l} X_d/d p^d + sum_{d=s+1..l} X_s (d-s)/(s d) p^d)
                  + ((X_l - X_s)/l + X_s/s) p^l
    where X_d = |S[:d] ∩ L[:d]|. Identical lists give 1, disjoint lists 0; both empty give 1.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    short, long_ = (list(primary), list(shadow))
    if len(short) > len(long_):
        short, long_ = long_, short
    s, ll = len(short), len(long_)
    if ll == 0:
        return 1.0
    if s == 0:
        return 0.0
    seen_s: set[Hashable] = set()
    seen_l: set[Hashable] = set()
    overlap = 0  # X_d, updated incrementally
    total = 0.0
    x_s = 0
    for d in range(1, ll + 1):
        item_l = long_[d - 1]
        if d <= s:
            item_s = short[d - 1]
            if item_s == item_l:
                overlap += 1
            else:
                overlap += (item_s in seen_l) + (item_l in seen_s)
            seen_s.add(item_s)
            seen_l.add(item_l)
            if d == s:
                x_s = overlap
        else:
            overlap += item_l in seen_s
            seen_l.add(item_l)
            total += x_s * (d - s) / (s * d) * p**d
        total += overlap / d * p**d
    rbo = (1.0 - p) / p * total + ((overlap - x_s) / ll + x_s / s) * p**ll
    return min(1.0, max(0.0, rbo))


@dataclass(frozen=True)
class Agreement:
    overlap_at_k: float
    jaccard: float
    rbo: float

    @classmethod
    def of(cls, primary: Sequence[Hashable], shadow: Sequence[Hashable], k: int, p: float = 0.9) -> Agreement:
        k = max(k, 1)
        return cls(
            overlap_at_k=overlap_at_k(primary, shadow, k),
            jaccard=jaccard(primary[:k], shadow[:k]),
            rbo=rank_biased_overlap(primary[:k], shadow[:k], p),
        )


# ---- results and jobs (data) -------------------------------------------------------------------


@dataclass(frozen=True)
class Ranked:
    """One model's answer as the lane sees it."""

    items: tuple[str, ...]  # ranked item ids, best first, no padding
    bundle: str  # model name
    version: str  # bundle version / fingerprint
    latency_s: float  # time to answer as seen by the caller (nan = unknown: the lane measures it)


@dataclass(frozen=True)
class ShadowJob(Generic[Req]):
    """A copy of one primary request, aimed at ``shadow_bundle``, with the primary's answer."""

    request: Req  # what run_shadow is called with
    primary: Ranked
    shadow_bundle: str
    variant: str
    experiment: str
    request_id: str
    user_hash: str  # hashed user key (no raw user ids in logs)
    k: int
    enqueued_at: float = field(default_factory=time.monotonic)
