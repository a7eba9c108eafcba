"""URI with the SASRec baseline as its query encoder (``uri.query_encoder=sasrec``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.context import TrainContext
from training.data import synthetic_dataset
from training.methods.sasrec.model import SASRecConfig, SASRecModule
from training.methods.sasrec.query_encoder import SasrecQueryEncoder
from training.methods.uri.config import URIConfig
from training.methods.uri.layerwise import URITrainer
from training.methods.uri.model import URIModel
from training.splits import make_split


def sasrec_module(num_items: int = 20, max_len: int = 6, dim: int = 16) -> SASRecModule:
    torch.manual_seed(0)
    return SASRecModule(num_items, max_len, SASRecConfig(dim=dim, heads=1, layers=1, dropout=0.0)).eval()


def test_encoder_is_the_sasrec_states_on_a_copy() -> None:
    sasrec = sasrec_module()
    encoder = SasrecQueryEncoder(sasrec).eval()
    history = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 7, 1, 2, 9, 4]])  # [2, 6] left-padded
    mask = history > 0
    memory, query = encoder(history, mask)
    with torch.no_grad():
        expected = sasrec(history)  # [2, 6, 16]
    torch.testing.assert_close(memory, expected)
    torch.testing.assert_close(query, expected[:, -1])
    # a masked position is read as padding
    masked = mask.clone()
    masked[1, 1] = False
    _, query_masked = encoder(history, masked)
    with torch.no_grad():
        expected_masked = sasrec(history * masked)[:, -1]
    torch.testing.assert_close(query_masked, expected_masked)
    # the copy is trained, the baseline's own weights are not
    with torch.no_grad():
        encoder.item_embedding.weight.add_(1.0)
    assert not torch.equal(encoder.item_embedding.weight, sasrec.item_emb.weight)


def test_model_ranks_with_the_sasrec_item_table_and_checks_width() -> None:
    sasrec = sasrec_module()
    config = URIConfig(k=3, levels=2, dim=16, heads=2, dropout=0.0, max_len=6, query_encoder="sasrec")
    attributes = np.zeros((21, 2), dtype=np.int64)
    attributes[1:, 0] = np.arange(20) % 4 + 1
    model = URIModel(config, 20, attributes, 4, sasrec)
    items = torch.arange(21)
    torch.testing.assert_close(model.item_vectors(items), model.encoder.item_embedding(items))  # type: ignore[operator]
    memory, mask = model.encode_items(items)
    assert memory.shape == (21, 3, 16) and bool(mask[5, 1]) and not bool(mask[5, 2])
    with pytest.raises(ValueError, match="SASRec width 16"):
        URIModel(URIConfig(k=3, levels=2, dim=32, heads=2, query_encoder="sasrec"), 20, None, 0, sasrec)


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_encoder_learning_rate_scale(tmp_path: Path, scale: float) -> None:
    """Scale 0 freezes the SASRec encoder (and the shared item table); the decoder still learns."""
    ds = synthetic_dataset(num_users=60, num_items=30, branching=3, depth=2)
    split = make_split(ds, "user", seed=0, max_len=8)
    overrides = {
        "uri.k": 3,
        "uri.levels": 2,
        "uri.dim": 16,
        "uri.heads": 2,
        "uri.max_len": 8,
        "uri.query_encoder": "sasrec",
        "uri.encoder_lr_scale": str(scale),
        "sasrec.dim": "16",
        "sasrec.max_epochs": "1",
        "cache_dir": str(tmp_path / "cache"),
    }
    ctx = TrainContext(ds, split, 0, tmp_path, overrides)
    trainer = URITrainer(URIConfig.load(overrides=overrides), ctx)
    encoder_before = {n: p.detach().clone() for n, p in trainer.model.encoder.named_parameters()}
    decoder_before = {n: p.detach().clone() for n, p in trainer.model.decoder.named_parameters()}
    trainer._step(np.arange(16), 1, None)
    encoder_moved = any(
        not torch.equal(p, encoder_before[n]) for n, p in trainer.model.encoder.named_parameters()
    )
    decoder_moved = any(
        not torch.equal(p, decoder_before[n]) for n, p in trainer.model.decoder.named_parameters()
    )
    assert decoder_moved
    assert encoder_moved == (scale > 0)
    base = trainer.config.lr
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [base, base * scale]
    # the ranker stage has its own scale: 0.5 unfreezes a frozen encoder
    trainer.set_encoder_lr_scale(0.5)
    assert all(p.requires_grad for p in trainer.model.encoder.parameters())
    assert trainer.optimizer.param_groups[1]["lr"] == base * 0.5
