"""Experiment (issue 25's lever list): the beam's choice of leaves fused with the query-to-centroid
score, as served (:mod:`models.search.centroid_term`), over a grid wider than the rule's.

For every multiple ``m`` of the per-level scales ``s_l`` (:mod:`training.centroid_rule`: measured on
the validation users' candidates at ``m = 0``) it prints validation Recall@20, its paired gain over
``m = 0`` in standard errors (as the rule reads it), and the test figures with the candidates
scored. ``m = 0`` is the bundle without the term; a very large ``m`` chooses leaves by their
centroids alone (IVF over the bundle's own partition). The bundle's own ``leaf_centroid_weights``
are ignored: the grid replaces them.

usage: PYTHONPATH=. python scripts/leaf_centroid_fusion.py --data D [--format seq] --bundle B [--split loo]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from models.bundle.bundle import load_bundle
from models.search.retriever import Retriever
from training.centroid_rule import baseline, sample_users
from training.data import default_dataset, open_dataset
from training.metrics import ndcg_at_k, per_user_recall, recall_at_k
from training.path_weight import gain_z, ranked_at, validation_candidates
from training.splits import make_split

GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 1e4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="default")
    parser.add_argument("--format", default=None)
    parser.add_argument("--bundle", required=True)
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
    r = Retriever(load_bundle(args.bundle))
    valid, test = sample_users(split.valid, args.max_users), sample_users(split.test, args.max_users)
    measured = baseline(r, valid, 20)
    print(json.dumps({"scales": measured.scales, "path_weight": r.path_weight}), flush=True)
    base = per_user_recall(ranked_at(measured.batches, len(valid), 20, r.path_weight), valid.targets, 20)
    for m in sorted(float(x) for x in args.multiples.split(",")):
        r.centroid_term = measured.term(m)
        batches = measured.batches if m == 0 else validation_candidates(r, valid, 20)
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
