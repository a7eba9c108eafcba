"""URI as a method: train (:mod:`.layerwise`), rebuild the decoder on the learned index, export the
bundle, serve and diagnose through it.

What is measured is what is served: :func:`train_uri` exports a bundle and evaluates through
``Retriever(load_bundle(dir), backend="onnx")``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.index import TreeIndex
from models.nets.decoder import TokenDecoder
from training.bundle_recommender import BundleRecommender
from training.context import TrainContext, TrainedMethod
from training.export.spec import method_bundle
from training.fusion_rules import tune_fusions
from training.methods.uri.config import URIConfig
from training.methods.uri.layerwise import URITrainer
from training.splits import EvalSet

log = logging.getLogger(__name__)


class URIBundleRecommender(BundleRecommender):
    """Recommends through the exported bundle, exactly as the service does (URI's leaves are buckets
    of items: the beam counts leaves, widened only when they cannot hold ``k`` items)."""

    def diagnose(self, eval_set: EvalSet, k: int = 20) -> dict[str, float]:
        """Where recall is lost (history excluded from the results, as in the evaluation):
        ``beam_coverage`` = share of the targets inside the beam's leaves, ``candidates`` = items reranked per user,
        ``recall@k`` through the beam, ``exhaustive_recall@k`` = the same query and item vectors
        ranking the whole catalogue (no index)."""
        r = self.retriever
        item_emb = r.item_emb  # [N+1, Dr]
        leaf_of_item = torch.as_tensor(r.bundle.index.item_path[:, -1].astype(np.int64))  # [N+1]
        covered, beam_hits, full_hits, cands = [], [], [], []
        for start in range(0, len(eval_set.histories), self.batch_size):
            histories = eval_set.histories[start : start + self.batch_size]
            states = r.encode(histories)
            result = r.search(states, k, self.beam_size, histories)
            scores = states.query.float() @ item_emb.T  # [B, N+1]
            scores[:, 0] = -torch.inf
            for row, (hist, targets) in enumerate(zip(histories, eval_set.targets[start:], strict=False)):
                scores[row, torch.as_tensor(hist)] = -torch.inf
                target = np.unique(targets)  # as the evaluation counts them (history items cannot be hit)
                if not len(target):
                    continue
                leaves = torch.as_tensor(result.leaves[row])
                in_beam = torch.isin(leaf_of_item[torch.as_tensor(target)], leaves[leaves >= 0])
                covered.append(float(in_beam.float().mean()))
                beam_hits.append(len(np.intersect1d(result.items[row], target)) / len(target))
                top = torch.topk(scores[row], k).indices.numpy()
                full_hits.append(len(np.intersect1d(top, target)) / len(target))
                cands.append(float(result.num_candidates[row]))
        return {
            "beam_coverage": float(np.mean(covered)),
            "candidates": float(np.mean(cands)),
            f"recall@{k}": float(np.mean(beam_hits)),
            f"exhaustive_recall@{k}": float(np.mean(full_hits)),
        }


def train_uri(ctx: TrainContext) -> TrainedMethod:
    """Train URI on ``ctx.split``, export the bundle to ``ctx.workdir / "uri"``, serve from it."""
    from training.export.writer import write_bundle

    config = URIConfig.load(overrides=ctx.config_overrides)
    if "uri.max_len" not in ctx.config_overrides:
        config = dataclasses.replace(config, max_len=ctx.split.max_len)
    log.info("URI config: %s", config)
    started = time.perf_counter()
    trainer = URITrainer(config, ctx)
    index, reports = trainer.fit()
    train_seconds = time.perf_counter() - started
    if not trainer.dist.is_main:  # rank 0 exports and serves; this rank's model is the same
        from training.methods.popular import Popularity

        return TrainedMethod(recommender=Popularity.fit(ctx.split), info={"rank": trainer.dist.rank})
    ds = ctx.dataset
    stats = index.stats()
    info: dict[str, Any] = {"train_seconds": round(train_seconds, 1)}
    if trainer.dist.is_distributed:
        info["world_size"] = trainer.dist.world_size
    for r in reports:
        info[f"ape_l{r['level']}"] = round(r["ape"], 4)
        info[f"ape_valid_l{r['level']}"] = round(r["ape_valid"], 4)
        info[f"epochs_l{r['level']}"] = r["epochs"]
    info.update(
        leaves=stats["num_leaves"],
        leaf_size_min=stats["leaf_size_min"],
        leaf_size_max=stats["leaf_size_max"],
        leaf_size_mean=round(stats["leaf_size_mean"], 2),
    )
    out_dir = Path(ctx.workdir) / "uri"
    trainer.model.eval()
    spec = method_bundle(
        ctx,
        name=f"uri-{ds.name}",
        method="uri",
        encoder=trainer.model.encoder,
        decoder=serving_decoder(trainer, index),
        index=index,
        item_emb=item_table(trainer),
        score_mode="logprob",
        max_history=config.max_len,
        metrics={k: v for k, v in info.items() if isinstance(v, int | float)},
        config={**dataclasses.asdict(config), "level_reports": reports},
    )
    bundle_dir = write_bundle(out_dir, spec)
    (out_dir.parent / "uri_train_log.json").write_text(
        json.dumps({"reports": reports, "epochs": trainer.log}, indent=1)
    )
    info.update(
        tune_fusions(
            Path(bundle_dir),
            ctx.split.valid,
            path_score=config.fuse_path_score,
            leaf_centroids=config.fuse_leaf_centroids,
        )
    )
    recommender = URIBundleRecommender(Path(bundle_dir), config.beam_size, batch_size=config.eval_batch_size)
    diagnosis = recommender.diagnose(ctx.split.valid)
    log.info("URI validation diagnosis (through the bundle): %s", diagnosis)
    info.update({f"valid_{name}": round(value, 4) for name, value in diagnosis.items()})
    return TrainedMethod(recommender=recommender, bundle_dir=Path(bundle_dir), info=info)


def serving_decoder(trainer: URITrainer, index: TreeIndex) -> TokenDecoder:
    """The trained decoder rebuilt on the real index (same weights, same token rows)."""
    config = trainer.config
    decoder = TokenDecoder(trainer.model.decoder_config(), index.node_token, index.level_offsets)
    if int(index.node_token.max()) + 1 != config.k:
        raise RuntimeError(
            f"the URI index uses tokens 0..{int(index.node_token.max())}, expected all of 0..{config.k - 1}: "
            "the decoder's token rows would not line up"
        )
    state = trainer.model.decoder.state_dict()
    rows = decoder.num_rows
    for name in ("token_embedding.weight", "bias"):
        if name in state:
            state[name] = state[name][:rows]
    decoder.load_state_dict(state)
    return decoder.eval()


@torch.no_grad()
def item_table(trainer: URITrainer) -> np.ndarray:
    """``[N+1, D]`` rerank vectors, row 0 = 0."""
    trainer.model.eval()
    table = trainer.model.item_vectors(torch.arange(trainer.num_items + 1)).numpy().astype(np.float32)
    table[0] = 0.0
    return table
