"""Experiment (issue 25's lever list): the beam's choice of leaves fused with the query-to-centroid score.

At every level, ``m * s_l * (q . c)`` is added to the decoder's logit of each child before the
beam's log-softmax (a product of experts, renormalised per level): ``q`` is the query's rerank
vector, ``c`` the mean rerank vector of the items below the child, and ``s_l`` = std(logits) /
std(q . c) over the validation users' level-``l`` candidates at ``m = 0``, so that a grid point
means the same on every bundle. ``m = 0`` is the bundle as served; a very large ``m`` chooses
leaves by their centroids alone (IVF over the bundle's own partition). For every ``m`` it prints
validation Recall@20 (and its paired gain over ``m = 0`` in standard errors, as the path-weight
rule reads it) and the test figures, with the candidates scored.

usage: PYTHONPATH=. python scripts/leaf_centroid_fusion.py --data D [--format seq] --bundle B [--split loo]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.bundle.backend import BackendScorer
from models.bundle.bundle import load_bundle
from models.catalogue.tree_arrays import centroid_sums, subtree_counts
from models.search.retriever import EncoderStates, Retriever
from training.data import default_dataset, open_dataset
from training.metrics import ndcg_at_k, per_user_recall, recall_at_k
from training.path_weight import gain_z, ranked_at, validation_candidates
from training.splits import EvalSet, make_split

GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 1e4)


def sample(users: EvalSet, n: int, seed: int = 0) -> EvalSet:
    """``n`` users drawn at random (all when ``n`` is at least their number): a dataset's first
    users are not a fair sample (Beauty's first 4,000 reach half the recall of the rest)."""
    if n >= len(users):
        return users
    rows = np.sort(np.random.default_rng(seed).choice(len(users), n, replace=False))
    seen = None if users.seen is None else [users.seen[i] for i in rows]
    return EvalSet(
        [users.user_ids[i] for i in rows],
        [users.histories[i] for i in rows],
        [users.targets[i] for i in rows],
        seen,
    )


def node_centroids(r: Retriever) -> Tensor:
    """``[num_nodes, Dr]`` mean rerank vector of the items below each node of the bundle's tree
    (placement's :func:`centroid_sums` of the raw vectors, over :func:`subtree_counts`; a
    single-item leaf is its item)."""
    index, emb = r.bundle.index, r.bundle.item_emb
    sums = centroid_sums(index, emb, unit=False)  # [S, Dr]
    means = np.zeros((index.num_nodes, emb.shape[1]), np.float64)
    means[: len(sums)] = sums / np.maximum(subtree_counts(index)[: len(sums), None], 1)
    if len(sums) < index.num_nodes:  # single-item leaves
        leaves = np.arange(index.leaf_start, index.num_nodes)
        means[leaves] = emb[index.leaf_items[index.leaf_offsets[leaves - index.leaf_start]]]
    return torch.from_numpy(means).float()


@dataclass
class Fusion:
    """What the fused scorer reads: the batch's queries, the weight, and per-level scales."""

    centroids: Tensor  # [num_nodes, Dr]
    level_of: Tensor  # [num_nodes]
    multiple: float = 0.0
    scale: dict[int, float] = field(default_factory=dict)
    query: Tensor | None = None  # [B, Dr] of the batch being searched
    stats: dict[int, list[list[Tensor]]] | None = None  # level -> [logits, centroid scores] when collecting


class FusedScorer:
    """A :class:`models.search.beam.StepScorer`: the bundle's step plus the centroid term."""

    def __init__(self, inner: BackendScorer, fusion: Fusion) -> None:
        self.inner, self.fusion = inner, fusion
        self.cache_width = inner.cache_width

    def step(
        self, beam_query: Tensor, prefix: Tensor, candidates: Tensor, cache: Tensor
    ) -> tuple[Tensor, Tensor]:
        scores, out = self.inner.step(beam_query, prefix, candidates, cache)  # [Bb, C], [Bb, 1, W]
        f = self.fusion
        assert f.query is not None
        near = torch.einsum(
            "bd,bcd->bc", f.query[beam_query], f.centroids[candidates.clamp(min=0)]
        )  # [Bb, C]
        level = int(f.level_of[int(candidates.max())])
        if f.stats is not None:
            real = candidates >= 0
            f.stats.setdefault(level, [[], []])
            f.stats[level][0].append(scores[real].double())
            f.stats[level][1].append(near[real].double())
        if f.multiple:
            scores = scores + f.multiple * f.scale[level] * near
        return scores, out


def fused_retriever(bundle: Path) -> tuple[Retriever, Fusion]:
    """A retriever whose searches go through :class:`FusedScorer` (set ``fusion.multiple`` to choose)."""
    r = Retriever(load_bundle(bundle))
    lo = r.trie.level_offsets
    level_of = torch.zeros(r.trie.num_nodes, dtype=torch.int64)
    for level in range(r.trie.levels + 1):
        level_of[int(lo[level]) : int(lo[level + 1])] = level
    fusion = Fusion(node_centroids(r), level_of)
    encode, scorer = r.encode, r.scorer

    def encode_keeping_query(histories: list[np.ndarray]) -> EncoderStates:
        states = encode(histories)
        fusion.query = states.query.to(r.device, torch.float32)
        return states

    r.encode = encode_keeping_query  # type: ignore[method-assign,assignment]
    r.scorer = lambda memory, mask: FusedScorer(scorer(memory, mask), fusion)  # type: ignore[method-assign,assignment,return-value]
    return r, fusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="default")
    parser.add_argument("--format", default=None)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--split", default="loo")
    parser.add_argument(
        "--max-users", type=int, default=30_000, help="N validation and N test users, at random"
    )
    parser.add_argument(
        "--multiples", default=",".join(f"{m:g}" for m in GRID), help="grid of m, comma-separated"
    )
    args = parser.parse_args()
    ds = default_dataset() if args.data == "default" else open_dataset(args.data, args.format)
    split = make_split(ds, kind=args.split, seed=0, max_len=50)
    r, fusion = fused_retriever(args.bundle)
    valid, test = sample(split.valid, args.max_users), sample(split.test, args.max_users)
    fusion.stats = {}
    base_batches = validation_candidates(r, valid, 20)
    fusion.scale = {lv: float(torch.cat(s).std() / torch.cat(c).std()) for lv, (s, c) in fusion.stats.items()}
    fusion.stats = None
    print(json.dumps({"scale": fusion.scale}), flush=True)
    base = per_user_recall(ranked_at(base_batches, len(valid), 20, r.path_weight), valid.targets, 20)
    for m in sorted(float(x) for x in args.multiples.split(",")):
        fusion.multiple = m
        batches = base_batches if m == 0 else validation_candidates(r, valid, 20)
        recall = per_user_recall(ranked_at(batches, len(valid), 20, r.path_weight), valid.targets, 20)
        found = validation_candidates(r, test, 20)
        ranked = ranked_at(found, len(test), 20, r.path_weight)
        scored = np.concatenate([c.num_scored.cpu().numpy() for _, c in found])
        row = {
            "multiple": m,
            "valid_recall@20": round(float(recall.mean()), 4),
            "z": round(gain_z(recall, base), 2),
            "candidates": round(float(scored.mean()), 1),
            **{
                f"test_{name}@{k}": round(fn(ranked, test.targets, k), 4)
                for k in (10, 20)
                for name, fn in (("recall", recall_at_k), ("ndcg", ndcg_at_k))
            },
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
