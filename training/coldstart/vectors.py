"""Vectors for items no model saw, from their attributes alone: three sources compared on one hold-out
(``genret coldstart --vectors``).

* ``tower``: the content tower the bundles ship (:mod:`training.content_tower`: ridge maps from
  attributes to the vector's direction and to its norm).
* ``attribute_knn``: the ``KNN`` known items nearest by attribute overlap (Jaccard of the attribute
  sets), their vectors averaged with the overlap as weight.
* ``category_popularity``: the known items sharing an attribute with the new item, their vectors
  averaged with their training interactions as weight (the popular items of its categories).

``attribute_knn`` and ``category_popularity`` take the weighted mean's direction and the neighbours'
weighted mean norm: a plain mean of many vectors is shorter than any of them, and inner-product
ranking would read that as "rank low". ``absent`` (the items left out of the ranking) is the floor.

The protocol: 10% of the items held out (:func:`training.coldstart.holdout.hold_out_items`), SASRec
trained on the rest (the reduced split), each source gives the held-out items vectors, and every
test user is ranked by exact inner product over all items (history excluded); "new" scores the users
whose test target is a held-out item, on those targets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.coldstart.holdout import Holdout, hold_out_items, reduced_split
from training.content_tower import fit_content_tower
from training.context import TrainContext
from training.data import Dataset
from training.export.spec import dataset_item_attributes
from training.methods.sasrec.cache import sasrec_for
from training.metrics import evaluate_ranking
from training.splits import make_split

KNN = 20
K = 20
SOURCES = ("absent", "tower", "attribute_knn", "category_popularity")


@dataclass(frozen=True)
class VectorComparison:
    data: dict[str, Any]
    held_out: int
    no_attributes: int  # held-out items without attributes: left out of every source alike
    test_users: int
    new_users: int
    scores: dict[str, dict[str, float]]  # source -> new_* and all_* recall/ndcg@K
    seconds: dict[str, float]  # "sasrec" (training or cache) and each source's fit


def incidence(attrs: Sequence[np.ndarray], num_attributes: int) -> np.ndarray:
    """``[n, A]`` float32 0/1: which attribute ids (1..A) each item holds."""
    out = np.zeros((len(attrs), num_attributes), np.float32)
    for i, a in enumerate(attrs):
        out[i, np.asarray(a, np.int64) - 1] = 1.0
    return out


def _scaled_means(weights: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """``weights [H, N]`` over the rows of ``emb [N, D]`` -> ``[H, D]``: the weighted mean's direction
    with the weighted mean norm of the rows (rows with no weight: zeros)."""
    total = weights.sum(axis=1, keepdims=True)  # [H, 1]
    safe = np.where(total > 0, total, 1.0)
    mean = weights @ emb / safe  # [H, D]
    norm = weights @ np.linalg.norm(emb, axis=1) / safe[:, 0]  # [H]
    length = np.linalg.norm(mean, axis=1)
    scale = np.divide(norm, length, out=np.zeros_like(norm), where=length > 0)
    return (mean * scale[:, None]).astype(np.float32)


def attribute_knn_vectors(
    known: np.ndarray, known_emb: np.ndarray, new: np.ndarray, k: int = KNN
) -> np.ndarray:
    """``known [N, A]`` and ``new [H, A]`` incidence, ``known_emb [N, D]`` -> ``[H, D]``."""
    inter = new @ known.T  # [H, N]
    union = new.sum(axis=1, keepdims=True) + known.sum(axis=1)[None, :] - inter
    jaccard = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    if jaccard.shape[1] > k:
        cut = np.partition(jaccard, -k, axis=1)[:, -k][:, None]  # the k-th largest overlap per row
        jaccard = np.where(jaccard >= cut, jaccard, 0.0)
    return _scaled_means(jaccard, known_emb)


def category_popularity_vectors(
    known: np.ndarray, known_emb: np.ndarray, popularity: np.ndarray, new: np.ndarray
) -> np.ndarray:
    """``known [N, A]``, ``known_emb [N, D]``, ``popularity [N]`` training interactions and ``new
    [H, A]`` -> ``[H, D]``: known items sharing an attribute, weighted by their popularity."""
    shares = (new @ known.T) > 0  # [H, N]
    return _scaled_means(shares * popularity[None, :].astype(np.float32), known_emb)


def compare_vectors(
    full: Dataset,
    workdir: Path,
    kind: str = "user",
    seed: int = 0,
    max_len: int = 50,
    share: float = 0.1,
    overrides: dict[str, Any] | None = None,
) -> VectorComparison:
    """The module docstring's protocol on ``full`` (which must have item attributes)."""
    if full.item_attributes is None or full.num_attributes == 0:
        raise ValueError(f"{full.name} has no item attributes: no content-only vectors to compare")
    holdout = hold_out_items(full, share, seed)
    full_split = make_split(full, kind=kind, seed=seed, max_len=max_len)
    split = reduced_split(full_split, holdout)
    ctx = TrainContext(holdout.dataset, split, seed, workdir / "reduced", dict(overrides or {}))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    sasrec = sasrec_for(ctx)
    seconds["sasrec"] = time.perf_counter() - start
    known_emb = sasrec.item_embeddings()[1:]  # [N-H, D] reduced ids 1..
    reduced = holdout.dataset
    assert reduced.item_attributes is not None
    known = incidence(reduced.item_attributes[1:], full.num_attributes)  # [N-H, A]
    held_attrs = [full.item_attributes[int(i)] for i in holdout.items]
    has = np.asarray([len(a) > 0 for a in held_attrs])
    new = incidence(held_attrs, full.num_attributes)  # [H, A]
    popularity = np.bincount(np.concatenate(split.train), minlength=reduced.num_items + 1)[1:]
    vectors: dict[str, np.ndarray | None] = {"absent": None}
    start = time.perf_counter()
    attrs = dataset_item_attributes(reduced)
    fit = fit_content_tower(sasrec.item_embeddings(), attrs) if attrs is not None else None
    names = full.attribute_names()
    if fit is not None:
        lists = [[names[int(a)] for a in held] for held in held_attrs]
        usable = np.asarray([fit.tower.has_known(a) for a in lists]) & has
        tower = np.zeros((len(lists), known_emb.shape[1]), np.float32)
        tower[usable] = fit.tower.vectors([a for a, ok in zip(lists, usable, strict=True) if ok])
        vectors["tower"] = tower
    seconds["tower"] = time.perf_counter() - start
    start = time.perf_counter()
    vectors["attribute_knn"] = attribute_knn_vectors(known, known_emb, new)
    seconds["attribute_knn"] = time.perf_counter() - start
    start = time.perf_counter()
    vectors["category_popularity"] = category_popularity_vectors(known, known_emb, popularity, new)
    seconds["category_popularity"] = time.perf_counter() - start
    test = full_split.test
    queries_for = [holdout.to_reduced[h][holdout.to_reduced[h] > 0] for h in test.histories]
    rows = [r for r, h in enumerate(queries_for) if len(h)]
    query = sasrec.encode([queries_for[r] for r in rows])  # [U, D]
    new_rows = [j for j, r in enumerate(rows) if holdout.is_held(test.targets[r]).any()]
    scores = {}
    for source, held_vec in vectors.items():
        table = _full_table(full, holdout, known_emb, held_vec, has)  # [N+1, D], NaN rows ranked out
        ranked = _top_k(query, table, [test.histories[r] for r in rows])
        targets = [test.targets[r] for r in rows]
        new_targets = [targets[j][holdout.is_held(targets[j])] for j in new_rows]
        scores[source] = {
            **{f"new_{m}": v for m, v in evaluate_ranking(ranked[new_rows], new_targets, (K,)).items()},
            **{f"all_{m}": v for m, v in evaluate_ranking(ranked, targets, (K,)).items()},
        }
    return VectorComparison(
        data={
            "name": full.name,
            "items": full.num_items,
            "users": full.num_users,
            "split": kind,
            "seed": seed,
        },
        held_out=len(holdout.items),
        no_attributes=int((~has).sum()),
        test_users=len(rows),
        new_users=len(new_rows),
        scores=scores,
        seconds=seconds,
    )


