"""``genret bench cluster``: :func:`training.clustering.balanced_tree_codes` on synthetic embeddings
against plain (unbalanced) hierarchical k-means with the same number of iterations, same run.
(Registered by :mod:`benchmarks.search`.)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from models.index import TreeIndex
from training.clustering import KMeansConfig, level_sizes, tree_codes


def synthetic_embeddings(num_items: int, dim: int, seed: int, centers: int = 256) -> np.ndarray:
    """``[N+1, D]`` float32 Gaussian mixture (row 0 = padding, zeros)."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(centers, dim)).astype(np.float32) * 3.0
    emb = np.zeros((num_items + 1, dim), np.float32)
    emb[1:] = mean[rng.integers(0, centers, num_items)] + rng.normal(size=(num_items, dim)).astype(np.float32)
    return emb


def cmd_cluster(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    emb = synthetic_embeddings(args.items, args.dim, args.seed)
    report: dict[str, Any] = {
        "items": args.items,
        "dim": args.dim,
        "k": args.k,
        "iters": args.iters,
        "torch_threads": torch.get_num_threads(),
    }
    runs = {
        "balanced (capacity greedy)": KMeansConfig(iters=args.iters, balanced=True),
        "plain k-means (baseline)": KMeansConfig(iters=args.iters, balanced=False),
    }
    for name, cfg in runs.items():
        wall, cpu = time.perf_counter(), time.process_time()
        codes = tree_codes(emb, args.k, seed=args.seed, config=cfg)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        TreeIndex.from_codes(codes, args.k, "node").validate()
        report[name] = {"cpu_seconds": cpu, "wall_seconds": wall, "levels": level_sizes(codes)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"bench cluster: {args.items} items x {args.dim} dims, k={args.k}, {args.iters} iterations per level, "
        f"torch threads {report['torch_threads']}"
    )
    print(f"{'method':<28}{'cpu s':>8}{'wall s':>8}  per level: clusters [min size, max size]")
    for name in runs:
        r = report[name]
        levels = "  ".join(f"L{i + 1}:{c}[{lo},{hi}]" for i, (c, lo, hi) in enumerate(r["levels"]))
        print(f"{name:<28}{r['cpu_seconds']:>8.1f}{r['wall_seconds']:>8.1f}  {levels}")
    return 0
