"""SEATER trainer: config, shared token table, training/serving parity, identifier tree."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.index import TreeIndex
from models.nets.encoder import QueryEncoder
from training.context import TrainContext
from training.data import synthetic_dataset
from training.evaluation import evaluate_recommender
from training.methods.popular import Popularity
from training.methods.sasrec.model import SASRecConfig, SASRecModule
from training.methods.seater.config import SeaterConfig
from training.methods.seater.encoder_choice import guarded_pick
from training.methods.seater.losses import pair_similarity, seater_losses
from training.methods.seater.model import ItemsAsLeaves, SeaterModel, TreeTables, init_tokens_from_items
from training.methods.seater.train import build_index
from training.registry import check_overrides, get_method
from training.splits import make_split
from training.trainer import seed_point, seeded


def _tiny_index() -> TreeIndex:
    # 9 items, 2 levels: (3, 3, 3) items under 3 level-1 nodes -> one item per leaf
    codes = np.zeros((10, 2), np.int64)
    for item in range(1, 10):
        codes[item] = [(item - 1) // 3, (item - 1) % 3]
    return TreeIndex.from_codes(codes, 3, token_scheme="node")


def _model(cfg: SeaterConfig, index: TreeIndex) -> SeaterModel:
    torch.manual_seed(0)
    return SeaterModel(index, cfg, max_len=6).eval()


CFG = SeaterConfig(dim=8, heads=2, dropout=0.0, num_negatives=2, query_encoder="own")


def test_config_loads_yaml_and_coerces_overrides() -> None:
    cfg = SeaterConfig.load({"align": "false", "rank": "False", "epochs": "3", "lambda_rank": "0.07"})
    assert (cfg.align, cfg.rank, cfg.epochs, cfg.lambda_rank) == (False, False, 3, 0.07)
    assert SeaterConfig.load().align is True
    shared = SeaterConfig.load(
        {"seater.beam_size": "64", "max_epochs": 2, "sasrec.lr": "0.01", "cache_dir": "/x"}
    )
    assert (shared.beam_size, shared.epochs) == (64, 2)
    with pytest.raises(ValueError, match=r"unknown setting 'seater\.alignn'"):
        SeaterConfig.load({"seater.alignn": "true"})
    with pytest.raises(ValueError, match="unknown setting 'alignn'"):
        check_overrides({"alignn": "true"})  # a bare key no method has: checked where contexts are made
    with pytest.raises(ValueError, match="is not a bool"):
        SeaterConfig.load({"rank": "maybe"})


def test_leaf_token_is_the_item_embedding() -> None:
    index = _tiny_index()
    model = _model(CFG, index)
    items = torch.arange(1, 10)[None]  # [1, 9]
    leaves = torch.from_numpy(index.item_path[1:, -1].astype(np.int64))
    assert isinstance(model.encoder, QueryEncoder)
    assert torch.equal(model.encoder.embed_items(items)[0], model.tokens.table.weight[leaves])
    # one parameter for history items and every decoder token
    assert model.decoder.token_embedding is model.tokens
    leaf_reader = model.encoder.item_embedding
    assert isinstance(leaf_reader, ItemsAsLeaves) and leaf_reader.tokens is model.tokens


def test_inner_tokens_start_at_the_mean_of_their_items() -> None:
    index = _tiny_index()
    model = _model(CFG, index)
    emb = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    emb[0] = 0
    init_tokens_from_items(model, index, emb)
    table = model.tokens.table.weight.detach().numpy()
    node = int(index.item_path[4, 0])  # level-1 node of items 4, 5, 6
    np.testing.assert_allclose(table[node], emb[4:7].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(table[index.item_path[5, 1]], emb[5], rtol=1e-6)
    np.testing.assert_allclose(table[0], emb[1:].mean(axis=0), rtol=1e-5)


def test_generation_loss_matches_the_served_decoder_step() -> None:
    """Teacher-forced training scores == the exported decoder step, level by level (eq. 4)."""
    index = _tiny_index()
    cfg = dataclasses.replace(CFG, align=False, rank=False)
    model = _model(cfg, index)
    tables = TreeTables.from_index(index)
    history = torch.tensor([[0, 0, 1, 2], [3, 4, 5, 6]])
    target = torch.tensor([5, 9])
    loss = seater_losses(model, tables, cfg, history, target).total

    mask = history > 0
    memory, _ = model.encoder(history, mask)
    expected = torch.zeros(())
    path = tables.paths[target]  # [B, L+1]
    for level in range(index.levels):
        prefix = path[:, : level + 1]
        cand = tables.children[path[:, level]]  # [B, C]
        scores = model.decoder(memory, mask, torch.arange(2), prefix, cand)  # [B, C]
        truth = (cand == path[:, level + 1 : level + 2]).float().argmax(dim=1)
        expected = expected - torch.log_softmax(scores, 1).gather(1, truth[:, None]).sum() / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_ablation_flags_switch_the_contrastive_terms() -> None:
    index = _tiny_index()
    tables = TreeTables.from_index(index)
    history = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 2, 7]])
    target = torch.tensor([4, 7, 1, 8])
    full = dataclasses.replace(CFG, lambda_align=0.5, lambda_rank=0.5, beta=0.1)
    parts = seater_losses(
        _model(full, index), tables, full, history, target, torch.Generator().manual_seed(0)
    )
    assert parts.ali.item() > 0 and parts.rank.item() > 0
    torch.testing.assert_close(parts.total, parts.gen + 0.5 * parts.ali + 0.5 * parts.rank)
    plain = dataclasses.replace(full, align=False, rank=False)
    bare = seater_losses(_model(plain, index), tables, plain, history, target)
    assert bare.ali.item() == 0.0 and bare.rank.item() == 0.0
    torch.testing.assert_close(bare.total, parts.gen)


def test_losses_backpropagate_into_the_shared_table_and_ranking_weights() -> None:
    index = _tiny_index()
    tables = TreeTables.from_index(index)
    model = _model(CFG, index).train()
    parts = seater_losses(model, tables, CFG, torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([7, 2]))
    parts.total.backward()
    assert model.tokens.table.weight.grad is not None and model.tokens.table.weight.grad.abs().sum() > 0
    assert model.rank_w.grad is not None and model.rank_w.grad.abs().sum() > 0


def test_identifier_tree_is_balanced_with_full_length_paths() -> None:
    """Algorithm 1 on 150 random items, k = 4: sizes differ by at most one at every split."""
    emb = np.random.default_rng(3).normal(size=(151, 8)).astype(np.float32)
    emb[0] = 0
    cfg = SeaterConfig(branching=4, dim=8, heads=2)
    index = build_index(emb, cfg, seed=0)
    assert index.levels == 4  # smallest L with 4**L >= 150
    assert index.item_path.shape == (151, 4) and (index.item_path[1:] >= 0).all()
    assert index.num_leaves == 150  # one item per leaf
    assert sorted(index.leaf_items.tolist()) == list(range(1, 151))
    paths = np.concatenate([np.zeros((150, 1), np.int64), index.item_path[1:].astype(np.int64)], axis=1)
    for level in range(1, index.levels + 1):
        for parent in np.unique(paths[:, level - 1]):
            under = paths[paths[:, level - 1] == parent, level]
            sizes = np.unique(under, return_counts=True)[1]
            assert sizes.max() - sizes.min() <= 1, (level, parent, sizes)
            assert len(sizes) <= 4


def test_seed_point_replays_a_lone_runs_random_state() -> None:
    seeds = seeded(3)
    torch.rand(5)  # what the trainer draws before the candidates (e.g. the index)
    lone = (torch.rand(4), seeds.rng.random(3), torch.rand(2, generator=seeds.generator))
    seeds = seeded(3)
    torch.rand(5)
    replay = seed_point(seeds)
    for _ in range(2):  # each candidate draws what the lone run drew
        again = replay()
        drawn = (torch.rand(4), again.rng.random(3), torch.rand(2, generator=again.generator))
        torch.testing.assert_close(drawn[0], lone[0])
        np.testing.assert_array_equal(drawn[1], lone[1])
        torch.testing.assert_close(drawn[2], lone[2])


def test_the_sasrec_memory_serves_only_with_a_guarded_gain() -> None:
    rng = np.random.default_rng(0)
    own = (rng.random(4000) < 0.10).astype(float)  # per-user recall of the own-encoder bundle
    clearly_better = np.maximum(own, (rng.random(4000) < 0.05).astype(float))
    assert guarded_pick(own, clearly_better)[0] == "sasrec"
    slightly_better = own.copy()
    slightly_better[np.flatnonzero(own == 0)[:3]] = 1.0  # 3 more hits in 4,000 users: z < 2
    chosen, z = guarded_pick(own, slightly_better)
    assert chosen == "own" and 0 < z < 2
    assert guarded_pick(clearly_better, own)[0] == "own"  # worse never serves


def test_sasrec_query_encoder_is_frozen_and_stays_in_eval_mode() -> None:
    """``query_encoder=sasrec``: the decoder's memory is the SASRec copy's states, which no loss moves."""
    index = _tiny_index()
    cfg = dataclasses.replace(CFG, query_encoder="sasrec", dropout=0.3)
    torch.manual_seed(0)
    sasrec = SASRecModule(9, 6, SASRecConfig(dim=8, heads=2, layers=1, dropout=0.3))
    model = SeaterModel(index, cfg, max_len=6, sasrec=sasrec).train()
    assert model.training and model.decoder.training and not model.encoder.training
    history = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 2]])  # left-padded, as SASRec reads them
    memory, _ = model.encoder(history, history > 0)
    with torch.no_grad():
        torch.testing.assert_close(memory, sasrec.eval()(history))
    parts = seater_losses(model, TreeTables.from_index(index), cfg, history, torch.tensor([7, 8]))
    parts.total.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.tokens.table.weight.grad is not None and model.rank_w.grad is not None
    with pytest.raises(ValueError, match="needs the split's SASRec module"):
        SeaterModel(index, cfg, max_len=6)
    with pytest.raises(ValueError, match="resolved by the trainer"):
        SeaterModel(index, dataclasses.replace(cfg, query_encoder="auto"), max_len=6, sasrec=sasrec)
    with pytest.raises(ValueError, match="SASRec width 8"):
        SeaterModel(index, dataclasses.replace(cfg, dim=16), max_len=6, sasrec=sasrec)
    with pytest.raises(ValueError, match="query_encoder must be 'own', 'sasrec' or 'auto'"):
        SeaterConfig(query_encoder="bert")


@pytest.mark.slow
@pytest.mark.parametrize("query_encoder", ["own", "auto"])
def test_seater_on_planted_clusters_beats_popularity(tmp_path: Path, query_encoder: str) -> None:
    """Train SASRec + SEATER on synthetic data, serve through the exported ONNX bundle."""
    ds = synthetic_dataset(num_users=300, num_items=64, branching=4, depth=2, seed=0)
    split = make_split(ds, "user", seed=0, max_len=10)
    ctx = TrainContext(
        dataset=ds,
        split=split,
        seed=0,
        workdir=tmp_path,
        config_overrides={
            "cache_dir": str(tmp_path / "cache"),
            "sasrec.max_epochs": "30",
            "epochs": "6",
            "batch_size": "64",
            "branching": "4",
            "beam_size": "16",
            "seater.query_encoder": query_encoder,
        },
    )
    trained = get_method("seater")(ctx)
    assert trained.bundle_dir is not None
    manifest = json.loads((trained.bundle_dir / "manifest.json").read_text())
    assert (manifest["method"], manifest["token_scheme"], manifest["score_mode"]) == (
        "seater",
        "node",
        "logprob",
    )
    assert trained.info["levels"] == 3 and trained.info["num_nodes"] == 1 + 4 + 16 + 64
    if query_encoder == "auto":  # both trained and exported; the rule's choice serves, and says why
        chosen = trained.info["query_encoder"]
        rule = manifest["config"]["query_encoder_rule"]
        assert rule["chosen"] == chosen and set(rule["valid"]) == {"own", "sasrec"}
        candidate = json.loads((tmp_path / f"seater-{chosen}" / "manifest.json").read_text())
        assert candidate["fingerprint"] == manifest["fingerprint"]
        assert manifest["config"]["query_encoder"] == chosen
        assert (tmp_path / "seater-own").is_dir() and (tmp_path / "seater-sasrec").is_dir()
    seater = evaluate_recommender(trained.recommender, split.test, ks=(10,))
    popular = evaluate_recommender(Popularity.fit(split), split.test, ks=(10,))
    assert seater["recall@10"] > max(3 * popular["recall@10"], popular["recall@10"] + 0.05), (seater, popular)


def test_ranking_similarity_starts_in_the_sigmoid_slope() -> None:
    """With W_s = I the 64-d pooled states saturate sigmoid(p^T W q) and the ranking loss is flat."""
    index = _tiny_index()
    cfg = SeaterConfig(dim=64, heads=2, dropout=0.0, query_encoder="own")
    model = _model(cfg, index)
    history = torch.tensor([[1, 2, 3], [4, 5, 6]])
    memory, _ = model.encoder(history, history > 0)
    paths = TreeTables.from_index(index).paths[torch.tensor([[7, 8, 1], [2, 4, 9]])]  # [B, Q, L+1]
    z_y = model.path_states(memory, history > 0, paths).mean(dim=2)  # [B, Q, D]
    sim = pair_similarity(memory.mean(dim=1), z_y, model.rank_w)
    assert bool(((sim > 0.05) & (sim < 0.95)).all()), sim
