"""Fit the content tower (:mod:`models.nets.content_tower`) of a bundle at export time.

Ridge regression from the mean of an item's attribute one-hots to its vector in the bundle's item
space (``item_emb``, the rerank vectors), in closed form::

    x_i = onehot(attrs_i).mean()                      # [A], row i of X [n, A]
    W   = (X^T X + lam I)^-1 X^T (Y - mean(Y))         # [A, Dr]; bias = mean(Y)

The target is centred, so the penalty shrinks towards the mean item vector (an item whose
attributes say little lands near the middle of the space rather than at the origin). The shrunk
vectors are short (about half the items' norm on Beauty), and with inner-product scoring a short
vector is never retrieved; so a second ridge of the same form predicts the item's norm
(``norm_weight``, ``norm_bias``) and the tower's vector is the first one's direction at that norm. ``lam`` is
chosen by a rule, not per data set: K-fold cross-validation over items (held-out items, none of
whose rows the fold's fit sees) on a grid relative to ``trace(X^T X) / A``, the value with the least
held-out squared error; one eigendecomposition of each fold's Gram matrix serves the whole grid.
The Gram matrix is built from attribute pairs (``sum_i k_i^2`` entries), so the cost grows with
items x attributes per item, not items x vocabulary; the vocabulary is capped at the
``max_attributes`` most frequent attribute ids (the rest are unknown to the tower).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle.attributes import ItemAttributes
from models.nets.content_tower import CONTENT_FILE, ContentTower

log = logging.getLogger(__name__)

LAMBDA_GRID = tuple(float(c) for c in 10.0 ** np.linspace(-4, 2, 13))
"""Ridge penalties tried, as multiples of ``trace(X^T X) / A`` (the mean squared column norm)."""


@dataclass(frozen=True)
class ContentFitConfig:
    folds: int = 5  # cross-validation folds over items (>= 2)
    max_holdout: int = 2000  # held-out items scored per fold (bounds the [n, A] projection)
    max_attributes: int = 4096  # vocabulary cap: the most frequent attribute ids
    min_items: int = 20  # fewer items with attributes: no tower
    seed: int = 0


@dataclass(frozen=True)
class ContentFit:
    """The fitted tower and what cross-validation measured (recorded in the manifest)."""

    tower: ContentTower
    report: dict[str, Any]


@dataclass(frozen=True)
class _Design:
    """The rows of X of the fitted items: CSR over ``cols`` with weights ``1 / k_i``."""

    items: np.ndarray  # [n] dense ids
    ptr: np.ndarray  # [n+1] int64
    cols: np.ndarray  # [E] int64 column of each entry
    w: np.ndarray  # [E] float64 weight of each entry (1 / its row's length)
    num_cols: int

    def subset(self, rows: np.ndarray) -> _Design:
        lengths = np.diff(self.ptr)[rows]
        take = np.concatenate([np.arange(self.ptr[r], self.ptr[r + 1]) for r in rows]) if len(rows) else rows
        ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return _Design(self.items[rows], ptr, self.cols[take], self.w[take], self.num_cols)

    def gram(self) -> np.ndarray:
        """``X^T X`` [A, A] float64 from the attribute pairs of each row."""
        A = self.num_cols
        k = np.diff(self.ptr)  # [n]
        k_e = np.repeat(k, k)  # [E] length of each entry's row
        start_e = np.repeat(self.ptr[:-1], k)  # [E] start of each entry's row
        total = int(k_e.sum())  # sum_i k_i^2 pairs
        within = np.arange(total) - np.repeat(np.cumsum(k_e) - k_e, k_e)
        left = np.repeat(self.cols, k_e)
        right = self.cols[np.repeat(start_e, k_e) + within]
        weights = np.repeat(self.w**2, k_e)
        return np.bincount(left * A + right, weights=weights, minlength=A * A).reshape(A, A)

    def times(self, M: np.ndarray) -> np.ndarray:
        """``X @ M`` [n, K] for M [A, K] (every row has at least one entry)."""
        return np.add.reduceat(self.w[:, None] * M[self.cols], self.ptr[:-1], axis=0)

    def t_times(self, Y: np.ndarray) -> np.ndarray:
        """``X^T @ Y`` [A, Dr] for Y [n, Dr] (rows of the fitted items)."""
        out = np.zeros((self.num_cols, Y.shape[1]), np.float64)
        rows = np.repeat(np.arange(len(self.items)), np.diff(self.ptr))
        np.add.at(out, self.cols, self.w[:, None] * Y[rows])
        return out


def _design(attrs: ItemAttributes, max_attributes: int) -> tuple[_Design, np.ndarray]:
    """X over the items with at least one attribute of the capped vocabulary; returns it and the
    vocabulary indices (into ``attrs.vocab``) of its columns."""
    values, offsets = attrs.values, attrs.offsets
    counts = np.bincount(values, minlength=len(attrs.vocab))
    by_freq = np.argsort(-counts, kind="stable")
    keep = np.sort(by_freq[: min(max_attributes, int((counts > 0).sum()))])
    col_of = np.full(len(attrs.vocab), -1, np.int64)
    col_of[keep] = np.arange(len(keep))
    rows = np.repeat(np.arange(attrs.num_rows), np.diff(offsets))  # [nnz]
    cols = col_of[values]
    known = cols >= 0
    rows, cols = rows[known], cols[known]
    k = np.bincount(rows, minlength=attrs.num_rows)
    items = np.flatnonzero(k)
    items = items[items > 0]
    ptr = np.concatenate([[0], np.cumsum(k[items])]).astype(np.int64)  # row 0 holds no entry
    w = 1.0 / k[rows]
    return _Design(items, ptr, cols, w.astype(np.float64), len(keep)), keep


def _scores(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(mean squared error per item, mean cosine) of predicted vs true rows."""
    mse = float(((pred - true) ** 2).sum(axis=1).mean())
    norms = np.linalg.norm(pred, axis=1) * np.linalg.norm(true, axis=1)
    cos = float(((pred * true).sum(axis=1) / np.maximum(norms, 1e-12)).mean())
    return mse, cos


