"""`genret eval`: a bundle's offline metrics, measured through the serving path.

The bundle is loaded and verified like the service does, and the test users of the same split
(``training.splits``) go through :class:`models.search.retriever.Retriever` on the ONNX backend. Printed:
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
from collections.abc import Sequence
from pathlib import Path

from cli.data import add_data_arguments, dataset_from_args
from models.bundle.bundle import load_bundle
from models.bundle.manifest import BundleError
from models.search.retriever import Retriever
from training.bundle_evaluation import SWEEP_BEAMS, EvalResult, bundle_eval_set, evaluate_retriever
from training.metrics import split_ks
from training.splits import SPLIT_KINDS

log = logging.getLogger(__name__)


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
        evalset = evalset.head(args.limit)
    retriever = Retriever(bundle, device=args.device, backend="onnx", intra_op_threads=args.threads)
    ks = split_ks(args.split)
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
