"""`genret index-report`: Average Partition Entropy of indexes built different ways (URI paper, Table 2).

Same ``k`` and ``L`` for every row:

* ``random``  — items dealt at random into ``k^L`` equal leaves;
* ``kmeans``  — balanced hierarchical k-means on the SASRec item embeddings (``sasrec_for(ctx)``, or
  saved weights from ``--sasrec-dir``);
* ``uri``     — the URI index, read from ``--uri-bundle`` or trained here;
* ``planted`` — synthetic data only: the planted clusters as an index (the target to recover).
* ``--bundle NAME=PATH`` — any other index bundle, e.g. the control (``warm_start=all em_levels=0``:
  balanced k-means tokens under URI's decoder, the same rerank, for ``genret frontier`` at the same beam).

APE columns per level (lower is better, natural log; meaningful for balanced indexes only):

* ``train`` — the paper's definition: every training user is a query whose positives are the
  items of its sequence; ``test`` — every test user (history and targets), whom no index saw;
* ``labels`` — every item label is a query whose positives are the items carrying it. Labels are
  the planted level-1 clusters on synthetic data, and on data with item attributes (Beauty's
  ``item2attributes``) the item's category path: its two most frequent attributes in the
  catalogue, i.e. top-level category and sub-category (brand ids are rarer than both), ~100 labels.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cli.compare import add_split_arguments, make_context
from cli.data import add_data_arguments
from training.data import SyntheticDataset
from training.index_report import ape_row, category_labels, level_buckets, random_codes
from training.methods.sasrec.cache import sasrec_for
from training.methods.uri.index import eval_queries

log = logging.getLogger(__name__)


def sasrec_model(args: argparse.Namespace, ctx: Any) -> Any:
    """The SASRec of this split: ``--sasrec-dir`` (saved weights) or ``sasrec_for(ctx)`` (cache or train)."""
    if args.sasrec_dir is None:
        return sasrec_for(ctx)
    from training.methods.sasrec.model import SASRec

    model = SASRec.load(args.sasrec_dir)
    if model.num_items != ctx.dataset.num_items:
        raise SystemExit(
            f"genret: {args.sasrec_dir} has {model.num_items} items, the data {ctx.dataset.num_items}"
        )
    return model


def uri_buckets(args: argparse.Namespace, ctx: Any, bundle_dir: Path | None) -> np.ndarray:
    """``[N+1, L]`` URI buckets: from ``bundle_dir`` (checked against the data) or trained now."""
    from models.bundle.bundle import load_bundle

    if bundle_dir is None:
        from training.methods.uri.train import train_uri

        ctx.config_overrides.setdefault("uri.k", args.k)
        ctx.config_overrides.setdefault("uri.levels", args.levels)
        bundle_dir = train_uri(ctx).bundle_dir
        assert bundle_dir is not None
    bundle = load_bundle(bundle_dir)
    fingerprint = bundle.manifest.get("dataset_fingerprint")
    if fingerprint not in (None, ctx.dataset.fingerprint()):
        raise SystemExit(
            f"genret: {bundle_dir} was trained on other data (dataset fingerprint {fingerprint})"
        )
    index = bundle.index
    if index.levels != args.levels or index.max_branching > args.k:
        raise SystemExit(
            f"genret: {bundle_dir} has L={index.levels}, k={index.max_branching}; the report uses "
            f"--levels {args.levels} --k {args.k}"
        )
    return index.item_path.astype(np.int64)


def build_report(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    ctx = make_context(args, "index_report")
    ds, k, levels = ctx.dataset, args.k, args.levels
    queries = {
        "train": [s for s in ctx.split.train if len(s) > 1],
        "test": eval_queries(ctx.split.test),  # held-out users: the index never saw them
    }
    labels = category_labels(ds)
    rows = [
        ape_row("random", level_buckets(random_codes(ds.num_items, k, levels, args.seed)), queries, labels)
    ]
    if not args.no_kmeans:
        from training.clustering import balanced_tree_codes

        emb = sasrec_model(args, ctx).item_embeddings()  # [N+1, D]
        rows.append(
            ape_row(
                "kmeans", level_buckets(balanced_tree_codes(emb, k, levels, seed=args.seed)), queries, labels
            )
        )
    rows.append(ape_row("uri", uri_buckets(args, ctx, args.uri_bundle), queries, labels))
    for spec in args.bundle or []:  # e.g. the control: k-means tokens under URI's decoder
        name, _, path = spec.partition("=")
        rows.append(ape_row(name, uri_buckets(args, ctx, Path(path)), queries, labels))
    if isinstance(ds, SyntheticDataset) and ds.item_clusters.shape[1] >= 1:
        planted = level_buckets(ds.item_clusters[:, :levels])
        if planted.shape[1] == levels:
            rows.append(ape_row("planted", planted, queries, labels))
    meta = {
        "data": ds.name,
        "k": k,
        "levels": levels,
        "queries": {name: len(sets) for name, sets in queries.items()},
        "labels": int(labels.max()) + 1 if labels is not None else 0,
        "split": ctx.split.describe(),
    }
    return rows, meta


def format_report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    columns = [c for c in rows[0] if c != "index"]
    head = (
        f"APE (lower is better) on {meta['data']}, k={meta['k']}, L={meta['levels']}: train / test = "
        f"{meta['queries']['train']:,} training / {meta['queries']['test']:,} test users as queries "
        f"(test: history and targets); labels = {meta['labels']} item labels as queries"
    )
    lines = [head, "  ".join([f"{'index':<8}", *(f"{c:>10}" for c in columns)])]
    for row in rows:
        cells = [f"{row[c]:10.4f}" if isinstance(row[c], float) else f"{row[c]:>10}" for c in columns]
        lines.append("  ".join([f"{row['index']:<8}", *cells]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.k < 2 or args.levels < 1:
        raise SystemExit(f"genret: need --k >= 2 and --levels >= 1, got {args.k}, {args.levels}")
    rows, meta = build_report(args)
    print(json.dumps({"meta": meta, "rows": rows}, indent=2) if args.json else format_report(rows, meta))
    return 0


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    parser = sub.add_parser(
        "index-report", help="APE of random / k-means (SASRec) / URI indexes (URI Table 2)"
    )
    add_data_arguments(parser)
    add_split_arguments(parser)
    parser.add_argument("--k", type=int, default=32, help="index width (tokens per level)")
    parser.add_argument("--levels", type=int, default=2, help="index depth L")
    parser.add_argument(
        "--uri-bundle", type=Path, help="report the index of this URI bundle instead of training one"
    )
    parser.add_argument(
        "--bundle",
        action="append",
        metavar="NAME=PATH",
        help="another index bundle as a row NAME (repeatable), e.g. control=<a warm_start=all em_levels=0 bundle>",
    )
    parser.add_argument(
        "--sasrec-dir", type=Path, help="saved SASRec weights for the k-means row (default: sasrec_for(ctx))"
    )
    parser.add_argument(
        "--no-kmeans", action="store_true", help="skip the SASRec k-means row (no SASRec training)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
