"""An untrained but well-formed bundle, for service tests and ``genret bench serve``.

The tree is balanced: item ``i`` (dense id, 1-based) has code = ``i - 1`` written in base
``branching`` with ``levels`` digits, so leaves hold ``ceil(num_items / branching**levels)``
consecutive items. Encoder and decoder are randomly initialised; the encoder's item table is
hashed into at most :data:`MAX_ENCODER_ROWS` rows so that a 1M-item bundle exports in seconds
(serving cost does not depend on the table's size: a gather is a gather).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from models.decoder import DecoderConfig, TokenDecoder
from models.encoder import EncoderConfig, QueryEncoder
from models.index import TreeIndex
from training.export import export_bundle

MAX_ENCODER_ROWS = 65_536


class HashedItemEmbedding(nn.Module):
    """``[B,T] int64 -> [B,T,D]``: item ``i`` uses row ``i mod (rows-1) + 1``; padding 0 -> row 0 (zero)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.rows = rows
        self.table = nn.Embedding(rows, dim, padding_idx=0)

    def forward(self, items: Tensor) -> Tensor:
        hashed = torch.where(items > 0, torch.remainder(items - 1, self.rows - 1) + 1, 0)  # [B, T]
        return self.table(hashed)


def balanced_codes(num_items: int, branching: int, levels: int) -> np.ndarray:
    """``[N+1, L]`` int64 codes, row 0 zeros (ignored): item ``i`` gets the leaf ``(i-1) // per_leaf``
    written in base ``branching``, with ``per_leaf = ceil(N / branching**levels)``."""
    capacity = branching**levels
    per_leaf = math.ceil(num_items / capacity)
    leaf = np.arange(num_items, dtype=np.int64) // per_leaf  # [N]
    codes = np.zeros((num_items + 1, levels), np.int64)
    for level in range(levels - 1, -1, -1):
        codes[1:, level] = leaf % branching
        leaf = leaf // branching
    return codes


def make_synthetic_bundle(
    out_dir: str | Path,
    num_items: int,
    branching: int,
    levels: int,
    dim: int = 64,
    seed: int = 0,
    *,
    max_history: int = 50,
    token_scheme: str = "level",
    num_layers: int = 2,
) -> Path:
    """Write a random bundle with a balanced ``levels``-deep tree of ``branching`` children per node."""
    if num_items < 1 or branching < 2 or levels < 1:
        raise ValueError(
            f"need num_items >= 1, branching >= 2, levels >= 1; got {num_items}, {branching}, {levels}"
        )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    index = TreeIndex.from_codes(balanced_codes(num_items, branching, levels), branching, token_scheme)
    heads = 4 if dim % 4 == 0 else 1
    enc_cfg = EncoderConfig(
        num_items=num_items, dim=dim, num_layers=num_layers, num_heads=heads, max_len=max_history
    )
    items = HashedItemEmbedding(min(num_items + 1, MAX_ENCODER_ROWS), dim)
    encoder = QueryEncoder(enc_cfg, item_embedding=items)
    dec_cfg = DecoderConfig(dim=dim, num_layers=num_layers, num_heads=heads, token_scheme=index.token_scheme)  # type: ignore[arg-type]
    decoder = TokenDecoder(dec_cfg, index.node_token, index.level_offsets)

    item_emb = rng.standard_normal((num_items + 1, dim), dtype=np.float32)
    item_emb /= np.sqrt(dim)
    item_emb[0] = 0.0
    popularity = np.zeros(num_items + 1, np.float32)
    popularity[1:] = 1.0 / np.arange(1, num_items + 1, dtype=np.float32)  # Zipf by dense id
    width = len(str(num_items))
    numbers = np.char.zfill(np.arange(1, num_items + 1).astype(str), width)
    item_ids = ["", *np.char.add("item", numbers).tolist()]
    return export_bundle(
        out_dir,
        name=f"synthetic-{num_items}",
        method="synthetic",
        encoder=encoder,
        decoder=decoder,
        index=index,
        item_emb=item_emb,
        item_ids=item_ids,
        popularity=popularity,
        score_mode="logprob",
        max_history=max_history,
        metrics={},
        config={"num_items": num_items, "branching": branching, "levels": levels, "dim": dim, "seed": seed},
        dataset_fingerprint="synthetic",
    )