def _cross_validate(X: _Design, Y: np.ndarray, grid: np.ndarray, cfg: ContentFitConfig) -> np.ndarray:
    """[len(grid), 3] mean over folds of (held-out MSE, held-out cosine, mean-vector MSE)."""
    rng = np.random.default_rng(cfg.seed)
    fold_of = rng.permutation(len(X.items)) % cfg.folds
    parts = [X.subset(np.flatnonzero(fold_of == f)) for f in range(cfg.folds)]
    grams = [p.gram() for p in parts]
    xty = [p.t_times(Y[p.items]) for p in parts]
    colsum = [np.bincount(p.cols, weights=p.w, minlength=X.num_cols) for p in parts]
    total = np.zeros((len(grid), 3))
    for f, held in enumerate(parts):
        train = fold_of != f
        y_mean = Y[X.items[train]].mean(axis=0)  # [Dr]
        G = sum(g for i, g in enumerate(grams) if i != f)  # [A, A]
        XtY = sum(m for i, m in enumerate(xty) if i != f) - np.outer(
            sum(c for i, c in enumerate(colsum) if i != f), y_mean
        )  # X^T (Y - mean), [A, Dr]
        s, V = np.linalg.eigh(G)  # G = V diag(s) V^T
        Q = V.T @ XtY  # [A, Dr]
        sub = held.subset(np.arange(min(len(held.items), cfg.max_holdout)))
        P = sub.times(V)  # [h, A]
        true = Y[sub.items]
        base = _scores(np.broadcast_to(y_mean, true.shape), true)[0]
        for j, lam in enumerate(grid):
            pred = y_mean + P @ (Q / (np.maximum(s, 0.0) + lam)[:, None])  # [h, Dr]
            total[j] += (*_scores(pred, true), base)
    return total / cfg.folds


