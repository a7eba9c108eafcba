"""Cold-start evaluation of the live catalogue (``genret coldstart``, docs/live_catalogue.md).

1. :func:`hold_out_items`: a share of the items (uniformly at random, ``seed``) and the data set
   without them; :func:`reduced_split`: the full data's split (same users in each part, same
   history / target cut) with the held-out items removed from everything the trainers see.
2. Each method trains on the reduced split (its SASRec base too) and exports its bundle, whose
   content tower is fitted on the reduced data's items only.
3. :func:`add_held_out` adds the held-out items to the bundle's catalogue through the live path
   (``Catalogue.apply``) with vectors from the content tower only (``vector=None``); an item none of
   whose attributes the tower knows cannot be added (counted; its targets stay misses).
4. :func:`catalogue_eval` scores the full data's test users on that catalogue at the bundle's
   default beam (widened per user as served), history excluded: held-out items in a history are
   not given to the encoder (it never saw them: skipped and counted) but are still excluded.
   "new items": the test users with a held-out item among their targets, scored on those targets
   only; "overall": every test user, every target.

References (:mod:`cli.coldstart`): SASRec on the full data, exhaustive, on the "new items" users
and targets; the method's full-data bundle, overall."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle.bundle import Bundle, load_bundle
from models.catalogue.catalogue import ApplyReport, Catalogue, Delta, NewItem
from models.search.retriever import Retriever
from training.data import Dataset, ItemVocab
from training.methods.sasrec.cache import sasrec_for
from training.metrics import evaluate_ranking
from training.registry import TrainContext, get_method
from training.splits import EvalSet, Split, make_split

log = logging.getLogger(__name__)

K = 20  # Recall / NDCG / HR at K
REPORT_KS: tuple[int, ...] = (K,)
BATCH = 256  # users per retrieval


@dataclass(frozen=True)
class Holdout:
    """Held-out items and the reduced data set without them."""

    items: np.ndarray  # [H] full-data dense ids held out, ascending
    dataset: Dataset  # the reduced data set (dense ids renumbered 1..N-H)
    to_reduced: np.ndarray  # [N+1] full dense id -> reduced dense id (0: held out or padding)
    share: float
    seed: int

    def is_held(self, full_ids: np.ndarray) -> np.ndarray:
        """``[n]`` bool: which of ``full_ids`` (dense ids >= 1) are held out."""
        return self.to_reduced[np.asarray(full_ids, np.int64)] == 0

    def raw_ids(self, full: Dataset) -> list[str]:
        return [full.vocab.raw_ids[int(i)] for i in self.items]


def hold_out_items(ds: Dataset, share: float = 0.1, seed: int = 0) -> Holdout:
    """``round(share * N)`` items drawn uniformly at random (``seed``) and the data set without them."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    n = ds.num_items
    count = min(n - 1, max(1, round(share * n)))
    held = np.sort(np.random.default_rng(seed).choice(np.arange(1, n + 1), size=count, replace=False))
    kept = np.setdiff1d(np.arange(1, n + 1), held)  # [N-H] full dense ids kept, ascending
    to_reduced = np.zeros(n + 1, np.int64)
    to_reduced[kept] = np.arange(1, len(kept) + 1)
    attrs = ds.item_attributes
    attributes = None if attrs is None else [attrs[0], *(attrs[int(i)] for i in kept)]
    reduced = Dataset(
        name=f"{ds.name}-holdout{share:g}-s{seed}",
        user_ids=list(ds.user_ids),
        sequences=[_mapped(s, to_reduced) for s in ds.sequences],
        vocab=ItemVocab(["", *(ds.vocab.raw_ids[int(i)] for i in kept)]),
        item_attributes=attributes,
        num_attributes=ds.num_attributes,
        attribute_vocab=ds.attribute_vocab,
    )
    return Holdout(items=held, dataset=reduced, to_reduced=to_reduced, share=share, seed=seed)


