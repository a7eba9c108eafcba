"""`genret train`: train one method, copy its bundle to ``--out`` and print its test metrics.

Under ``torchrun --nproc_per_node N -m cli train ...`` a method of
:data:`DATA_PARALLEL_METHODS` trains on every rank with DDP (:mod:`training.distributed`); rank 0
then evaluates, writes ``--out`` and prints, the other ranks exit 0. Any other method is trained by
rank 0 alone as in a single process (its other ranks exit at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from cli.compare import add_split_arguments, make_context
from cli.data import add_data_arguments
from training import distributed
from training.comparison import train_and_evaluate
from training.distributed import DistContext
from training.export.writer import record_metrics
from training.metrics import split_ks
from training.registry import DATA_PARALLEL_METHODS, get_method

log = logging.getLogger(__name__)


def _copy_bundle(bundle_dir: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise SystemExit(f"genret: {out} exists; pass --force to replace it")
        shutil.rmtree(out)
    shutil.copytree(bundle_dir, out)


def run(args: argparse.Namespace) -> int:
    if args.out is not None and args.out.exists() and not args.force:
        raise SystemExit(f"genret: {args.out} exists; pass --force to replace it")
    args.overrides = list(args.overrides or []) + tdr_flag_overrides(args)
    dist = DistContext.from_env()
    if dist.is_distributed and args.method not in DATA_PARALLEL_METHODS:
        if not dist.is_main:
            return 0
        log.warning(
            "method %r does not train data-parallel (only %s do): rank 0 of %d trains it alone",
            args.method,
            ", ".join(sorted(DATA_PARALLEL_METHODS)),
            dist.world_size,
        )
        dist = distributed.SINGLE
    with distributed.activate(dist):
        if not dist.is_main:  # train with the others; rank 0 evaluates and writes
            get_method(args.method)(make_context(args, f"train/{args.method}"))
            return 0
        return _train_and_report(args)


def tdr_flag_overrides(args: argparse.Namespace) -> list[str]:
    """``--sampler`` / ``--rectify`` as the ``--set`` overrides they stand for (TDR's config keys)."""
    extra = [f"sampler={args.sampler}"] if args.sampler else []
    return extra + (["rectify=true"] if args.rectify else [])


def _train_and_report(args: argparse.Namespace) -> int:
    ctx = make_context(args, f"train/{args.method}")
    trained, result = train_and_evaluate(ctx, args.method)
    saved: Path | None = None
    if args.out is not None:
        if trained.bundle_dir is not None:
            _copy_bundle(trained.bundle_dir, args.out, args.force)
            record_metrics(args.out, result.metrics)
            saved = args.out
        elif hasattr(trained.recommender, "save"):  # SASRec: its weights, not a serving bundle
            if args.out.exists():
                shutil.rmtree(args.out)
            trained.recommender.save(args.out)
            saved = args.out
        else:
            print(f"note: method {args.method!r} has no bundle or weights to write; --out ignored")
    if args.json:
        payload = {
            "method": args.method,
            "metrics": result.metrics,
            "train_seconds": result.train_seconds,
            "eval_seconds": result.eval_seconds,
            "info": result.info,
            "out": str(saved) if saved else None,
        }
        print(json.dumps(payload, indent=2, default=str))
        return 0
    print(
        f"method {args.method}: trained in {result.train_seconds:.1f}s, evaluated in {result.eval_seconds:.1f}s"
    )
    for key, value in result.info.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    print(
        f"test ({ctx.split.kind} split, seed {ctx.split.seed}, {len(ctx.split.test):,} users, history excluded):"
    )
    for k in split_ks(ctx.split.kind):
        m = result.metrics
        print(f"  @{k:<3} recall {m[f'recall@{k}']:.4f}  ndcg {m[f'ndcg@{k}']:.4f}  hr {m[f'hr@{k}']:.4f}")
    if saved is not None:
        print(f"written to {saved}")
    return 0


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    parser = sub.add_parser("train", help="train one method and write its bundle")
    parser.add_argument("--method", required=True, help="popular, sasrec, uri, seater, tdr")
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, help="where to copy the bundle (SASRec: its weights)")
    parser.add_argument("--force", action="store_true", help="replace --out when it exists")
    add_split_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--sampler", choices=["uniform", "topdown"], help="TDR: same as --set sampler=...")
    parser.add_argument("--rectify", action="store_true", help="TDR: rectified labels (--set rectify=true)")
    parser.set_defaults(func=run)
