"""A bundle's offline metrics through the serving path (:class:`models.search.retriever.Retriever`):
top-K per user at a beam (widened per user as the service widens it, or fixed for a sweep), the beam
coverage (share of the targets among the items of the beam's leaves: recall of the candidate set
before the rerank) and the candidates scored. Used by ``genret eval`` and ``genret frontier``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.bundle.bundle import Bundle
from models.search.retriever import Retriever
from training.data import Dataset
from training.metrics import DEFAULT_KS, evaluate_ranking
from training.splits import EvalSet, make_split

log = logging.getLogger(__name__)

SWEEP_BEAMS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class EvalResult:
    beam_size: int
    metrics: dict[str, float]  # recall@k, ndcg@k, hr@k, beam_coverage, mean_candidates
    users: int
    seconds: float


def remap_to_bundle(ds: Dataset, bundle: Bundle) -> np.ndarray:
    """``[N_ds+1]`` dataset dense id -> bundle dense id (0 = unknown to the bundle), via raw ids."""
    bundle_id = {raw: i for i, raw in enumerate(bundle.item_ids.tolist()) if i > 0}
    return np.asarray([bundle_id.get(raw, 0) for raw in ds.vocab.raw_ids], dtype=np.int64)


def beam_coverage(bundle: Bundle, leaves: np.ndarray, targets: Sequence[np.ndarray]) -> np.ndarray:
    """``[B]`` share of each user's (known) targets whose leaf is among the beam's ``leaves [B,b]``."""
    leaf_of_item = bundle.index.item_path[:, -1]  # [N+1] global leaf id, row 0 = -1
    out = np.zeros(len(targets))
    for row, target in enumerate(targets):
        if len(target):
            out[row] = np.isin(leaf_of_item[target], leaves[row][leaves[row] >= 0]).mean()
    return out


def beam_groups(
    retriever: Retriever, k: int, beam: int, num_excluded: Sequence[int], *, widen: bool = True
) -> dict[int, list[int]]:
    """Row numbers grouped by the beam that answers them: ``beam`` widened per row as the service
    widens it (:meth:`Retriever.beam_for`, by the row's distinct excluded items), or ``beam`` itself
    for every row when not ``widen``."""
    groups: dict[int, list[int]] = {}
    for row, excluded in enumerate(num_excluded):
        groups.setdefault(retriever.beam_for(k, beam, excluded) if widen else beam, []).append(row)
    return groups


def evaluate_retriever(
    retriever: Retriever,
    evalset: EvalSet,
    beam_size: int | None,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exclude_history: bool = True,
    batch_size: int = 256,
    widen: bool = True,
) -> EvalResult:
    """Retrieve top-max(ks) for every user of ``evalset`` (bundle dense ids) and score it.

    ``beam_size`` ``None`` = the bundle's default. ``widen``: each user's beam widened as the service
    widens it (:meth:`Retriever.beam_for`: leaves holding ``k`` items besides the excluded ones);
    ``False`` keeps ``beam_size`` as given (a beam sweep). ``mean_candidates`` = items scored per
    user, counted before history exclusion; ``mean_after_exclusion`` the ones left after it.
    """
    k = max(ks)
    beam = retriever.default_beam_size if beam_size is None else beam_size
    n = len(evalset.histories)
    ranked = np.zeros((n, k), np.int64)
    coverage, scored, kept = np.zeros(n), np.zeros(n), np.zeros(n)
    seen = evalset.excluded()  # what each user's ranking leaves out (LOO: every earlier item)
    counts = [len(np.unique(items)) if exclude_history else 0 for items in seen]
    groups = beam_groups(retriever, k, beam, counts, widen=widen)
    start = time.perf_counter()
    for row_beam, rows in groups.items():
        for lo in range(0, len(rows), batch_size):
            idx = rows[lo : lo + batch_size]
            histories = [evalset.histories[i] for i in idx]
            exclude = [np.asarray(seen[i], np.int64) for i in idx] if exclude_history else None
            result = retriever.retrieve(histories, k=k, beam_size=row_beam, exclude=exclude)
            ranked[idx] = result.items
            coverage[idx] = beam_coverage(retriever.bundle, result.leaves, [evalset.targets[i] for i in idx])
            scored[idx] = result.num_scored
            kept[idx] = result.num_candidates
    seconds = time.perf_counter() - start
    metrics = evaluate_ranking(ranked, evalset.targets, ks)
    metrics["beam_coverage"] = float(coverage.mean()) if n else 0.0
    metrics["mean_candidates"] = float(scored.mean()) if n else 0.0
    metrics["mean_after_exclusion"] = float(kept.mean()) if n else 0.0
    metrics["mean_beam"] = float(sum(b * len(r) for b, r in groups.items()) / max(1, n))
    return EvalResult(beam_size=beam, metrics=metrics, users=n, seconds=seconds)


def bundle_eval_set(ds: Dataset, bundle: Bundle, kind: str, seed: int) -> tuple[EvalSet, dict[str, Any]]:
    """The test users of the split, with ids mapped to the bundle's (dropping unknown items)."""
    split = make_split(ds, kind=kind, seed=seed, max_len=bundle.manifest.max_history)
    test = split.test
    info: dict[str, Any] = {"same_dataset": ds.fingerprint() == bundle.manifest.dataset_fingerprint}
    if info["same_dataset"]:
        return test, info
    log.warning("dataset fingerprint differs from the bundle's: mapping items by raw id")
    to_bundle = remap_to_bundle(ds, bundle)
    histories = [to_bundle[h] for h in test.histories]
    targets = [to_bundle[t] for t in test.targets]
    info["unknown_items"] = int(sum((h == 0).sum() for h in histories) + sum((t == 0).sum() for t in targets))
    histories = [h[h > 0] for h in histories]
    targets = [t[t > 0] for t in targets]
    seen = None if test.seen is None else [s[s > 0] for s in (to_bundle[s] for s in test.seen)]
    return EvalSet(user_ids=test.user_ids, histories=histories, targets=targets, seen=seen), info
