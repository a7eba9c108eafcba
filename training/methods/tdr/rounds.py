"""TDR's per-round outputs: the bundle of a round and the plot of validation Recall@20 per round."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from models.index import TreeIndex
from training.bundle_recommender import SasrecQuery
from training.context import TrainContext
from training.methods.tdr.config import TDRConfig
from training.methods.tdr.model import TDREncoder, TDRModel


def export_tdr(
    ctx: TrainContext, cfg: TDRConfig, model: TDRModel, index: TreeIndex, sasrec: Any, out_dir: Path
) -> Path:
    from training.export.spec import method_bundle
    from training.export.writer import write_bundle

    encoder = TDREncoder(model.item_embedding, SasrecQuery(sasrec.module)).eval()
    spec = method_bundle(
        ctx,
        method="tdr",
        encoder=encoder,
        decoder=model.scorer.eval(),
        index=index,
        item_emb=np.asarray(sasrec.item_embeddings(), np.float32),
        score_mode="node",
        config={**dataclasses.asdict(cfg), "variant": cfg.variant},
    )
    return write_bundle(out_dir, spec)


def plot_rounds(rounds: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([r["round"] for r in rounds], [r["valid_recall@20"] for r in rounds], marker="o")
    ax.set_xticks([r["round"] for r in rounds])
    ax.set_xlabel("tree-learning round (0 = initial tree)")
    ax.set_ylabel("validation Recall@20")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