def _mapped(ids: np.ndarray, to_reduced: np.ndarray) -> np.ndarray:
    out = to_reduced[np.asarray(ids, np.int64)]
    return out[out > 0]


def reduced_split(full: Split, holdout: Holdout) -> Split:
    """``full`` with the held-out items removed (users keep their part; an evaluation user left with
    an empty history or no target is dropped from that part). Its ``kind`` names the hold-out, so
    that a SASRec cached for it is never taken for the plain split's."""
    parts = []
    for evalset in (full.valid, full.test):
        ids, histories, targets = [], [], []
        for user, history, target in zip(evalset.user_ids, evalset.histories, evalset.targets, strict=True):
            h, t = _mapped(history, holdout.to_reduced), _mapped(target, holdout.to_reduced)
            if len(h) and len(t):
                ids.append(user)
                histories.append(h)
                targets.append(t)
        parts.append(EvalSet(ids, histories, targets))
    return Split(
        kind=f"{full.kind}-holdout{holdout.share:g}-s{holdout.seed}",
        seed=full.seed,
        max_len=full.max_len,
        train=[_mapped(s, holdout.to_reduced) for s in full.train],
        valid=parts[0],
        test=parts[1],
        num_items=holdout.dataset.num_items,
    )


@dataclass(frozen=True)
class Added:
    """The catalogue with the held-out items added, and what the add did."""

    catalogue: Catalogue
    report: ApplyReport | None
    added: int
    no_known_attributes: int  # held-out items the content tower cannot place (not added)
    seconds: float

    def summary(self) -> dict[str, Any]:
        r = self.report
        counts = (r.new_leaves, r.joined_copies, r.over_capacity) if r else (0, 0, 0)
        out = {"added": self.added, "no_known_attributes": self.no_known_attributes, "seconds": self.seconds}
        return out | dict(zip(("new_leaves", "joined_copies", "over_capacity"), counts, strict=True))


def add_held_out(bundle: Bundle, full: Dataset, holdout: Holdout) -> Added:
    """Add the held-out items to ``bundle``'s catalogue through the live path, vectors from the
    content tower only."""
    content = bundle.content
    if content is None or full.item_attributes is None:
        raise ValueError("cold start needs item attributes and a bundle with a content tower (content.npz)")
    names = full.attribute_names()
    items = []
    for dense in holdout.items.tolist():
        attrs = tuple(names[int(a)] for a in full.item_attributes[dense])
        if content.has_known(attrs):
            items.append(NewItem(id=full.vocab.raw_ids[dense], vector=None, attributes=attrs))
    start = time.perf_counter()
    catalogue, report = Catalogue.from_bundle(bundle), None
    if items:
        catalogue, report = catalogue.apply(Delta(add=tuple(items)), content=content)
    seconds = time.perf_counter() - start
    return Added(catalogue, report, len(items), len(holdout.items) - len(items), seconds)


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


@dataclass(frozen=True)
class ColdstartConfig:
    dataset: Dataset
    methods: tuple[str, ...]
    workdir: Path
    kind: str = "user"
    seed: int = 0
    max_len: int = 50
    share: float = 0.1
    overrides: dict[str, Any] = field(default_factory=dict)
    full_bundle_dir: Path | None = None  # <dir>/<method>: full-data bundles to reuse (same data set)


@dataclass
class MethodCold:
    method: str
    beam: int  # the bundle's default beam (widened per user)
    scores: dict[str, dict[str, float]]  # "new_items", "overall" on the catalogue with the items added
    full_overall: dict[str, float]  # the bundle trained on the full data, overall
    add: dict[str, Any]
    bundles: dict[str, str]  # "reduced", "full"
    train_seconds: float  # reduced bundle (0: reused)


@dataclass
class ColdstartResult:
    data: dict[str, Any]
    held_out: int
    sets: dict[str, int]
    sasrec_full_new: dict[str, float]
    methods: list[MethodCold]


