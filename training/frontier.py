"""Recall / NDCG against candidates scored per query: generative bundles over a beam sweep (reranked
and decoder alone) and SASRec vectors in faiss IVF over an nprobe sweep (``genret frontier``).

Definitions: *candidates* = mean items scored per user, counted before history
exclusion (a bundle: the items of the beam's leaves; IVF: the items of the probed cells);
*decoder alone* = items ranked by the path score of their leaf, ties inside a leaf (URI's buckets)
by popularity; *reranked* = what the service answers (the leaves' items by ``query · item_emb``).
Both come from one beam search per batch and beam, through the same :class:`Retriever` the
evaluation and the service use. CPU ms per query = process CPU time (encode + search + rank) per user.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.search.retriever import EncoderStates, Retriever
from training.ivf import IvfIndex, interpolate_at, nprobe_sweep
from training.metrics import evaluate_ranking
from training.splits import EvalSet

K = 20


@dataclass(frozen=True)
class FrontierPoint:
    method: str  # e.g. "seater", "seater/decoder", "ivf"
    setting: str  # "beam=16", "nprobe=8"
    candidates: float  # mean items scored per user (before history exclusion)
    recall: float  # Recall@20
    ndcg: float  # NDCG@20
    cpu_ms: float  # process CPU ms per user
    default: bool = False  # the bundle's default beam, widened as served


def decoder_rank(
    retriever: Retriever, leaves: np.ndarray, exclude: Sequence[np.ndarray], k: int
) -> np.ndarray:
    """``leaves [B,b]`` in beam order (best path score first, -1 pad) -> ``[B,k]`` items ranked by
    their leaf's path score, ties inside a leaf by popularity (descending), minus ``exclude``."""
    index, popularity = retriever.bundle.index, retriever.bundle.popularity
    out = np.zeros((len(leaves), k), np.int64)
    for row, (row_leaves, excl) in enumerate(zip(leaves, exclude, strict=True)):
        ranked: list[np.ndarray] = []
        for leaf in row_leaves[row_leaves >= 0] - retriever.leaf_start:
            items = index.items_of_leaf(int(leaf))
            ranked.append(items[np.argsort(-popularity[items], kind="stable")])
        flat = np.concatenate(ranked) if ranked else np.zeros(0, np.int64)
        flat = flat[~np.isin(flat, excl)][:k]
        out[row, : len(flat)] = flat
    return out


def _encode_all(
    retriever: Retriever, histories: list[np.ndarray], batch_size: int
) -> list[tuple[int, EncoderStates, float]]:
    """Encoder states per batch (encoded once, reused by every beam) and the CPU seconds it took."""
    out = []
    for lo in range(0, len(histories), batch_size):
        t0 = time.process_time()
        states = retriever.encode(histories[lo : lo + batch_size])
        out.append((lo, states, time.process_time() - t0))
    return out


def sweep_bundle(
    name: str, retriever: Retriever, evalset: EvalSet, beams: Sequence[int], *, batch_size: int = 256
) -> list[FrontierPoint]:
    """Reranked and decoder-alone points of ``retriever`` at each beam (history excluded)."""
    histories, excluded, n = evalset.histories, evalset.excluded(), len(evalset.histories)
    batches = _encode_all(retriever, histories, batch_size)
    encode_cpu = sum(c for _, _, c in batches)
    points = []
    for beam in beams:
        reranked, decoded = np.zeros((n, K), np.int64), np.zeros((n, K), np.int64)
        scored = np.zeros(n)
        search_cpu = rerank_cpu = decode_cpu = 0.0
        for lo, states, _ in batches:
            rows = slice(lo, lo + states.batch_size)
            exclude = [np.asarray(e, np.int64) for e in excluded[rows]]
            t0 = time.process_time()
            result = retriever.beam(states, beam)
            t1 = time.process_time()
            answer = retriever.rerank(result, states.query.float(), K, exclude)
            t2 = time.process_time()
            decoded[rows] = decoder_rank(retriever, answer.leaves, exclude, K)
            t3 = time.process_time()
            search_cpu, rerank_cpu, decode_cpu = (
                search_cpu + t1 - t0,
                rerank_cpu + t2 - t1,
                decode_cpu + t3 - t2,
            )
            reranked[rows], scored[rows] = answer.items, answer.num_scored
        cands = float(scored.mean())
        for label, ranked, cpu in ((name, reranked, rerank_cpu), (f"{name}/decoder", decoded, decode_cpu)):
            m = evaluate_ranking(ranked, evalset.targets, (K,))
            ms = 1000 * (encode_cpu + search_cpu + cpu) / max(1, n)
            points.append(FrontierPoint(label, f"beam={beam}", cands, m[f"recall@{K}"], m[f"ndcg@{K}"], ms))
    return points


