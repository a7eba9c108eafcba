"""`genret frontier`: Recall@20 / NDCG@20 against candidates scored per query, every method at once.

Generative methods (``uri``, ``seater``, ``tdr``) are read from exported bundles (``--bundle-dir``
holding ``<method>/`` as ``genret compare --workdir`` writes them, or ``--bundle METHOD=PATH``) or
trained on the split when none is found; each is swept over beams, reranked and decoder alone, plus
its default beam as served (starred). ``ivf`` is the split's SASRec in faiss IVF over an nprobe
sweep (``nprobe = nlist`` is SASRec exhaustive). Definitions: :mod:`training.frontier`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from cli.args import comma_list
from cli.compare import add_split_arguments, make_context
from cli.data import add_data_arguments
from models.bundle.bundle import Bundle, load_bundle
from models.search.retriever import Retriever
from training.bundle_evaluation import SWEEP_BEAMS, evaluate_retriever
from training.context import TrainContext
from training.data import dataset_stats
from training.frontier import (
    FrontierPoint,
    K,
    format_points,
    plot_frontier,
    summary_rows,
    sweep_bundle,
    sweep_ivf,
)
from training.methods.sasrec.cache import sasrec_for
from training.registry import get_method
from training.splits import EvalSet

log = logging.getLogger(__name__)

GENERATIVE = ("uri", "seater", "tdr")


def find_bundle(method: str, bundle_dir: Path | None, explicit: dict[str, Path]) -> Path | None:
    """``explicit[method]``, else ``bundle_dir/method`` (TDR: its best round by ``rounds.json``)."""
    if method in explicit:
        return explicit[method]
    if bundle_dir is None:
        return None
    root = bundle_dir / method
    if (root / "manifest.json").is_file():
        return root
    rounds = root / "rounds.json"
    if rounds.is_file():
        best = max(json.loads(rounds.read_text()), key=lambda e: e["valid_recall@20"])
        return Path(best["bundle"])
    return None


def bundle_for(method: str, ctx: TrainContext, args: argparse.Namespace, explicit: dict[str, Path]) -> Bundle:
    path = find_bundle(method, args.bundle_dir, explicit)
    if path is None:
        log.info("no %s bundle given: training one in %s", method, ctx.workdir)
        path = get_method(method)(ctx).bundle_dir
        if path is None:
            raise SystemExit(f"genret: method {method!r} exported no bundle")
    bundle = load_bundle(path)
    if bundle.manifest.dataset_fingerprint != ctx.dataset.fingerprint():
        raise SystemExit(f"genret: bundle {path} was trained on other data than {ctx.dataset.name}")
    return bundle


def default_point(name: str, retriever: Retriever, evalset: EvalSet) -> FrontierPoint:
    """The bundle's default beam, widened per user as the service widens it (what is served)."""
    t0 = time.process_time()
    result = evaluate_retriever(retriever, evalset, None, (K,), widen=True)
    ms = 1000 * (time.process_time() - t0) / max(1, result.users)
    m = result.metrics
    setting = f"beam={result.beam_size}"
    return FrontierPoint(
        name, setting, m["mean_candidates"], m[f"recall@{K}"], m[f"ndcg@{K}"], ms, default=True
    )


def run_frontier(ctx: TrainContext, args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    evalset = ctx.split.valid if args.eval_split == "valid" else ctx.split.test
    if args.limit > 0:
        evalset = evalset.head(args.limit)
    explicit = dict(_parse_bundle(item) for item in args.bundle or [])
    points: list[FrontierPoint] = []
    nlist = None
    if "ivf" in methods:
        sasrec = sasrec_for(ctx)
        t0 = time.process_time()
        users = sasrec.encode(evalset.histories)  # [U, D]
        encode_ms = 1000 * (time.process_time() - t0) / max(1, len(users))
        ivf_points, nlist = sweep_ivf(sasrec.item_embeddings(), users, evalset, encode_ms, seed=ctx.seed)
        points += ivf_points
    defaults = {}
    for method in (m for m in methods if m in GENERATIVE):
        bundle = bundle_for(method, ctx, args, explicit)
        retriever = Retriever(bundle, intra_op_threads=args.threads)
        beams = sorted({b for b in args.beams if b <= bundle.index.num_leaves})
        log.info("%s: %s, beams %s, default %d", method, bundle.path, beams, retriever.default_beam_size)
        points += sweep_bundle(method, retriever, evalset, beams)
        defaults[method] = {"bundle": str(bundle.path), "default_beam": retriever.default_beam_size}
        points.append(default_point(method, retriever, evalset))
    return {
        "dataset": dataset_stats(ctx.dataset),
        "split": {
            "kind": ctx.split.kind,
            "seed": ctx.split.seed,
            "eval": args.eval_split,
            "users": len(evalset.histories),
        },
        "k": K,
        "ivf_nlist": nlist,
        "bundles": defaults,
        "points": [p.__dict__ for p in points],
        "summary": summary_rows(points, ctx.dataset.num_items),
        "_points": points,
    }


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'default':<16} {'candidates':>10} {'share':>7} {'R@20':>7} {'IVF R@20':>9} {'SASRec R@20':>11}"
    ]
    for r in rows:
        lines.append(
            f"{r['method'] + ' ' + r['setting']:<16} {r['candidates']:>10.1f} {100 * r['catalogue_share']:>6.2f}% "
            f"{r['recall']:>7.4f} {r.get('ivf_recall_at_budget', float('nan')):>9.4f} "
            f"{r.get('sasrec_exhaustive_recall', float('nan')):>11.4f}"
        )
    return "\n".join(lines)


def _parse_bundle(item: str) -> tuple[str, Path]:
    method, sep, path = item.partition("=")
    if not sep or method not in GENERATIVE:
        raise SystemExit(f"genret: --bundle expects METHOD=PATH with METHOD in {GENERATIVE}, got {item!r}")
    return method, Path(path)


def run(args: argparse.Namespace) -> int:
    methods = list(comma_list(args.methods, str))
    unknown = set(methods) - {"ivf", *GENERATIVE}
    if not methods or unknown:
        raise SystemExit(f"genret: --methods takes ivf,uri,seater,tdr; got {args.methods!r}")
    ctx = make_context(args, "frontier")
    out = run_frontier(ctx, args, methods)
    points = out.pop("_points")
    if args.png:
        plot_frontier(
            points, Path(args.png), f"{ctx.dataset.name}: {args.eval_split} users, history excluded"
        )
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(format_points(points))
        print()
        print(format_summary(out["summary"]))
        if args.png:
            print(f"wrote {args.png}")
    return 0


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    parser = sub.add_parser(
        "frontier", help="Recall/NDCG@20 vs candidates scored: bundles' beams vs SASRec in IVF"
    )
    add_data_arguments(parser)
    parser.add_argument("--methods", default="ivf,seater,tdr", help="comma-separated: ivf,uri,seater,tdr")
    parser.add_argument(
        "--bundle-dir", type=Path, help="folder holding <method>/ bundles (a compare workdir)"
    )
    parser.add_argument(
        "--bundle", action="append", metavar="METHOD=PATH", help="a method's bundle (repeatable)"
    )
    add_split_arguments(parser)
    parser.add_argument("--eval-split", choices=("test", "valid"), default="test", help="users to measure on")
    parser.add_argument("--limit", type=int, default=0, help="only the first N users (0 = all)")
    parser.add_argument(
        "--beams", type=lambda s: [int(b) for b in s.split(",")], default=list(SWEEP_BEAMS), help="beam sweep"
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--png", help="write the frontier plot here")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
