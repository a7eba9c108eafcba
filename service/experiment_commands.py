"""``genret replay`` and ``genret ab-report``: offline analysis of shadow logs and bundle pairs.

* ``genret replay --log shadow.jsonl``: agreement (overlap@K, Jaccard, RBO) and latency of the
  logged shadow runs, by variant and shadow bundle.
* ``genret replay --requests R.jsonl --bundle A --bundle B [--targets T.jsonl]``: the same
  requests through two bundles offline (``models.retriever.Retriever``, the serving code path):
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
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.shadow import Agreement, read_records

log = logging.getLogger(__name__)


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


# ---- summaries (pure) --------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else math.nan


@dataclass(frozen=True)
class GroupSummary:
    variant: str
    shadow: str
    requests: int
    errors: int
    overlap: float  # mean overlap@K
    jaccard: float
    rbo: float
    primary_p50_ms: float
    primary_p99_ms: float
    shadow_p50_ms: float
    shadow_p99_ms: float
    delta_p50_ms: float  # median over requests of (shadow - primary) latency


def summarise_log(records: Iterable[dict[str, Any]]) -> list[GroupSummary]:
    """One row per (variant, shadow bundle), sorted, then an ``(all)`` row when there are several."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(str(r.get("variant", "")), str(r["shadow"]["bundle"]))].append(r)
    rows = [_summarise(variant, shadow, rs) for (variant, shadow), rs in sorted(groups.items())]
    if len(rows) > 1:
        rows.append(_summarise("(all)", "(all)", [r for rs in groups.values() for r in rs]))
    return rows


def _summarise(variant: str, shadow: str, records: Sequence[dict[str, Any]]) -> GroupSummary:
    ok = [r for r in records if r.get("agreement") and not r["shadow"].get("error")]
    prim = [r["primary"]["latency_ms"] for r in ok if r["primary"].get("latency_ms") is not None]
    shad = [r["shadow"]["latency_ms"] for r in ok if r["shadow"].get("latency_ms") is not None]
    deltas = [
        r["shadow"]["latency_ms"] - r["primary"]["latency_ms"]
        for r in ok
        if r["shadow"].get("latency_ms") is not None and r["primary"].get("latency_ms") is not None
    ]
    return GroupSummary(
        variant=variant,
        shadow=shadow,
        requests=len(records),
        errors=len(records) - len(ok),
        overlap=_mean([r["agreement"]["overlap_at_k"] for r in ok]),
        jaccard=_mean([r["agreement"]["jaccard"] for r in ok]),
        rbo=_mean([r["agreement"]["rbo"] for r in ok]),
        primary_p50_ms=_pct(prim, 50),
        primary_p99_ms=_pct(prim, 99),
        shadow_p50_ms=_pct(shad, 50),
        shadow_p99_ms=_pct(shad, 99),
        delta_p50_ms=_pct(deltas, 50),
    )


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table; floats with 3 decimals, nan as '-'."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(
            v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    return "\n".join(lines)


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


# ---- offline replay through two bundles ---------------------------------------------------------


def read_jsonl(path: Path) -> list[Any]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON: {exc.msg}") from None
    return out


def load_requests(path: Path) -> list[dict[str, Any]]:
    """Retrieve bodies (or shadow records, whose ``request`` is taken) with a ``history`` list."""
    requests = []
    for n, line in enumerate(read_jsonl(path), 1):
        req = line.get("request", line) if isinstance(line, dict) else None
        if not isinstance(req, dict) or not isinstance(req.get("history", []), list):
            raise ValueError(f"{path}:{n}: expected an object with a 'history' list")
        requests.append(req)
    return requests


def load_targets(path: Path, expected: int) -> list[list[str]]:
    targets = []
    for n, line in enumerate(read_jsonl(path), 1):
        t = line.get("targets") if isinstance(line, dict) else line
        if not isinstance(t, list):
            raise ValueError(f"{path}:{n}: expected a list of item ids or {{'targets': [...]}}")
        targets.append([str(x) for x in t])
    if len(targets) != expected:
        raise ValueError(f"{path}: {len(targets)} target lines for {expected} requests")
    return targets


@dataclass(frozen=True)
class BundleRun:
    name: str
    version: str
    dense: np.ndarray  # [R, k] dense ids of this bundle, 0 where fewer exist
    items: list[list[str]]  # raw ids per request, padding removed
    batch_seconds: list[float]  # wall time of each retrieve call
    dense_of: dict[str, int]