def sweep_ivf(
    item_emb: np.ndarray, user_vectors: np.ndarray, evalset: EvalSet, encode_cpu_ms: float, *, seed: int = 0
) -> tuple[list[FrontierPoint], int]:
    """IVF points over the nprobe sweep (exact rerank of the probed items), and nlist."""
    index = IvfIndex(item_emb, seed=seed)
    points = []
    for nprobe in nprobe_sweep(index.nlist):
        t0 = time.process_time()
        result = index.search(user_vectors, K, nprobe, evalset.excluded())
        cpu = time.process_time() - t0
        m = evaluate_ranking(result.items, evalset.targets, (K,))
        ms = encode_cpu_ms + 1000 * cpu / max(1, len(user_vectors))
        cands = float(result.num_scored.mean())
        points.append(FrontierPoint("ivf", f"nprobe={nprobe}", cands, m[f"recall@{K}"], m[f"ndcg@{K}"], ms))
    return points, index.nlist


def ivf_at(points: Sequence[FrontierPoint], budget: float, metric: str = "recall") -> float:
    """The IVF figure at ``budget`` candidates (linear in log(candidates) between nprobe points)."""
    ivf = [p for p in points if p.method == "ivf"]
    return interpolate_at([p.candidates for p in ivf], [getattr(p, metric) for p in ivf], budget)


def summary_rows(points: Sequence[FrontierPoint], num_items: int) -> list[dict[str, Any]]:
    """Per default point: candidates (and share of the catalogue), its figures, IVF at that budget,
    and SASRec exhaustive (IVF with every cell probed)."""
    ivf = [p for p in points if p.method == "ivf"]
    exhaustive = max(ivf, key=lambda p: p.candidates) if ivf else None
    rows = []
    for p in points:
        if not p.default:
            continue
        row: dict[str, Any] = {**asdict(p), "catalogue_share": p.candidates / num_items}
        if exhaustive is not None:
            row["ivf_recall_at_budget"] = ivf_at(points, p.candidates)
            row["ivf_ndcg_at_budget"] = ivf_at(points, p.candidates, "ndcg")
            row["sasrec_exhaustive_recall"] = exhaustive.recall
        rows.append(row)
    return rows


def format_points(points: Sequence[FrontierPoint]) -> str:
    lines = [f"{'method':<16} {'setting':<12} {'candidates':>10} {'R@20':>7} {'NDCG@20':>8} {'cpu_ms/q':>9}"]
    for p in points:
        mark = " *" if p.default else ""
        lines.append(
            f"{p.method:<16} {p.setting:<12} {p.candidates:>10.1f} {p.recall:>7.4f} {p.ndcg:>8.4f} {p.cpu_ms:>9.2f}{mark}"
        )
    return "\n".join(lines)


def plot_frontier(points: Sequence[FrontierPoint], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(p.method for p in points if not p.default))
    for ax, metric, label in ((axes[0], "recall", "Recall@20"), (axes[1], "ndcg", "NDCG@20")):
        for method in methods:
            pts = sorted(
                (p for p in points if p.method == method and not p.default), key=lambda p: p.candidates
            )
            style = "--" if method.endswith("/decoder") else "-"
            ax.plot(
                [p.candidates for p in pts],
                [getattr(p, metric) for p in pts],
                style,
                marker="o",
                ms=3,
                label=method,
            )
        for p in points:
            if p.default:
                ax.plot(p.candidates, getattr(p, metric), "k*", ms=10)
                ax.annotate(f"{p.method} default", (p.candidates, getattr(p, metric)), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("candidates scored per query (mean, before history exclusion)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
