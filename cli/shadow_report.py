"""Summaries of a shadow log for ``genret replay --log`` and ``genret ab-report``: one row per
(variant, shadow bundle) with agreement and latency, a fixed-width table, and the figure
(agreement distributions, latency CDFs of primary and shadow)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


def percentile(xs: Sequence[float], q: float) -> float:
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
        overlap=mean([r["agreement"]["overlap_at_k"] for r in ok]),
        jaccard=mean([r["agreement"]["jaccard"] for r in ok]),
        rbo=mean([r["agreement"]["rbo"] for r in ok]),
        primary_p50_ms=percentile(prim, 50),
        primary_p99_ms=percentile(prim, 99),
        shadow_p50_ms=percentile(shad, 50),
        shadow_p99_ms=percentile(shad, 99),
        delta_p50_ms=percentile(deltas, 50),
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