def run_coldstart(cfg: ColdstartConfig) -> ColdstartResult:
    """Every step of the module docstring, for each method of ``cfg``."""
    full = cfg.dataset
    holdout = hold_out_items(full, cfg.share, cfg.seed)
    full_split = make_split(full, kind=cfg.kind, seed=cfg.seed, max_len=cfg.max_len)
    split = reduced_split(full_split, holdout)
    reduced = TrainContext(holdout.dataset, split, cfg.seed, cfg.workdir / "reduced", dict(cfg.overrides))
    full_ctx = TrainContext(full, full_split, cfg.seed, cfg.workdir / "full", dict(cfg.overrides))
    log.info("cold start: %d of %d items held out; %s", len(holdout.items), full.num_items, split.describe())
    rows, sets_stats = [], {}
    for method in cfg.methods:
        start = time.perf_counter()
        reduced_dir = trained_bundle(reduced, method, cfg.workdir / "bundles" / "reduced")
        train_seconds = time.perf_counter() - start
        bundle = load_bundle(reduced_dir)
        added = add_held_out(bundle, full, holdout)
        retriever = Retriever(bundle, "cpu", "onnx", intra_op_threads=1)
        sets = cold_eval_sets(full_split.test, full, holdout, added.catalogue, retriever.encoder_items)
        sets_stats = sets.stats
        scores = catalogue_eval(retriever.with_catalogue(added.catalogue), sets)
        full_dir = _reusable(cfg.full_bundle_dir, method, full) or trained_bundle(
            full_ctx, method, cfg.workdir / "bundles" / "full"
        )
        full_retriever = Retriever(load_bundle(full_dir), "cpu", "onnx", intra_op_threads=1)
        rows.append(
            MethodCold(
                method=method,
                beam=retriever.default_beam_size,
                scores=scores,
                full_overall=bundle_overall(full_retriever, full, full_split.test),
                add=added.summary(),
                bundles={"reduced": str(reduced_dir), "full": str(full_dir)},
                train_seconds=train_seconds,
            )
        )
        log.info("%s: %s", method, rows[-1])
    data = {"name": full.name, "items": full.num_items, "users": full.num_users, "split": cfg.kind}
    return ColdstartResult(
        data=data | {"seed": cfg.seed},
        held_out=len(holdout.items),
        sets=sets_stats,
        sasrec_full_new=sasrec_new_items(sasrec_for(full_ctx), full_split.test, holdout),
        methods=rows,
    )


def trained_bundle(ctx: TrainContext, method: str, store: Path) -> Path:
    """``store/<method>``: a bundle of ``method`` trained in ``ctx`` (reused when one for the same
    data set is already there, so an interrupted run resumes)."""
    out = store / method
    if _same_data(out, ctx.dataset):
        log.info("%s: reusing %s", method, out)
        return out
    trained = get_method(method)(ctx)
    if trained.bundle_dir is None:
        raise ValueError(f"method {method!r} writes no bundle: cold start needs a generative method")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(trained.bundle_dir, out)
    return out


def _reusable(directory: Path | None, method: str, ds: Dataset) -> Path | None:
    """``directory/<method>`` when it is a bundle of ``ds`` (TDR's rounds layout: its best round)."""
    if directory is None:
        return None
    path, rounds = directory / method, directory / method / "rounds.json"
    if rounds.is_file():
        best = max(json.loads(rounds.read_text()), key=lambda r: r["valid_recall@20"])
        path = path / Path(best["bundle"]).name
    if _same_data(path, ds):
        return path
    log.warning("%s: not a bundle of this data set; training the full-data bundle", path)
    return None


def _same_data(bundle_dir: Path, ds: Dataset) -> bool:
    m = bundle_dir / "manifest.json"
    return m.is_file() and json.loads(m.read_text()).get("dataset_fingerprint") == ds.fingerprint()
