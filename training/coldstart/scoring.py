"""Scoring a cold-start run: the full data's test users on a catalogue (new items and overall),
exhaustive references, the SASRec trained on the full data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.catalogue.catalogue import Catalogue
from models.search.retriever import Retriever
from training.coldstart.holdout import Holdout
from training.data import Dataset
from training.metrics import evaluate_ranking
from training.splits import EvalSet

K = 20  # Recall / NDCG / HR at K
REPORT_KS: tuple[int, ...] = (K,)
BATCH = 256  # users per retrieval


@dataclass(frozen=True)
class ColdEvalSets:
    """The full data's test users in a catalogue's dense ids (see the module docstring)."""

    overall: EvalSet  # histories: ids the encoder knows; targets: catalogue ids (misses: ids never served)
    new: EvalSet  # the users with a held-out target, those targets only
    exclude: list[np.ndarray]  # per overall user: held-out history items (catalogue ids), excluded too
    new_rows: np.ndarray  # [U_new] row of each "new items" user in ``overall``
    stats: dict[str, int] = field(default_factory=dict)


def catalogue_ids(full: Dataset, catalogue: Catalogue) -> np.ndarray:
    """``[N+1]`` full dense id -> catalogue dense id; an item not in the catalogue gets an id past
    its last row (never returned, so a target on it is a miss); 0 stays 0."""
    out = np.asarray([0] + [catalogue.dense_of.get(raw, -1) for raw in full.vocab.raw_ids[1:]], np.int64)
    out[out < 0] = catalogue.num_rows + np.arange((out < 0).sum())
    return out


def cold_eval_sets(
    test: EvalSet, full: Dataset, holdout: Holdout, catalogue: Catalogue, encoder_items: int
) -> ColdEvalSets:
    """``test`` (full-data ids) mapped onto ``catalogue``; items past ``encoder_items`` leave the
    histories (skipped, counted) and join the exclusions."""
    to_cat = catalogue_ids(full, catalogue)
    histories, targets, exclude = [], [], []
    new_rows, new_targets = [], []
    skipped = empty = 0
    for row, (history, target) in enumerate(zip(test.histories, test.targets, strict=True)):
        mapped = to_cat[history]
        known = mapped <= encoder_items
        skipped += int((~known).sum())
        empty += int(not known.any())
        histories.append(mapped[known])
        exclude.append(mapped[~known])
        targets.append(to_cat[target])
        held = target[holdout.is_held(target)]
        if len(held):
            new_rows.append(row)
            new_targets.append(to_cat[held])
    rows = np.asarray(new_rows, np.int64)
    new = EvalSet([test.user_ids[r] for r in new_rows], [histories[r] for r in new_rows], new_targets)
    stats = {"test_users": len(test), "new_item_users": len(new_rows), "history_items_skipped": skipped}
    stats |= {"new_item_targets": int(sum(len(t) for t in new_targets)), "users_without_known_history": empty}
    return ColdEvalSets(EvalSet(list(test.user_ids), histories, targets), new, exclude, rows, stats)


def ranked_top_k(
    retriever: Retriever,
    histories: Sequence[np.ndarray],
    exclude: Sequence[np.ndarray] | None = None,
    k: int = K,
) -> np.ndarray:
    """``[U, k]`` served top-k at the bundle's default beam widened per user as the service widens
    it, history (and ``exclude``) excluded; a user with an empty history gets nothing (a miss)."""
    n = len(histories)
    extra = list(exclude) if exclude is not None else [np.zeros(0, np.int64)] * n
    ranked = np.zeros((n, k), np.int64)
    groups: dict[int, list[int]] = {}
    for row, history in enumerate(histories):
        if len(history) == 0:
            continue
        excluded = len(np.unique(np.concatenate([history, extra[row]])))
        groups.setdefault(retriever.beam_for(k, None, excluded), []).append(row)
    for beam, rows in groups.items():
        for lo in range(0, len(rows), BATCH):
            idx = rows[lo : lo + BATCH]
            batch = [histories[i] for i in idx]
            ranked[idx] = retriever.retrieve(
                batch, k, beam, [extra[i] for i in idx], exclude_history=True
            ).items
    return ranked


def catalogue_eval(retriever: Retriever, sets: ColdEvalSets) -> dict[str, dict[str, float]]:
    """Recall / NDCG / HR@20 on "new items" and "overall": served (one retrieval per test user), and
    ``*_exhaustive``: exact inner product over every live item (no beam), which separates what the
    beam and placement lose from what the added items' vectors lose."""
    ranked = ranked_top_k(retriever, sets.overall.histories, sets.exclude)
    exact = exhaustive_top_k(retriever, sets.overall.histories, sets.exclude)
    out = {}
    for name, top in (("", ranked), ("_exhaustive", exact)):
        out[f"new_items{name}"] = _scores(top[sets.new_rows], sets.new.targets)
        out[f"overall{name}"] = _scores(top, sets.overall.targets)
    return out


def exhaustive_top_k(
    retriever: Retriever, histories: Sequence[np.ndarray], exclude: Sequence[np.ndarray], k: int = K
) -> np.ndarray:
    """``[U, k]`` top-k of ``query · item_emb`` over the retriever's live items, history and
    ``exclude`` excluded; an empty history gets nothing."""
    live = torch.as_tensor(retriever.lookup.live)  # [N+1]
    ranked = np.zeros((len(histories), k), np.int64)
    rows = [r for r, h in enumerate(histories) if len(h)]
    for lo in range(0, len(rows), BATCH):
        idx = rows[lo : lo + BATCH]
        query = retriever.encode([histories[i] for i in idx]).query.float()  # [B, Dr]
        scores = query @ retriever.item_emb.float().T  # [B, N+1]
        scores[:, ~live] = -torch.inf
        for j, i in enumerate(idx):
            gone = np.concatenate([histories[i], exclude[i]]).astype(np.int64)
            scores[j, torch.from_numpy(gone)] = -torch.inf
        ranked[idx] = scores.topk(k, dim=1).indices.numpy()
    return ranked


def _scores(ranked: np.ndarray, targets: Sequence[np.ndarray]) -> dict[str, float]:
    return evaluate_ranking(ranked, targets, REPORT_KS)  # 0.0 where no row has a target


def bundle_overall(retriever: Retriever, full: Dataset, test: EvalSet) -> dict[str, float]:
    """A full-data bundle's overall figures on the full data's test users (its own ids)."""
    ids = {raw: i for i, raw in enumerate(retriever.bundle.item_ids.tolist()) if i > 0}
    to_bundle = np.asarray([0] + [ids.get(raw, 0) for raw in full.vocab.raw_ids[1:]], np.int64)
    if (to_bundle[1:] == 0).any():
        raise ValueError("the full-data bundle lacks items of the data set: not trained on it")
    ranked = ranked_top_k(retriever, [to_bundle[h] for h in test.histories])
    return _scores(ranked, [to_bundle[t] for t in test.targets])


def sasrec_new_items(sasrec: Any, test: EvalSet, holdout: Holdout) -> dict[str, float]:
    """SASRec trained with the held-out items, exhaustive, on the "new items" users and targets
    (full histories, history excluded)."""
    rows = [r for r, t in enumerate(test.targets) if holdout.is_held(t).any()]
    histories = [test.histories[r] for r in rows]
    ranked = sasrec.recommend(histories, K, histories) if rows else np.zeros((0, K), np.int64)
    return _scores(ranked, [t[holdout.is_held(t)] for t in (test.targets[r] for r in rows)])
