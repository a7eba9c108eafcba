"""SEATER trainer (Si et al. 2024): balanced k-ary semantic identifiers + an encoder-decoder trained
with a generation loss and two contrastive losses, served through the common bundle.

Pipeline of :func:`train_seater`:

1. identifiers: the SASRec item embeddings of the split are clustered into a balanced k-ary tree
   by constrained k-means (:func:`training.clustering.balanced_tree_codes`, Algorithm 1); every
   node is its own token (``token_scheme="node"``) and every leaf holds exactly one item.
2. model: one embedding table ``E[num_nodes, D]`` for all tokens; the leaf row of an item *is* that
   item's embedding, read by the encoder for the history and by the decoder for the leaf level
   (:class:`SharedTokenTable`). Encoder = :class:`models.nets.encoder.QueryEncoder`, decoder =
   :class:`models.nets.decoder.TokenDecoder` (no bias: eq. 4 is ``softmax(y_i^T e_c)`` over the
   children ``c`` of the current node, exactly the decoder step with ``score_mode="logprob"``).
   ``query_encoder: sasrec`` replaces the encoder by a frozen copy of the split's SASRec (the token
   table then serves the decoder alone); ``auto`` (the default) trains both models from the same
   random state and serves the one :mod:`training.methods.seater.encoder_choice` picks on
   validation users.
3. losses: ``L_gen + lambda_a L_ali + lambda_r L_rank`` (:mod:`training.methods.seater.losses`), L2 via
   Adam weight decay; ``align=false`` / ``rank=false`` switch the contrastive terms off.
Under ``torchrun`` (``genret train``, :mod:`training.distributed`) every rank trains on its shard of
the training pairs through a DDP-wrapped :class:`SeaterLoss`; rank 0 builds the index (broadcast to
the others), decides on the validation loss and exports the bundle.

4. export: the bundle's ``query`` (rerank vector) is the SASRec user vector computed inside
   ``encoder.onnx`` and ``item_emb`` the SASRec item table (see ``configs/seater.yaml``); the
   recommender evaluates through ``Retriever(load_bundle(dir), backend="onnx")``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from models.index import TreeIndex
from training import distributed
from training.bundle_recommender import BundleRecommender, SasrecQuery
from training.clustering import balanced_tree_codes
from training.context import TrainContext, TrainedMethod
from training.export.spec import method_bundle
from training.export.writer import copy_bundle, record_config, write_bundle
from training.fusion_rules import tune_fusions
from training.methods.sasrec.cache import sasrec_for
from training.methods.sasrec.model import SASRec
from training.methods.seater.config import SeaterConfig
from training.methods.seater.encoder_choice import BASELINE, CHALLENGER, choose_query_encoder
from training.methods.seater.losses import SeaterLoss, seater_losses
from training.methods.seater.model import SeaterEncoder, SeaterModel, TreeTables, init_tokens_from_items
from training.splits import training_pairs
from training.trainer import (
    KeepBest,
    Seeds,
    progress,
    run_epochs,
    seed_point,
    seeded,
    shard_rows,
    shuffled_batches,
    torch_threads,
)

log = logging.getLogger(__name__)


def build_index(item_emb: np.ndarray, cfg: SeaterConfig, seed: int) -> TreeIndex:
    """Algorithm 1: balanced k-ary tree over the item embeddings, one token per node."""
    codes = balanced_tree_codes(item_emb, k=cfg.branching, seed=seed, iters=cfg.kmeans_iters)
    index = TreeIndex.from_codes(codes, cfg.branching, token_scheme="node")
    index.validate()
    if index.num_leaves != index.num_items:
        raise ValueError(
            f"SEATER needs one item per leaf, got {index.num_leaves} leaves for {index.num_items} items"
        )
    return index


def _valid_pairs(ctx: TrainContext, max_pairs: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """First target of each validation user, left-padded histories ``[P, T]``."""
    T = ctx.split.max_len
    hist = np.zeros((len(ctx.split.valid.histories), T), np.int64)
    for i, h in enumerate(ctx.split.valid.histories):
        h = np.asarray(h, np.int64)[-T:]
        if h.size:
            hist[i, T - h.size :] = h
    tgt = np.asarray([t[0] for t in ctx.split.valid.targets], np.int64)
    return hist[:max_pairs], tgt[:max_pairs]


def train_model(
    model: SeaterModel, tables: TreeTables, cfg: SeaterConfig, ctx: TrainContext, seeds: Seeds
) -> dict[str, Any]:
    """Adam over the training pairs; keeps the epoch with the lowest validation generation loss.

    Under torchrun each rank steps on its shard of the pairs with DDP; rank 0 computes the
    validation loss and broadcasts it, so every rank keeps the same best epoch.
    """
    dist = distributed.current()
    hist_np, tgt_np = training_pairs(ctx.split.train, ctx.split.max_len)
    if cfg.max_train_pairs and hist_np.shape[0] > cfg.max_train_pairs:
        keep = seeds.rng.choice(hist_np.shape[0], cfg.max_train_pairs, replace=False)
        hist_np, tgt_np = hist_np[keep], tgt_np[keep]
    num_pairs = int(hist_np.shape[0])
    hist_np, tgt_np = shard_rows(dist, hist_np, tgt_np)  # equal-sized: every rank takes the same steps
    history, target = torch.from_numpy(hist_np), torch.from_numpy(tgt_np)
    v_hist, v_tgt = (torch.from_numpy(a) for a in _valid_pairs(ctx))
    net = dist.wrap(SeaterLoss(model, tables, cfg), find_unused_parameters=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_size = math.ceil(cfg.batch_size / dist.world_size)  # one process's global batch over W ranks
    keep_best = KeepBest(model, "valid_gen", cfg.patience, higher_is_better=False, min_delta=1e-4)

    def run_epoch(epoch: int) -> dict[str, float]:
        net.train()
        sums = np.zeros(4)
        batches = shuffled_batches(history.shape[0], batch_size, seeds.rng)
        for idx in progress(batches, f"seater epoch {epoch}/{cfg.epochs}", mininterval=5.0):
            ids = torch.from_numpy(idx)
            total, gen_loss, ali, rnk = net(history[ids], target[ids], seeds.generator)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sums += [total.item(), gen_loss.item(), ali.item(), rnk.item()]
        sums = dist.all_reduce_mean(torch.from_numpy(sums / max(len(batches), 1))).double().numpy()
        valid_gen = _validation_loss(model, tables, cfg, v_hist, v_tgt) if dist.is_main else 0.0
        names = ("loss", "gen", "ali", "rank")
        row = {**dict(zip(names, sums.tolist(), strict=True)), "valid_gen": float(dist.broadcast(valid_gen))}
        log.info("seater epoch=%d %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in row.items()))
        return row

    result = run_epochs(cfg.epochs, run_epoch, keep_best, dist)
    keep_best.restore()
    return {
        "best_epoch": keep_best.best_epoch,
        "best_valid_gen": keep_best.best,
        "epochs_run": result.epochs,
        "train_pairs": num_pairs,
        **({"world_size": dist.world_size} if dist.is_distributed else {}),
    }


@torch.no_grad()
def _validation_loss(
    model: SeaterModel, tables: TreeTables, cfg: SeaterConfig, hist: Tensor, tgt: Tensor
) -> float:
    if hist.shape[0] == 0:
        return float("nan")
    model.eval()
    plain = dataclasses.replace(cfg, align=False, rank=False)
    total, n = 0.0, 0
    for idx in shuffled_batches(hist.shape[0], 512, None):
        ids = torch.from_numpy(idx)
        total += seater_losses(model, tables, plain, hist[ids], tgt[ids]).gen.item() * len(idx)
        n += len(idx)
    return total / n


def train_seater(ctx: TrainContext) -> TrainedMethod:
    """SASRec embeddings -> balanced tree -> encoder-decoder training -> bundle -> served recommender."""
    cfg = SeaterConfig.load(ctx.config_overrides)
    dist = distributed.current()
    seeds = seeded(ctx.seed, dist.rank)
    t0 = time.perf_counter()
    sasrec = sasrec_for(ctx)
    item_emb = np.asarray(sasrec.item_embeddings(), np.float32)  # [N+1, D]
    if item_emb.shape[1] != cfg.dim:
        raise ValueError(f"SEATER dim={cfg.dim} must equal the SASRec embedding size {item_emb.shape[1]}")
    t_sasrec = time.perf_counter() - t0

    t1 = time.perf_counter()
    # rank 0's tree on every rank: the model's shapes follow it, and DDP needs them equal
    index = dist.broadcast(build_index(item_emb, cfg, ctx.seed) if dist.is_main else None)
    t_index = time.perf_counter() - t1
    log.info("seater index: %s", index.stats())

    # each candidate starts from the random state a lone run has here
    replay = seed_point(seeds)
    encoders = (BASELINE, CHALLENGER) if cfg.query_encoder == "auto" else (cfg.query_encoder,)
    runs: dict[str, tuple[Path | None, dict[str, Any]]] = {}
    for name in encoders:
        out = ctx.workdir / ("seater" if len(encoders) == 1 else f"seater-{name}")
        named = dataclasses.replace(cfg, query_encoder=name)
        runs[name] = _train_and_export(ctx, named, index, sasrec, item_emb, replay(), out)
    if not dist.is_main:  # rank 0 exports and serves; this rank's copy of the model is the same
        return TrainedMethod(recommender=sasrec, info={"rank": dist.rank, **runs[encoders[-1]][1]})

    chosen, choice = encoders[0], {}
    if len(encoders) > 1:
        bundles = {name: cast(Path, bundle) for name, (bundle, _) in runs.items()}
        rule = choose_query_encoder(bundles, ctx.split.valid)
        record_config(bundles[rule.chosen], rule.as_config())
        copy_bundle(bundles[rule.chosen], ctx.workdir / "seater")
        chosen, choice = rule.chosen, {"query_encoder_valid": rule.valid, "query_encoder_z": rule.z}
    bundle_dir = ctx.workdir / "seater"
    recommender = BundleRecommender(bundle_dir, cfg.beam_size)
    info = {
        "sasrec_seconds": round(t_sasrec, 1),
        "index_seconds": round(t_index, 1),
        "levels": index.levels,
        "num_nodes": index.num_nodes,
        "beam_size": recommender.beam_size,
        "align": cfg.align,
        "rank": cfg.rank,
        "query_encoder": chosen,
        **choice,
        **runs[chosen][1],
        # every candidate's training counts (auto trains two)
        "train_seconds": round(sum(run["train_seconds"] for _, run in runs.values()), 1),
    }
    return TrainedMethod(recommender=recommender, bundle_dir=bundle_dir, info=info)


def _train_and_export(
    ctx: TrainContext,
    cfg: SeaterConfig,
    index: TreeIndex,
    sasrec: SASRec,
    item_emb: np.ndarray,
    seeds: Seeds,
    out: Path,
) -> tuple[Path | None, dict[str, Any]]:
    """Train one encoder-decoder on ``index``; on rank 0 export it to ``out`` and run the validation
    rules on it. Returns the bundle (None on other ranks) and the training info."""
    dist = distributed.current()
    t0 = time.perf_counter()
    model = SeaterModel(index, cfg, ctx.split.max_len, sasrec.module)
    if cfg.init_from_sasrec:
        init_tokens_from_items(model, index, item_emb)
    tables = TreeTables.from_index(index)
    with torch_threads(cfg.threads):
        train_info = train_model(model, tables, cfg, ctx, seeds)
    info = {"train_seconds": round(time.perf_counter() - t0, 1), **train_info}
    if not dist.is_main:
        return None, info
    bundle_dir = export_seater(ctx, cfg, model, index, sasrec, item_emb, out)
    fusion = tune_fusions(
        bundle_dir, ctx.split.valid, path_score=cfg.fuse_path_score, leaf_centroids=cfg.fuse_leaf_centroids
    )
    return bundle_dir, {**fusion, **info}


def export_seater(
    ctx: TrainContext,
    cfg: SeaterConfig,
    model: SeaterModel,
    index: TreeIndex,
    sasrec: SASRec,
    item_emb: np.ndarray,
    out: Path,
) -> Path:
    """Write the bundle: the memory's encoder + SASRec query in ``encoder.onnx``, the decoder step, the tree."""
    # a SASRec query encoder already gives the SASRec user vector as its query
    query_model = (
        model.encoder if model.frozen_encoder else SeaterEncoder(model.encoder, SasrecQuery(sasrec.module))
    )
    encoder = query_model.eval()
    decoder = model.decoder.eval()
    spec = method_bundle(
        ctx,
        method="seater",
        encoder=encoder,
        decoder=decoder,
        index=index,
        item_emb=item_emb,
        score_mode="logprob",
        config=dataclasses.asdict(cfg),
    )
    return write_bundle(out, spec)
