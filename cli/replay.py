"""``genret replay --requests``: the same requests through two bundles offline, with the serving
code path (``models.search.retriever.Retriever``): agreement, latency, and Recall/NDCG/HR@K per bundle
when targets are given. File formats: :mod:`cli.experiments`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cli.shadow_report import mean, percentile
from service.shadow.agreement import Agreement


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
    from models.bundle.bundle import load_bundle
    from models.search.retriever import Retriever
    from training.bundle_evaluation import beam_groups

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
        # widened beam -> rows of the chunk
        groups = beam_groups(retriever, k, beam, [len(np.unique(e)) for e in excludes])
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
            "overlap": mean([g.overlap_at_k for g in agreements]),
            "jaccard": mean([g.jaccard for g in agreements]),
            "rbo": mean([g.rbo for g in agreements]),
            "batch_p50_ms": percentile([s * 1000.0 for s in run.batch_seconds], 50),
            "per_request_ms": mean(per_request_ms),
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