def _ridge(
    X: _Design, Y: np.ndarray, cfg: ContentFitConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Ridge of Y [N+1, D] (rows of X's items) on X, penalty by cross-validation: (W [A, D], bias [D],
    what cross-validation measured at the chosen penalty)."""
    G = X.gram()  # [A, A]
    grid = np.asarray(LAMBDA_GRID) * float(np.trace(G)) / X.num_cols
    cv = _cross_validate(X, Y, grid, cfg)
    best = int(np.argmin(cv[:, 0]))
    y_mean = Y[X.items].mean(axis=0)  # [D]
    colsum = np.bincount(X.cols, weights=X.w, minlength=X.num_cols)
    XtY = X.t_times(Y[X.items]) - np.outer(colsum, y_mean)  # X^T (Y - mean), [A, D]
    W = np.linalg.solve(G + grid[best] * np.eye(X.num_cols), XtY)  # [A, D]
    cv_best = {"lambda": float(grid[best]), "lambda_relative": LAMBDA_GRID[best]}
    cv_best |= {
        "cv_mse": float(cv[best, 0]),
        "cv_cosine": float(cv[best, 1]),
        "cv_mse_mean": float(cv[best, 2]),
    }
    return W, y_mean, cv_best


def fit_content_tower(
    item_emb: np.ndarray, attrs: ItemAttributes, cfg: ContentFitConfig | None = None
) -> ContentFit | None:
    """The content tower of ``item_emb`` [N+1, Dr] from ``attrs`` (rows for the same dense ids):
    one ridge for the vectors (their direction) and one for their norms; None when fewer than
    ``cfg.min_items`` items have attributes."""
    cfg = cfg or ContentFitConfig()
    if cfg.folds < 2:
        raise ValueError(f"folds must be >= 2, got {cfg.folds}")
    if attrs.num_rows != len(item_emb):
        raise ValueError(f"attributes cover {attrs.num_rows} dense ids, item_emb has {len(item_emb)} rows")
    X, vocab_idx = _design(attrs, cfg.max_attributes)
    if len(X.items) < max(cfg.min_items, 2 * cfg.folds):
        log.info("content tower: %d items with attributes, too few to fit one", len(X.items))
        return None
    Y = np.asarray(item_emb, np.float64)  # [N+1, Dr]
    W, bias, cv_vec = _ridge(X, Y, cfg)
    norm_w, norm_b, cv_norm = _ridge(X, np.linalg.norm(Y, axis=1, keepdims=True), cfg)
    tower = ContentTower(
        vocab=attrs.vocab[vocab_idx],
        weight=W.astype(np.float32),
        bias=bias.astype(np.float32),
        norm_weight=norm_w[:, 0].astype(np.float32),
        norm_bias=np.asarray(norm_b[0], np.float32),
    )
    report: dict[str, Any] = {"kind": "ridge-mean-onehot", "items": len(X.items), "attributes": X.num_cols}
    report |= {"folds": cfg.folds, **cv_vec}
    report |= {"norm_lambda_relative": cv_norm["lambda_relative"], "norm_cv_mse": cv_norm["cv_mse"]}
    report["norm_cv_mse_mean"] = cv_norm["cv_mse_mean"]
    log.info("content tower: %s", report)
    return ContentFit(tower=tower, report=report)


def write_content(out: Path, item_emb: np.ndarray, attrs: ItemAttributes | None) -> dict[str, Any] | None:
    """Fit the tower and write ``out / content.npz``; returns the fit's report (for the manifest), or
    None (and no file) without attributes or with too few items that have some."""
    if attrs is None:
        return None
    if attrs.num_rows != len(item_emb):
        raise ValueError(
            f"item_attributes cover {attrs.num_rows} dense ids, item_emb has {len(item_emb)} rows"
        )
    fit = fit_content_tower(item_emb, attrs)
    if fit is None:
        return None
    fit.tower.save(out / CONTENT_FILE)
    return fit.report
