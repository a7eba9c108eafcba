"""TDR trainer (Liu et al., "Deep Tree-based Retrieval for Efficient Recommendation: Theory and Method").

* Tree: balanced clustering of the SASRec item embeddings, one item per leaf, token scheme "node".
* Preference model ``f(u, n)`` (:class:`PreferenceModel`, the paper's DIN variant, sections 3.1 and 7):
  an activation unit ``MLP([a; a*w; w])`` weighs each recent history item ``a`` against the node
  embedding ``w``, the weighted items are summed per time window, and ``MLP([windows; w])`` gives one
  score. It is the bundle's decoder with score mode ``node`` (it ignores the prefix); the encoder's
  ``memory`` is the history's item embeddings.
* Training: a softmax over the nodes of every level (eq. 6-7), estimated by sampled softmax
  (eq. 17-18) with the uniform or the top-down sampler, optionally with the rectified labels of eq. 15
  (SASRec as the estimator of ``eta``); :mod:`.losses` and :mod:`.sampling`.
* Tree learning (section 6), alternated with training for ``tree_rounds`` rounds;
  :mod:`.tree_learning`. Validation Recall@20 is logged after every round and plotted.
* Serving: beam search with node scores, then the beam's items are reranked by the SASRec user vector
  (computed inside ``encoder.onnx``) against the SASRec item embeddings. The returned recommender
  serves from the exported bundle through ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.index import TreeIndex
from training import distributed
from training.bundle_recommender import BundleRecommender
from training.context import TrainContext, TrainedMethod
from training.distributed import DistContext
from training.fusion_rules import tune_fusions
from training.methods.sasrec.cache import sasrec_for
from training.methods.tdr.config import TDRConfig
from training.methods.tdr.losses import TDRLoss, TreeTensors, rectified_labels
from training.methods.tdr.model import TDRModel, init_from_item_embeddings
from training.methods.tdr.rounds import export_tdr, plot_rounds
from training.trainer import (
    Seeds,
    Timings,
    progress,
    run_epochs,
    seeded,
    shard_rows,
    shuffled_batches,
    torch_threads,
)

log = logging.getLogger(__name__)


def build_index(item_emb: np.ndarray, cfg: TDRConfig, seed: int) -> tuple[TreeIndex, np.ndarray]:
    """Initial tree: balanced k-ary clustering of the item embeddings, one item per leaf."""
    from training.clustering import balanced_tree_codes

    codes = balanced_tree_codes(item_emb, cfg.branching, seed=seed, iters=cfg.kmeans_iters)
    index = TreeIndex.from_codes(codes, cfg.branching, token_scheme="node")
    index.validate()
    if index.num_leaves != index.num_items:
        raise ValueError(
            f"TDR needs one item per leaf, got {index.num_leaves} leaves for {index.num_items} items"
        )
    return index, np.asarray(codes, np.int64)


def tree_learning_pairs(
    histories: np.ndarray, targets: np.ndarray, per_item: int
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``per_item`` pairs per target item (the last ones in pair order)."""
    order = np.argsort(targets, kind="stable")  # [P] grouped by item, pair order kept inside a group
    group_end = np.searchsorted(targets[order], targets[order], side="right")  # [P]
    keep = np.sort(order[(group_end - np.arange(len(order))) <= per_item])
    return histories[keep], targets[keep]


@dataclass
class _Pairs:
    """The training pairs: this rank's share (``full``/``histories``/``targets``) and, on every rank,
    the pairs tree learning reads (``tl_*``, from all pairs)."""

    full: np.ndarray  # [P_r, T] histories as the split gives them (rectified labels read these)
    histories: np.ndarray  # [P_r, W] the W most recent items (what f reads)
    targets: np.ndarray  # [P_r]
    tl_hist: np.ndarray  # [Q, W]
    tl_tgt: np.ndarray  # [Q]
    total: int  # pairs over all ranks


