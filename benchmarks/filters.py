"""``genret bench filters``: allow-lists inside the beam search, in process.

For each kind of allow-list, the :class:`models.search.retriever.Retriever` answers ``--requests`` random
histories at the bundle's default beam (widened for k as the service does) with ``allow`` and the
dense fill on (``fill=True``: a guaranteed k), and the answer is compared with exact inner-product
top-K over the allowed live items (:func:`models.search.constraints.dense_fill` from nothing):

* ``none``: no filter (exact top-K over every item), the baseline;
* ``random``: ``--share`` of the catalogue drawn uniformly at random per request;
* ``subtree``: the same share as whole subtrees of the index (every item under a few random
  parents of leaves, cut to the share): a category that the index keeps together;
* ``nearest``: the same share as the items nearest (cosine) to one random item (a category that is
  together in the item space, wherever the index put it).

Per kind: requests answered with k items (all allowed: checked), the share of requests and of
items the dense fill supplied, overlap@K with the exact list, and ms per request.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.bundle.bundle import load_bundle
from models.search.constraints import dense_fill
from models.search.retriever import Retriever

KINDS = ("none", "random", "subtree", "nearest")


@dataclass(frozen=True)
class FilterConfig:
    bundle: Path | None = None  # a bundle to measure; None: a synthetic one of ``items``
    items: int = 100_000
    levels: int = 3
    dim: int = 64
    share: float = 0.01  # of the catalogue in each allow-list
    k: int = 20
    requests: int = 200
    batch: int = 16
    backend: str = "onnx"
    workdir: Path = Path("runs/bench_filters")
    seed: int = 0


@dataclass(frozen=True)
class FilterRow:
    kind: str
    allowed: int  # mean items in an allow-list
    beam: int
    full_k: float  # share of requests answered with k items
    all_allowed: bool
    fill_requests: float  # share of requests the dense fill completed
    fill_items: float  # share of returned items from the dense fill
    overlap: float  # mean overlap@K with exact top-K over the allowed items
    ms_per_request: float


def synthetic(cfg: FilterConfig) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    branching = max(2, math.ceil(cfg.items ** (1.0 / cfg.levels) - 1e-9))
    out = cfg.workdir / f"bundle-n{cfg.items}-l{cfg.levels}-b{branching}-d{cfg.dim}-s{cfg.seed}"
    if (out / "manifest.json").is_file():
        return out
    print(f"building synthetic bundle: {cfg.items} items, {cfg.levels} levels of {branching} ...", flush=True)
    return make_synthetic_bundle(out, cfg.items, branching, cfg.levels, dim=cfg.dim, seed=cfg.seed)


def allow_lists(kind: str, n: int, size: int, retriever: Retriever, rng: np.random.Generator) -> list[np.ndarray | None]:  # fmt: skip
    """``n`` allow-lists of ``size`` dense ids (``None`` for ``kind == "none"``)."""
    num = retriever.num_items
    if kind == "none":
        return [None] * n
    if kind == "random":
        return [np.sort(rng.choice(num, size, replace=False) + 1) for _ in range(n)]
    out: list[np.ndarray | None] = []
    if kind == "subtree":  # whole subtrees: the items under random parents of leaves, ``size`` in all
        path = retriever.lookup.item_path  # [N+1, L]
        group = path[1:, max(0, path.shape[1] - 2)]  # [N] each item's leaf's parent
        for _ in range(n):
            ids = np.zeros(0, np.int64)
            while len(ids) < size:
                seed = int(rng.integers(num))
                ids = np.union1d(ids, np.flatnonzero(group == group[seed]) + 1)
            out.append(np.sort(rng.permutation(ids)[:size]))
        return out
    if kind == "nearest":
        emb = retriever.item_emb[1:].float()
        unit = emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-12)
        seeds = rng.choice(num, n)
        for s in seeds.tolist():
            top = torch.topk(unit @ unit[s], size).indices.cpu().numpy()
            out.append(np.sort(top + 1))
        return out
    raise ValueError(f"unknown allow-list kind {kind!r}; known: {KINDS}")


def exact(retriever: Retriever, query: torch.Tensor, k: int, allow: np.ndarray | None) -> np.ndarray:
    """Exact top-``k`` dense ids by inner product over the allowed live items (every live one: None)."""
    items, _ = dense_fill(retriever.lookup, retriever.item_emb, query, np.zeros(0, np.int64), k, allow, None)
    return items


def measure(kind: str, retriever: Retriever, histories: list[np.ndarray], cfg: FilterConfig) -> FilterRow:
    rng = np.random.default_rng(cfg.seed + KINDS.index(kind))
    size = max(cfg.k, round(cfg.share * retriever.num_items))
    allows = allow_lists(kind, len(histories), size, retriever, rng)
    beam = retriever.beam_for(cfg.k, None, 0)
    full = filled_rows = filled_items = returned = 0
    overlaps: list[float] = []
    all_allowed = True
    elapsed = 0.0
    for lo in range(0, len(histories), cfg.batch):
        hist, allow = histories[lo : lo + cfg.batch], allows[lo : lo + cfg.batch]
        t0 = time.perf_counter()
        res = retriever.retrieve(hist, cfg.k, beam, allow=None if kind == "none" else allow, fill=True)
        elapsed += time.perf_counter() - t0
        query = retriever.encode(hist).query.to(retriever.device, torch.float32)  # [b, Dr]
        dense = res.dense_filled if res.dense_filled is not None else np.zeros(len(hist), np.int64)
        for r, a in enumerate(allow):
            got = res.items[r][res.items[r] > 0]
            full += len(got) == cfg.k
            returned += len(got)
            filled_rows += int(dense[r] > 0)
            filled_items += int(dense[r])
            if a is not None and not np.isin(got, a).all():
                all_allowed = False
            truth = exact(retriever, query[r], cfg.k, a)
            overlaps.append(len(set(got.tolist()) & set(truth.tolist())) / max(1, min(cfg.k, len(truth))))
    n = len(histories)
    return FilterRow(
        kind=kind,
        allowed=0 if kind == "none" else size,
        beam=beam,
        full_k=full / n,
        all_allowed=all_allowed,
        fill_requests=filled_rows / n,
        fill_items=filled_items / max(1, returned),
        overlap=float(np.mean(overlaps)),
        ms_per_request=1000.0 * elapsed / n,
    )


def random_histories(retriever: Retriever, n: int, seed: int) -> list[np.ndarray]:
    """``n`` histories of 3..20 distinct items the encoder knows."""
    rng = np.random.default_rng(seed)
    top = retriever.encoder_items
    return [rng.choice(top, int(rng.integers(3, 21)), replace=False) + 1 for _ in range(n)]


def format_table(rows: list[FilterRow], k: int) -> str:
    head = (
        f"| allow-list | allowed items | beam | answered with k={k} | all allowed | requests dense-filled "
        f"| items dense-filled | overlap@{k} vs exact | ms/request |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r.kind} | {r.allowed or 'all'} | {r.beam} | {r.full_k:.3f} | {'yes' if r.all_allowed else 'NO'} "
        f"| {r.fill_requests:.3f} | {r.fill_items:.3f} | {r.overlap:.3f} | {r.ms_per_request:.2f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def run_filters(cfg: FilterConfig, kinds: tuple[str, ...] = KINDS, as_json: bool = False,
                log: Callable[[str], None] = print) -> int:  # fmt: skip
    path = cfg.bundle if cfg.bundle is not None else synthetic(cfg)
    retriever = Retriever(load_bundle(path), "cpu", cfg.backend, intra_op_threads=1)
    retriever.warmup()
    histories = random_histories(retriever, cfg.requests, cfg.seed)
    log(
        f"bundle {path}: {retriever.num_items} items, default beam {retriever.default_beam_size}, "
        f"k={cfg.k}, {cfg.requests} requests, allow-lists of {cfg.share:.1%}"
    )
    rows = [measure(kind, retriever, histories, cfg) for kind in kinds]
    log(format_table(rows, cfg.k))
    if as_json:
        log(json.dumps([asdict(r) for r in rows], indent=2))
    return 0