def _full_table(
    full: Dataset, holdout: Holdout, known_emb: np.ndarray, held: np.ndarray | None, has: np.ndarray
) -> np.ndarray:
    """``[N+1, D]`` vectors by full dense id: the kept items' trained vectors, the held-out items'
    from ``held`` (NaN where absent or without attributes: never ranked)."""
    table = np.full((full.num_items + 1, known_emb.shape[1]), np.nan, np.float32)
    kept = np.flatnonzero(holdout.to_reduced > 0)
    table[kept] = known_emb[holdout.to_reduced[kept] - 1]
    if held is not None:
        table[holdout.items[has]] = held[has]
    return table


def _top_k(
    query: np.ndarray, table: np.ndarray, histories: Sequence[np.ndarray], batch: int = 1024
) -> np.ndarray:
    """``[U, K]`` top-K full dense ids by ``query [U, D] @ table.T``, history and unranked rows excluded."""
    out = np.zeros((len(query), K), np.int64)
    usable = ~np.isnan(table).any(axis=1)
    usable[0] = False
    clean = np.nan_to_num(table)
    for lo in range(0, len(query), batch):
        scores = query[lo : lo + batch] @ clean.T  # [B, N+1]
        scores[:, ~usable] = -np.inf
        for j, history in enumerate(histories[lo : lo + batch]):
            scores[j, np.asarray(history, np.int64)] = -np.inf
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        out[lo : lo + batch] = np.take_along_axis(top, order, 1)
    return out
