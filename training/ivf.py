"""The dense-retrieval + ANN baseline every generative index must beat: SASRec vectors in faiss IVF.

Definitions (the same for every method): faiss ``IndexIVFFlat``, inner product,
``nlist`` 1,024 (below 20k items: ``round(N/12)``), trained on all items; the probed items are
scored exactly (IVFFlat stores the full vectors), history items excluded afterwards. *Candidates*
= items in the probed cells, counted before history exclusion. The IVF figure at a budget is the
linear interpolation in ``log(candidates)`` between measured ``nprobe`` points.

faiss-cpu is an optional extra of the trainer side (``pip install genret[bench]``), imported
lazily: the service never needs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NLIST_LARGE = 1024
LARGE_CATALOGUE = 20_000
ITEMS_PER_CELL_SMALL = 12


def ivf_nlist(num_items: int) -> int:
    """Cells of the IVF index for ``num_items`` items (1,024; below 20k items round(N/12))."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    return NLIST_LARGE if num_items >= LARGE_CATALOGUE else max(1, round(num_items / ITEMS_PER_CELL_SMALL))


def nprobe_sweep(nlist: int) -> list[int]:
    """1, 2, 4, ... up to ``nlist``, and ``nlist`` itself (the exhaustive setting)."""
    out = [1 << i for i in range(max(1, nlist).bit_length()) if (1 << i) < nlist]
    return [*out, nlist]


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "genret: the IVF baseline needs faiss-cpu: pip install 'genret[bench]' (or faiss-cpu>=1.8)"
        ) from exc
    return faiss


@dataclass(frozen=True)
class IvfResult:
    items: np.ndarray  # [B, k] dense ids, 0 where fewer were found
    num_scored: np.ndarray  # [B] items in the probed cells (before exclusion)
    seconds: float  # wall time of the searches


class IvfIndex:
    """``item_emb [N+1, D]`` (row 0 = padding, never indexed) in an ``IndexIVFFlat`` (inner product).

    Item ``i`` is stored under id ``i``, so results are dense item ids.
    """

    def __init__(
        self, item_emb: np.ndarray, nlist: int | None = None, *, seed: int = 0, threads: int = 1
    ) -> None:
        faiss = _faiss()
        faiss.omp_set_num_threads(threads)
        vectors = np.ascontiguousarray(item_emb[1:], dtype=np.float32)  # [N, D]
        self.num_items, dim = vectors.shape
        self.nlist = ivf_nlist(self.num_items) if nlist is None else nlist
        self.quantizer = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIVFFlat(self.quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        self.index.cp.min_points_per_centroid = 1  # small catalogues: ~12 items per cell by definition
        self.index.train(vectors)
        self.index.add_with_ids(vectors, np.arange(1, self.num_items + 1, dtype=np.int64))
        invlists = self.index.invlists
        self.list_sizes = np.array(
            [invlists.list_size(c) for c in range(self.nlist)], dtype=np.int64
        )  # [nlist]

    def search(
        self, queries: np.ndarray, k: int, nprobe: int, exclude: Sequence[np.ndarray] | None = None
    ) -> IvfResult:
        """Top-``k`` of ``queries [B, D]`` among the items of the ``nprobe`` nearest cells."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        rows = (
            [np.unique(np.asarray(e, np.int64)) for e in exclude]
            if exclude is not None
            else [np.zeros(0, np.int64)] * len(q)
        )
        extra = max((len(r) for r in rows), default=0)
        self.index.nprobe = nprobe
        start = time.perf_counter()
        _, cells = self.quantizer.search(q, nprobe)  # [B, nprobe]
        _, found = self.index.search(q, min(self.num_items, k + extra))  # [B, k+extra], -1 = none
        seconds = time.perf_counter() - start
        out = np.zeros((len(q), k), np.int64)
        for row, (ids, excl) in enumerate(zip(found, rows, strict=True)):
            ids = ids[ids > 0]
            ids = ids[~np.isin(ids, excl)][:k]
            out[row, : len(ids)] = ids
        scored = np.where(cells >= 0, self.list_sizes[cells.clip(min=0)], 0).sum(axis=1)
        return IvfResult(items=out, num_scored=scored, seconds=seconds)


def interpolate_at(candidates: Sequence[float], values: Sequence[float], budget: float) -> float:
    """``values`` at ``budget`` candidates: linear in ``log(candidates)`` between measured points
    (sorted by candidates); NaN below the smallest measured budget, the last value above the largest."""
    pts = sorted(zip(candidates, values, strict=True))
    xs = [math.log(max(c, 1e-9)) for c, _ in pts]
    ys = [v for _, v in pts]
    x = math.log(max(budget, 1e-9))
    if not pts or x < xs[0] - 1e-12:
        return float("nan")
    if x >= xs[-1]:
        return float(ys[-1])
    return float(np.interp(x, xs, ys))
