"""An untrained but well-formed bundle, for service tests and ``genret bench serve``.

The tree is balanced: item ``i`` (dense id, 1-based) has code = ``i - 1`` written in base
``branching`` with ``levels`` digits, so leaves hold ``ceil(num_items / branching**levels)``
consecutive items. Encoder and decoder are randomly initialised; the encoder's item table is
hashed into at most :data:`MAX_ENCODER_ROWS` rows so that a 1M-item bundle exports in seconds
(serving cost does not depend on the table's size: a gather is a gather).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.bundle.torch_backend import HashedItemEmbedding
from models.index import TreeIndex
from models.nets.decoder import DecoderConfig, TokenDecoder
from models.nets.encoder import EncoderConfig, QueryEncoder
from training.export.writer import export_bundle

__all__ = [
    "MAX_ENCODER_ROWS",
    "HashedItemEmbedding",
    "balanced_codes",
    "make_synthetic_bundle",
    "synthetic_item_ids",
]

MAX_ENCODER_ROWS = 65_536


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
    backends: Sequence[str] | None = None,
) -> Path:
    """Write a random bundle with a balanced ``levels``-deep tree of ``branching`` children per node.

    ``backends``: as :func:`training.export.writer.export_bundle` (None = ONNX + torch files); ``("torch",)``
    skips the ONNX export (a 10M-item bundle then builds in seconds, no per-item Python work).
    """
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

    # uniform on [-a, a] with a = sqrt(3 / dim): variance 1/dim as randn/sqrt(dim), ~6x cheaper
    # to draw (10M x 64 floats in about a second), in place: no second 10M-row temporary
    item_emb = rng.random((num_items + 1, dim), dtype=np.float32)
    scale = np.float32(np.sqrt(3.0 / dim))
    item_emb *= 2 * scale
    item_emb -= scale
    item_emb[0] = 0.0
    popularity = np.zeros(num_items + 1, np.float32)
    popularity[1:] = 1.0 / np.arange(1, num_items + 1, dtype=np.float32)  # Zipf by dense id
    return export_bundle(
        out_dir,
        name=f"synthetic-{num_items}",
        method="synthetic",
        encoder=encoder,
        decoder=decoder,
        index=index,
        item_emb=item_emb,
        item_ids=synthetic_item_ids(num_items),
        popularity=popularity,
        score_mode="logprob",
        max_history=max_history,
        metrics={},
        config={"num_items": num_items, "branching": branching, "levels": levels, "dim": dim, "seed": seed},
        dataset_fingerprint="synthetic",
        backends=backends,
    )


def synthetic_item_ids(num_items: int) -> np.ndarray:
    """``[N+1]`` fixed-width unicode ids ``"", "item001", ...`` (zero-padded to the width of N),
    built from digit arithmetic on an array of code points: no per-item Python strings."""
    width = len(str(num_items))
    codes = np.zeros((num_items + 1, 4 + width), np.uint32)  # UCS-4 code points, row 0 = ""
    codes[1:, :4] = [ord(c) for c in "item"]
    rest = np.arange(1, num_items + 1, dtype=np.int64)  # [N] digits peeled off from the right
    for column in range(3 + width, 3, -1):
        codes[1:, column] = rest % 10 + ord("0")
        rest //= 10
    ids = codes.view(f"<U{4 + width}")[:, 0]  # [N+1] trailing NULs end a numpy unicode string
    return ids
