"""`genret coldstart`: hold out 10% of the items, train without them, add them through the live
catalogue with content-tower vectors, and compare with models trained on them (docs/live_catalogue.md;
:mod:`training.coldstart` has the protocol)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cli.args import comma_list
from cli.compare import add_split_arguments, parse_overrides
from cli.data import add_data_arguments, dataset_from_args
from training.coldstart.run import ColdstartConfig, ColdstartResult, run_coldstart
from training.coldstart.vectors import VectorComparison, compare_vectors
from training.data import Dataset

log = logging.getLogger(__name__)

NEW_SHARE_GOAL = 0.5  # added items' Recall@20 >= 50% of full-data SASRec's on the same users
OVERALL_DROP_GOAL = 0.05  # overall Recall@20 drops by at most 5% (relative) against the full-data bundle


def goals(result: ColdstartResult) -> list[dict[str, Any]]:
    """Per method: the two ratios of the goal and whether each is met."""
    sasrec = result.sasrec_full_new["recall@20"]
    out = []
    for row in result.methods:
        new = row.scores["new_items"]["recall@20"]
        overall, full = row.scores["overall"]["recall@20"], row.full_overall["recall@20"]
        share = new / sasrec if sasrec > 0 else 0.0
        drop = 1.0 - overall / full if full > 0 else 0.0
        out.append(
            {
                "method": row.method,
                "new_vs_sasrec": share,
                "new_goal_met": share >= NEW_SHARE_GOAL,
                "overall_drop": drop,
                "overall_goal_met": drop <= OVERALL_DROP_GOAL,
            }
        )
    return out


def format_table(result: ColdstartResult) -> str:
    d, s = result.data, result.sets
    lines = [
        f"data {d['name']}: {d['items']:,} items, {d['users']:,} users; {d['split']} split, seed {d['seed']}; "
        f"{result.held_out:,} items held out (seed {d['seed']}), added back with content-tower vectors",
        f"test users {s.get('test_users', 0):,}; 'new items' users {s.get('new_item_users', 0):,} "
        f"({s.get('new_item_targets', 0):,} held-out targets); held-out history items skipped "
        f"{s.get('history_items_skipped', 0):,}, users left with no known history {s.get('users_without_known_history', 0):,}",
        f"SASRec trained with them (full data, exhaustive) on the 'new items' users: "
        f"Recall@20 {result.sasrec_full_new['recall@20']:.4f}  NDCG@20 {result.sasrec_full_new['ndcg@20']:.4f}",
        "",
        f"{'method':<8} {'beam':>5} {'new R@20':>9} {'new N@20':>9} {'vs SASRec':>9} "
        f"{'all R@20':>9} {'all N@20':>9} {'full R@20':>9} {'full N@20':>9} {'drop':>7} "
        f"{'new exact':>9} {'all exact':>9} {'added':>6} {'no attr':>7}",
    ]
    for row, goal in zip(result.methods, goals(result), strict=True):
        new, overall, full = row.scores["new_items"], row.scores["overall"], row.full_overall
        exact_new = row.scores["new_items_exhaustive"]["recall@20"]
        exact_all = row.scores["overall_exhaustive"]["recall@20"]
        lines.append(
            f"{row.method:<8} {row.beam:>5} {new['recall@20']:9.4f} {new['ndcg@20']:9.4f} "
            f"{goal['new_vs_sasrec']:8.1%}{'*' if goal['new_goal_met'] else ' '} "
            f"{overall['recall@20']:9.4f} {overall['ndcg@20']:9.4f} {full['recall@20']:9.4f} {full['ndcg@20']:9.4f} "
            f"{goal['overall_drop']:6.1%}{'*' if goal['overall_goal_met'] else ' '} "
            f"{exact_new:9.4f} {exact_all:9.4f} {row.add['added']:>6} {row.add['no_known_attributes']:>7}"
        )
    lines += [
        "",
        "new = test users with a held-out target, on those targets; all = every test user and target;",
        "full = the method's bundle trained with them; vs SASRec = new R@20 / SASRec's (goal >= 50%);",
        "drop = 1 - all / full (goal <= 5%); * = goal met; history excluded, default beam widened per user;",
        "exact = Recall@20 of exact inner product over every live item of the catalogue (no beam, same vectors)",
    ]
    return "\n".join(lines)


def result_json(result: ColdstartResult) -> str:
    payload = asdict(result) | {"goals": goals(result)}
    return json.dumps(payload, indent=2, default=str)


def run(args: argparse.Namespace) -> int:
    methods = tuple(comma_list(args.methods, str))
    if not methods:
        raise SystemExit("genret: --methods needs at least one method")
    dataset = dataset_from_args(args)
    if dataset.item_attributes is None or dataset.num_attributes == 0:
        raise SystemExit(
            f"genret coldstart: {dataset.name} has no item attributes: no content tower to place new items"
        )
    overrides = parse_overrides(args.overrides)
    if args.max_epochs is not None:
        overrides["max_epochs"] = args.max_epochs
    workdir = args.workdir or Path("runs") / "coldstart" / f"{dataset.name}-{args.split}-s{args.seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    if args.vectors:
        return run_vectors(args, dataset, workdir, overrides)
    cfg = ColdstartConfig(
        dataset=dataset,
        methods=methods,
        workdir=workdir,
        kind=args.split,
        seed=args.seed,
        max_len=args.max_len,
        share=args.share,
        overrides=overrides,
        full_bundle_dir=args.full_bundles,
    )
    result = run_coldstart(cfg)
    text = result_json(result)
    (workdir / "coldstart.json").write_text(text)
    print(text if args.json else format_table(result))
    return 0


def vectors_table(result: VectorComparison) -> str:
    d = result.data
    lines = [
        f"data {d['name']}: {d['items']:,} items; {d['split']} split, seed {d['seed']}; {result.held_out:,} items "
        f"held out ({result.no_attributes} without attributes); SASRec trained without them; exact inner "
        f"product over every item, history excluded; {result.test_users:,} test users, "
        f"{result.new_users:,} with a held-out target",
        "",
        f"{'vectors of the held-out items':<30} {'new R@20':>9} {'new N@20':>9} {'all R@20':>9} {'all N@20':>9} {'fit s':>7}",
    ]
    for source, s in result.scores.items():
        lines.append(
            f"{source:<30} {s['new_recall@20']:9.4f} {s['new_ndcg@20']:9.4f} {s['all_recall@20']:9.4f} "
            f"{s['all_ndcg@20']:9.4f} {result.seconds.get(source, 0.0):7.1f}"
        )
    return "\n".join(lines)


def run_vectors(args: argparse.Namespace, dataset: Dataset, workdir: Path, overrides: dict[str, Any]) -> int:
    result = compare_vectors(
        dataset,
        workdir,
        kind=args.split,
        seed=args.seed,
        max_len=args.max_len,
        share=args.share,
        overrides=overrides,
    )
    text = json.dumps(asdict(result), indent=2)
    (workdir / "vectors.json").write_text(text)
    print(text if args.json else vectors_table(result))
    return 0


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    parser = sub.add_parser("coldstart", help="cold-start evaluation of the live catalogue")
    add_data_arguments(parser)
    parser.add_argument("--methods", default="seater,tdr", help="comma-separated generative methods")
    parser.add_argument("--share", type=float, default=0.1, help="share of the items held out")
    add_split_arguments(parser)  # --split --seed --max-len --max-epochs --workdir --set
    parser.add_argument(
        "--full-bundles",
        type=Path,
        help="a directory with <method>/ bundles trained on the full data with the same split and seed "
        "(checked by data fingerprint), e.g. runs/frontier/beauty2; else they are trained",
    )
    parser.add_argument(
        "--vectors",
        action="store_true",
        help="compare the sources of new items' vectors instead (content tower, attribute-overlap kNN, "
        "popularity within the item's categories; training/coldstart/vectors.py): SASRec only, no bundles",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    parser.set_defaults(func=run)