def _pairs(ctx: TrainContext, cfg: TDRConfig, rng: np.random.Generator, dist: DistContext) -> _Pairs:
    from training.splits import training_pairs

    full, targets = training_pairs(ctx.split.train, ctx.split.max_len)  # [P, T], [P]
    if cfg.max_train_pairs and len(targets) > cfg.max_train_pairs:
        keep = np.sort(rng.choice(len(targets), cfg.max_train_pairs, replace=False))
        full, targets = full[keep], targets[keep]
    histories = np.ascontiguousarray(full[:, -cfg.history_window :])  # [P, W] what f reads
    tl_hist, tl_tgt = tree_learning_pairs(histories, targets, cfg.tree_pairs_per_item)
    total = len(targets)
    full, histories, targets = shard_rows(dist, full, histories, targets)
    return _Pairs(full, histories, targets, tl_hist, tl_tgt, total)


def train_epochs(
    net: nn.Module,
    cfg: TDRConfig,
    pairs: _Pairs,
    weights: Tensor | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epochs: int,
    seeds: Seeds,
    batch_size: int,
) -> list[float]:
    """Run ``epochs`` epochs of ``net`` (a :class:`TDRLoss`, DDP-wrapped under torchrun); returns
    each epoch's mean loss (averaged over ranks)."""
    dist = distributed.current()

    def run_epoch(epoch: int) -> dict[str, float]:
        total, steps = 0.0, 0
        batches = shuffled_batches(len(pairs.targets), batch_size, seeds.rng)
        for idx in progress(batches, f"tdr epoch {epoch}/{epochs}"):
            w = weights[torch.from_numpy(idx)] if weights is not None else None
            hist, tgt = torch.from_numpy(pairs.histories[idx]), torch.from_numpy(pairs.targets[idx])
            loss = net(hist, tgt, w, seeds.generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
        scheduler.step()
        mean = float(dist.all_reduce_mean(torch.tensor(total / max(steps, 1), dtype=torch.float64)))
        log.info("tdr epoch %d/%d: loss %.4f", epoch, epochs, mean)
        return {"loss": mean}

    net.train()
    result = run_epochs(epochs, run_epoch)
    net.eval()
    return [h["loss"] for h in result.history]


def train_tdr(ctx: TrainContext) -> TrainedMethod:
    """SASRec -> initial tree -> layer-wise training, alternated with tree learning -> best round's bundle."""
    cfg = TDRConfig.load(ctx.config_overrides)
    with torch_threads(cfg.threads):
        return _TDRRun(ctx, cfg).run()


class _TDRRun:
    """One TDR training: the setup, the rounds (tree learning, training, a bundle and its validation
    figures on rank 0), and the best round as the method's result."""

    def __init__(self, ctx: TrainContext, cfg: TDRConfig) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.dist = distributed.current()
        self.seeds = seeded(ctx.seed, self.dist.rank)
        self.timings = Timings(
            {"sasrec": 0.0, "setup": 0.0, "train": 0.0, "tree_learning": 0.0, "round_eval": 0.0}
        )
        with self.timings.phase("sasrec"):
            self.sasrec = sasrec_for(ctx)
            item_emb = np.asarray(self.sasrec.item_embeddings(), np.float32)  # [N+1, Ds]
        with self.timings.phase("setup"):
            self.index, self.codes = build_index(item_emb, cfg, ctx.seed)
            log.info("tdr index: %s", {k: v for k, v in self.index.stats().items() if k != "per_level"})
            self.model = TDRModel(self.index.num_items, self.index.num_nodes, cfg)
            if cfg.init_from_sasrec:
                init_from_item_embeddings(self.model, self.index, item_emb, cfg.dim)
            self.pairs = _pairs(ctx, cfg, self.seeds.rng, self.dist)
            self.loss = TDRLoss(self.model, cfg)
            self.net = self.dist.wrap(self.loss, find_unused_parameters=True)
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.lr_decay)
        # the same global batch as one process: each of W ranks steps on batch_size / W pairs
        self.batch_size = math.ceil(cfg.batch_size / self.dist.world_size)
        self.out_root = ctx.workdir / "tdr"

    def learn_tree(self) -> dict[str, Any]:
        """Tree learning on rank 0 (its codes broadcast); the tree keeps its shape, so the node rows do."""
        from training.methods.tdr.tree_learning import learn_tree

        found = None
        if self.dist.is_main:
            p = self.pairs
            found = learn_tree(
                self.index, self.codes, self.model.score_histories, p.tl_hist, p.tl_tgt, self.cfg.tree_step
            )
        self.codes, stats = self.dist.broadcast(found)
        new_index = TreeIndex.from_codes(self.codes, self.cfg.branching, token_scheme="node")
        if not np.array_equal(new_index.level_offsets, self.index.level_offsets):
            raise RuntimeError("tree learning changed the tree's shape; node embeddings would not match")
        self.index = new_index
        return dict(stats)

    def train_round(self, r: int) -> list[float]:
        cfg = self.cfg
        self.loss.tree = tree = TreeTensors.from_index(self.index)
        weights = None
        if cfg.rectify:
            weights = rectified_labels(
                self.sasrec, self.pairs.full, self.pairs.targets, tree.item_path, cfg.rectify_mode
            )
            log.info("rectified labels: share of pairs kept per level %s", weights.mean(dim=0).tolist())
        epochs = cfg.epochs if r == 0 else cfg.round_epochs
        return train_epochs(
            self.net,
            cfg,
            self.pairs,
            weights,
            self.optimizer,
            self.scheduler,
            epochs,
            self.seeds,
            self.batch_size,
        )

    def evaluate_round(self, r: int, stats: dict[str, Any], losses: list[float]) -> dict[str, Any]:
        """Rank 0: the round's bundle and its validation figures."""
        from training.evaluation import evaluate_recommender

        bundle_dir = export_tdr(
            self.ctx, self.cfg, self.model, self.index, self.sasrec, self.out_root / f"round{r}"
        )
        recommender = BundleRecommender(bundle_dir, self.cfg.beam_size)
        valid = evaluate_recommender(recommender, self.ctx.split.valid, ks=(20,), limit=self.cfg.eval_users)
        entry: dict[str, Any] = {
            "round": r,
            "valid_recall@20": valid["recall@20"],
            "valid_ndcg@20": valid["ndcg@20"],
            "moved": stats["moved"],
            "tree_learning": stats,
            "loss": losses[-1] if losses else float("nan"),
            "bundle": str(bundle_dir),
        }
        log.info(
            "%s round %d: valid recall@20 %.4f ndcg@20 %.4f (items moved by tree learning %.1f%%, loss %.4f)",
            self.cfg.variant,
            r,
            entry["valid_recall@20"],
            entry["valid_ndcg@20"],
            100 * entry["moved"],
            entry["loss"],
        )
        return entry

    def run(self) -> TrainedMethod:
        rounds: list[dict[str, Any]] = []
        for r in range(self.cfg.tree_rounds + 1):
            stats: dict[str, Any] = {"moved": 0.0}
            if r > 0:
                with self.timings.phase("tree_learning"):
                    stats = self.learn_tree()
            with self.timings.phase("train"):
                losses = self.train_round(r)
            if self.dist.is_main:
                with self.timings.phase("round_eval"):
                    rounds.append(self.evaluate_round(r, stats, losses))
        if not self.dist.is_main:  # rank 0 exports and serves; this rank's model is the same
            return TrainedMethod(
                recommender=self.sasrec, info={"rank": self.dist.rank, "train_pairs": self.pairs.total}
            )
        return self.result(rounds)

    def result(self, rounds: list[dict[str, Any]]) -> TrainedMethod:
        """The best round (validation Recall@20) as the method; ``rounds.json`` and the plot beside it."""
        cfg, index = self.cfg, self.index
        best = max(rounds, key=lambda e: e["valid_recall@20"])
        (self.out_root / "rounds.json").write_text(json.dumps(rounds, indent=2))
        plot_path = self.out_root / "tree_learning.png"
        plot_rounds(rounds, plot_path, f"{cfg.variant} on {self.ctx.dataset.name}")
        best_dir = Path(best["bundle"])
        fusion = tune_fusions(
            best_dir,
            self.ctx.split.valid,
            path_score=cfg.fuse_path_score,
            leaf_centroids=cfg.fuse_leaf_centroids,
        )
        info = {
            "variant": cfg.variant,
            **self.timings.info(),
            "train_pairs": self.pairs.total,
            "levels": index.levels,
            "num_nodes": index.num_nodes,
            "beam_size": cfg.beam_size,
            "round_valid_recall@20": [round(e["valid_recall@20"], 4) for e in rounds],
            "best_round": best["round"],
            **fusion,
            "plot": str(plot_path),
        }
        if self.dist.is_distributed:
            info["world_size"] = self.dist.world_size
        return TrainedMethod(
            recommender=BundleRecommender(best_dir, cfg.beam_size), bundle_dir=best_dir, info=info
        )