def run_bundle(
    path: Path,
    requests: Sequence[dict[str, Any]],
    k: int,
    beam_size: int | None,
    batch_size: int,
    device: str,
) -> BundleRun:
    """Every request through ``Retriever.retrieve`` in batches, timed per batch. ``beam_size`` ``None``
    = the bundle's own default; each request's beam is widened for ``k`` as the service widens it."""
    from models.bundle import load_bundle
    from models.retriever import Retriever

    bundle = load_bundle(path)
    retriever = Retriever(bundle, device=device)
    raw_ids = [str(x) for x in bundle.item_ids]
    dense_of = {raw: i for i, raw in enumerate(raw_ids) if i > 0}
    beam = retriever.default_beam_size if beam_size is None else beam_size
    retriever.warmup(beam_size=min(beam, 8))
    dense = np.zeros((len(requests), k), np.int64)  # [R, k]
    seconds: list[float] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        histories = [
            np.array([dense_of[h] for h in r.get("history", []) if h in dense_of], np.int64) for r in chunk
        ]
        excludes = [
            np.array([dense_of[e] for e in r.get("exclude", []) if e in dense_of], np.int64) for r in chunk
        ]
        for i, r in enumerate(chunk):
            if r.get("exclude_history"):
                excludes[i] = np.concatenate([excludes[i], histories[i]])
        groups: dict[int, list[int]] = {}  # widened beam -> rows of the chunk
        for i, e in enumerate(excludes):
            groups.setdefault(retriever.beam_for(k, beam, len(np.unique(e))), []).append(i)
        t0 = time.perf_counter()
        for row_beam, rows in groups.items():
            result = retriever.retrieve(
                [histories[i] for i in rows], k=k, beam_size=row_beam, exclude=[excludes[i] for i in rows]
            )
            dense[[start + i for i in rows]] = result.items  # [b, k]
        seconds.append(time.perf_counter() - t0)
    items = [[raw_ids[d] for d in row if d > 0] for row in dense]
    return BundleRun(bundle.manifest.name, bundle.fingerprint[:12], dense, items, seconds, dense_of)


def compare_runs(
    a: BundleRun, b: BundleRun, k: int, batch_size: int, targets: list[list[str]] | None
) -> list[dict[str, Any]]:
    """One row per bundle: agreement with the other (same values on both rows), latency, ranking metrics."""
    agreements = [Agreement.of(x, y, k) for x, y in zip(a.items, b.items, strict=True)]
    rows = []
    for run in (a, b):
        per_request_ms = [s * 1000.0 / batch_size for s in run.batch_seconds]
        row: dict[str, Any] = {
            "bundle": run.name,
            "version": run.version,
            "requests": len(run.items),
            "overlap": _mean([g.overlap_at_k for g in agreements]),
            "jaccard": _mean([g.jaccard for g in agreements]),
            "rbo": _mean([g.rbo for g in agreements]),
            "batch_p50_ms": _pct([s * 1000.0 for s in run.batch_seconds], 50),
            "per_request_ms": _mean(per_request_ms),
        }
        if targets is not None:
            from training.metrics import evaluate_ranking

            dense_targets = [
                np.array([run.dense_of[t] for t in ts if t in run.dense_of], np.int64) for ts in targets
            ]
            ks = sorted({kk for kk in (10, 20, 50, k) if kk <= k})
            metrics = evaluate_ranking(run.dense, dense_targets, ks=ks)
            row.update({m: metrics[m] for m in (f"recall@{k}", f"ndcg@{k}", f"hr@{k}")})
        rows.append(row)
    return rows


# ---- commands -----------------------------------------------------------------------------------


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


def plot_report(records: Sequence[dict[str, Any]], png: Path) -> None:
    """Agreement histograms (overlap@K, Jaccard, RBO) and latency CDFs (primary vs shadow) per shadow bundle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_shadow: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("agreement"):
            by_shadow[str(r["shadow"]["bundle"])].append(r)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    bins = np.linspace(0.0, 1.0, 21)
    for ax, (key, title) in zip(
        axes[:3], (("overlap_at_k", "overlap@K"), ("jaccard", "Jaccard"), ("rbo", "RBO (p=0.9)")), strict=True
    ):
        for shadow, rs in sorted(by_shadow.items()):
            ax.hist([r["agreement"][key] for r in rs], bins=bins, alpha=0.6, label=shadow)
        ax.set_title(f"{title} primary vs shadow")
        ax.set_xlabel(title)
        ax.set_ylabel("requests")
    ax = axes[3]
    for shadow, rs in sorted(by_shadow.items()):
        for role, style in (("primary", "-"), ("shadow", "--")):
            lat = np.sort([r[role]["latency_ms"] for r in rs if r[role].get("latency_ms") is not None])
            if len(lat):
                ax.step(
                    lat,
                    np.arange(1, len(lat) + 1) / len(lat),
                    style,
                    where="post",
                    label=f"{role} ({shadow})",
                )
    ax.set_xscale("log")
    ax.set_title("latency CDF")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    for a in axes:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
