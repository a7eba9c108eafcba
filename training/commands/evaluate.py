"""`genret eval`: a bundle's offline metrics, measured through the serving path.

The bundle is loaded and verified like the service does, and the test users of the same split
(``training.splits``) go through :class:`models.retriever.Retriever` on the ONNX backend. Printed:
Recall / NDCG / HR @ 10, 20, 50, the beam coverage (share of the targets that are among the items
of the beam's leaves, i.e. recall of the candidate set before the rerank) and the mean candidate
count (items scored per user, before history exclusion; ``--json``: ``candidates``). The beam is
the bundle's own default unless ``--beam`` gives one, widened per user as the service widens it.
``--png`` sweeps the beam size and plots Recall@K against the candidate-set size (the
URI paper's figure 4).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import Bundle, BundleError, load_bundle
from models.retriever import Retriever
from training.commands.data import add_data_arguments, dataset_from_args
from training.data import Dataset
from training.metrics import DEFAULT_KS, evaluate_ranking
from training.splits import SPLIT_KINDS, EvalSet, make_split

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
    groups: dict[int, list[int]] = {}
    for row, history in enumerate(evalset.histories):
        excluded = len(np.unique(history)) if exclude_history else 0
        groups.setdefault(retriever.beam_for(k, beam, excluded) if widen else beam, []).append(row)
    start = time.perf_counter()
    for row_beam, rows in groups.items():
        for lo in range(0, len(rows), batch_size):
            idx = rows[lo : lo + batch_size]
            histories = [evalset.histories[i] for i in idx]
            result = retriever.retrieve(histories, k=k, beam_size=row_beam, exclude_history=exclude_history)
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
    return EvalSet(user_ids=test.user_ids, histories=histories, targets=targets), info


def plot_recall_vs_candidates(results: list[EvalResult], ks: Sequence[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.metrics["mean_candidates"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in ks:
        ax.plot(x, [r.metrics[f"recall@{k}"] for r in results], marker="o", label=f"Recall@{k}")
    ax.plot(x, [r.metrics["beam_coverage"] for r in results], "k--", marker=".", label="beam coverage")
    for r, xi in zip(results, x, strict=True):
        ax.annotate(f"b={r.beam_size}", (xi, r.metrics[f"recall@{max(ks)}"]), fontsize=7, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("candidate-set size (items in the beam's leaves, mean per user)")
    ax.set_ylabel("recall")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_report(name: str, result: EvalResult, ks: Sequence[int]) -> str:
    m = result.metrics
    lines = [f"bundle {name}: {result.users} test users, beam {result.beam_size}, {result.seconds:.1f} s"]
    lines.append(f"{'k':>4} {'Recall':>8} {'NDCG':>8} {'HR':>8}")
    for k in ks:
        lines.append(f"{k:>4} {m[f'recall@{k}']:>8.4f} {m[f'ndcg@{k}']:>8.4f} {m[f'hr@{k}']:>8.4f}")
    lines.append(f"beam coverage {m['beam_coverage']:.4f}   mean candidates {m['mean_candidates']:.1f}")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        raise SystemExit(f"genret: {exc}") from exc
    ds = dataset_from_args(args)
    evalset, info = bundle_eval_set(ds, bundle, args.split, args.seed)
    if args.limit > 0:
        evalset = EvalSet(
            evalset.user_ids[: args.limit], evalset.histories[: args.limit], evalset.targets[: args.limit]
        )
    retriever = Retriever(bundle, device=args.device, backend="onnx", intra_op_threads=args.threads)
    ks = DEFAULT_KS
    exclude = not args.keep_history
    result = evaluate_retriever(retriever, evalset, args.beam, ks, exclude_history=exclude)
    sweep: list[EvalResult] = []
    if args.png:
        beams = sorted({b for b in SWEEP_BEAMS if b <= bundle.index.num_leaves} | {result.beam_size})
        sweep = [
            result
            if b == result.beam_size
            else evaluate_retriever(retriever, evalset, b, ks, exclude_history=exclude)
            for b in beams
        ]
        title = f"{bundle.manifest.name} ({bundle.manifest.method}) on {ds.name}"
        plot_recall_vs_candidates(sweep, ks, Path(args.png), title)
    if args.json:
        out = {
            "bundle": str(bundle.path),
            "name": bundle.manifest.name,
            "fingerprint": bundle.fingerprint,
            "dataset": ds.name,
            "split": args.split,
            "seed": args.seed,
            "users": result.users,
            "backend": retriever.device_info,
            **info,
            "beam_size": result.beam_size,
            "candidates": result.metrics["mean_candidates"],
            "metrics": result.metrics,
            "seconds": result.seconds,
            "sweep": [{"beam_size": r.beam_size, **r.metrics} for r in sweep],
        }
        print(json.dumps(out, indent=2))
    else:
        print(format_report(bundle.manifest.name, result, ks))
        print(f"backend: {retriever.device_info}")
        if not info["same_dataset"]:
            print(
                f"note: dataset differs from the bundle's; {info['unknown_items']} unknown item occurrences dropped"
            )
        for r in sweep:
            m = r.metrics
            print(
                f"  beam {r.beam_size:>4}: candidates {m['mean_candidates']:>8.1f}  coverage {m['beam_coverage']:.4f}  "
                + "  ".join(f"R@{k} {m[f'recall@{k}']:.4f}" for k in ks)
            )
        if args.png:
            print(f"wrote {args.png}")
    return 0


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    parser = sub.add_parser("eval", help="evaluate a bundle on the test users of a split (ONNX serving path)")
    parser.add_argument("--bundle", required=True, help="bundle directory")
    add_data_arguments(parser)
    parser.add_argument("--split", choices=SPLIT_KINDS, default="user", help="split protocol (default: user)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    parser.add_argument(
        "--beam",
        type=int,
        default=None,
        help="beam size (default: the bundle's own, manifest config.beam_size)",
    )
    parser.add_argument("--png", help="also sweep the beam size and plot Recall@K vs candidate-set size here")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N test users (0 = all)")
    parser.add_argument(
        "--keep-history", action="store_true", help="do not exclude history items from results"
    )
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:i]' (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.set_defaults(func=run_eval)
