"""``genret replay`` and ``genret ab-report``: offline analysis of shadow logs and bundle pairs.

* ``genret replay --log shadow.jsonl``: agreement (overlap@K, Jaccard, RBO) and latency of the
  logged shadow runs, by variant and shadow bundle.
* ``genret replay --requests R.jsonl --bundle A --bundle B [--targets T.jsonl]``: the same
  requests through two bundles offline (``models.search.retriever.Retriever``, the serving code path):
  agreement and latency, and Recall/NDCG/HR@K per bundle when targets are given.
* ``genret ab-report --log shadow.jsonl --png out.png``: the table above plus a figure (agreement
  distributions, latency CDFs of primary and shadow).

Requests files hold one JSON object per line, the body of ``POST /v1/retrieve``
(``{"user_id": .., "history": [..], "exclude": [..], "exclude_history": false}``), or a shadow-log
record (its ``request`` is used); a ``targets`` key on a request line is used when ``--targets`` is
not given. Targets files hold ``{"targets": [..]}`` or a bare list of raw item ids per line.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cli.replay import compare_runs, load_requests, load_targets, run_bundle
from cli.shadow_report import format_table, plot_report, summarise_log
from service.shadow.log import read_records


def register(sub: Any, groups: dict[str, Any]) -> None:
    replay = sub.add_parser(
        "replay",
        help="summarise a shadow log, or compare two bundles offline on the same requests",
        description="With --log: agreement and latency of logged shadow runs by variant and shadow bundle. "
        "With --requests and two --bundle: run the requests through both bundles (the serving Retriever) and "
        "compare them; add --targets for Recall/NDCG/HR@K.",
    )
    source = replay.add_mutually_exclusive_group(required=True)
    source.add_argument("--log", type=Path, help="shadow JSONL log (GENRET_SHADOW_LOG)")
    source.add_argument("--requests", type=Path, help="requests JSONL (retrieve bodies or shadow records)")
    replay.add_argument(
        "--bundle", type=Path, action="append", default=[], help="bundle directory (twice: A, B)"
    )
    replay.add_argument("--targets", type=Path, help="targets JSONL, one line per request")
    replay.add_argument("--k", type=int, default=10, help="items per request (offline replay)")
    replay.add_argument(
        "--beam-size",
        type=int,
        default=None,
        help="beam width (offline replay; default: each bundle's own, manifest config.beam_size)",
    )
    replay.add_argument(
        "--batch-size", type=int, default=32, help="requests per retrieve call (offline replay)"
    )
    replay.add_argument("--device", default="cpu", help="cpu | cuda:0 (offline replay)")
    replay.add_argument(
        "--rotated", action="store_true", help="also read the rotated files LOG.N (oldest first)"
    )
    replay.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    replay.set_defaults(func=cmd_replay)

    report = sub.add_parser(
        "ab-report",
        help="table + figure (agreement distributions, latency CDFs) from a shadow log",
        description="Print agreement and latency by variant and shadow bundle, and write a PNG with the "
        "distributions of overlap@K, Jaccard and RBO and the latency CDFs of primary and shadow.",
    )
    report.add_argument("--log", type=Path, required=True, help="shadow JSONL log")
    report.add_argument("--png", type=Path, required=True, help="figure to write")
    report.add_argument("--rotated", action="store_true", help="also read the rotated files LOG.N")
    report.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    report.set_defaults(func=cmd_ab_report)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_nan_to_none(payload), indent=2, allow_nan=False) + "\n")


def cmd_replay(args: argparse.Namespace) -> int:
    if args.log is not None:
        if args.bundle or args.targets:
            raise SystemExit("genret replay: --bundle / --targets go with --requests, not --log")
        records = list(read_records(args.log, include_rotated=args.rotated))
        rows = [asdict(s) for s in summarise_log(records)]
        print(f"{args.log}: {len(records)} shadow records")
        print(format_table(rows))
        _write_json(args.json, {"log": str(args.log), "records": len(records), "groups": rows})
        return 0
    if len(args.bundle) != 2:
        raise SystemExit(f"genret replay --requests needs exactly two --bundle, got {len(args.bundle)}")
    if args.k < 1 or (args.beam_size is not None and args.beam_size < 1) or args.batch_size < 1:
        raise SystemExit("genret replay: --k, --beam-size and --batch-size must be >= 1")
    requests = load_requests(args.requests)
    if not requests:
        raise SystemExit(f"{args.requests}: no requests")
    targets: list[list[str]] | None = None
    if args.targets is not None:
        targets = load_targets(args.targets, len(requests))
    elif all("targets" in r for r in requests):
        targets = [[str(t) for t in r["targets"]] for r in requests]
    runs = [
        run_bundle(p, requests, args.k, args.beam_size, args.batch_size, args.device) for p in args.bundle
    ]
    rows = compare_runs(runs[0], runs[1], args.k, args.batch_size, targets)
    print(
        f"{args.requests}: {len(requests)} requests, k={args.k}, beam={args.beam_size or 'bundle default'}, batch={args.batch_size}"
    )
    print(format_table(rows))
    _write_json(args.json, {"requests": str(args.requests), "k": args.k, "bundles": rows})
    return 0


def cmd_ab_report(args: argparse.Namespace) -> int:
    records = list(read_records(args.log, include_rotated=args.rotated))
    if not records:
        raise SystemExit(f"{args.log}: no shadow records")
    rows = [asdict(s) for s in summarise_log(records)]
    print(f"{args.log}: {len(records)} shadow records")
    print(format_table(rows))
    plot_report(records, args.png)
    print(f"wrote {args.png}")
    _write_json(
        args.json, {"log": str(args.log), "records": len(records), "groups": rows, "png": str(args.png)}
    )
    return 0
