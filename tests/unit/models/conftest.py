"""One tiny exported bundle per test session (ONNX export takes seconds), plus its torch modules.

The tree has uneven bucket leaves (several items per leaf, like URI) so that the Retriever's
general leaf-gather path runs; two leaves hold a single item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.index import TreeIndex
from models.nets.decoder import DecoderConfig, TokenDecoder
from models.nets.encoder import EncoderConfig, QueryEncoder

NUM_ITEMS = 40
LEVELS = 2
BRANCHING = 4
DIM = 16
MAX_HISTORY = 6


@dataclass(frozen=True)
class TinyModel:
    encoder: QueryEncoder
    decoder: TokenDecoder
    index: TreeIndex
    item_emb: np.ndarray  # [N+1, D]
    item_ids: list[str]
    popularity: np.ndarray  # [N+1]


def tiny_codes(num_items: int, seed: int = 0) -> np.ndarray:
    """``[N+1, 2]`` codes with uneven leaves: 14 of the 16 leaves used, two of them by one item."""
    rng = np.random.default_rng(seed)
    leaf = rng.integers(0, 12, size=num_items)  # leaves 0..11 shared by many items
    leaf[:2] = [12, 13]  # two single-item leaves
    codes = np.zeros((num_items + 1, 2), np.int64)
    codes[1:, 0], codes[1:, 1] = leaf // BRANCHING, leaf % BRANCHING
    return codes


def build_tiny_model(seed: int = 0, token_scheme: str = "level") -> TinyModel:
    torch.manual_seed(seed)
    index = TreeIndex.from_codes(tiny_codes(NUM_ITEMS, seed), BRANCHING, token_scheme)
    encoder = QueryEncoder(
        EncoderConfig(
            num_items=NUM_ITEMS, dim=DIM, num_layers=2, num_heads=2, max_len=MAX_HISTORY, dropout=0.0
        )
    )
    decoder = TokenDecoder(
        DecoderConfig(dim=DIM, num_layers=2, num_heads=2, dropout=0.0, token_scheme=index.token_scheme),  # type: ignore[arg-type]
        index.node_token,
        index.level_offsets,
    )
    with torch.no_grad():  # trained-looking magnitudes: random biases so scores are not all ties
        assert decoder.bias is not None
        decoder.bias.normal_()
    rng = np.random.default_rng(seed)
    item_emb = rng.standard_normal((NUM_ITEMS + 1, DIM)).astype(np.float32)
    item_emb[0] = 0.0
    popularity = np.zeros(NUM_ITEMS + 1, np.float32)
    popularity[1:] = rng.integers(1, 100, NUM_ITEMS)
    item_ids = [""] + [f"sku-{i:03d}" for i in range(1, NUM_ITEMS + 1)]
    return TinyModel(encoder.eval(), decoder.eval(), index, item_emb, item_ids, popularity)


@pytest.fixture(scope="session")
def tiny_model() -> TinyModel:
    return build_tiny_model()


def export_tiny(
    model: TinyModel, out: Path, name: str, max_history: int = MAX_HISTORY, **fields: Any
) -> Path:
    """``model`` exported as bundle ``name`` into ``out`` (``fields``: more :func:`export_bundle`
    arguments; metrics, config and the dataset fingerprint default to empty / ``"tiny"``)."""
    from training.export.writer import export_bundle

    return export_bundle(
        out,
        name=name,
        method="test",
        encoder=model.encoder,
        decoder=model.decoder,
        index=model.index,
        item_emb=model.item_emb,
        item_ids=model.item_ids,
        popularity=model.popularity,
        score_mode="logprob",
        max_history=max_history,
        **{"metrics": {}, "config": {}, "dataset_fingerprint": "tiny", "version": "v1", **fields},
    )


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported once per session. Tests must not modify it: copy it first."""
    return export_tiny(
        tiny_model,
        tmp_path_factory.mktemp("bundles") / "tiny",
        "tiny",
        metrics={"recall@20": 0.5},
        config={"dim": DIM},
        dataset_fingerprint="tiny-dataset",
    )
