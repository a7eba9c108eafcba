"""TDR trainer (training/tdr.py) and tree learning (training/tdr_tree_learning.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.index import TreeIndex
from models.nets.decoder import PAD_SCORE
from training.methods.tdr.config import TDRConfig
from training.methods.tdr.model import PreferenceModel, TDRModel
from training.methods.tdr.train import tree_learning_pairs
from training.methods.tdr.tree_learning import learn_tree

SMALL = TDRConfig(dim=8, windows=(1, 2, 3), attention_hidden=4, mlp_hidden=(8,))


def test_config_overrides_are_coerced_and_checked() -> None:
    cfg = TDRConfig.load(
        {"sampler": "uniform", "tdr.rectify": "true", "windows": "1,2", "sasrec.dim": "32", "max_epochs": "1"}
    )
    assert cfg.sampler == "uniform" and cfg.rectify is True and cfg.windows == (1, 2)
    assert cfg.epochs == 1 and cfg.variant == "TDR(U-RL)"
    assert TDRConfig.load({}).variant == "TDR(T)"
    with pytest.raises(ValueError, match="sampler"):
        TDRConfig.load({"sampler": "popularity"})
    with pytest.raises(ValueError, match=r"unknown setting 'tdr\.samplr'"):
        TDRConfig.load({"tdr.samplr": "uniform"})


def test_preference_model_reads_recent_items_whatever_the_padding_side() -> None:
    torch.manual_seed(0)
    model = PreferenceModel(num_nodes=10, cfg=SMALL).eval()
    items = torch.randn(2, 4, 8)  # [B, 4 valid items, D]
    left = torch.cat([torch.zeros(2, 3, 8), items], dim=1)  # [B, 7, D] left-padded
    right = torch.cat([items, torch.zeros(2, 3, 8)], dim=1)
    mask_left = torch.tensor([[False] * 3 + [True] * 4] * 2)
    beam_query = torch.tensor([0, 1, 1])
    prefix = torch.zeros(3, 1, dtype=torch.int64)
    cand = torch.tensor([[1, 2, -1], [3, 4, 5], [5, -1, -1]])
    with torch.no_grad():
        a = model(left, mask_left, beam_query, prefix, cand)
        b = model(right, mask_left.flip(1), beam_query, torch.zeros(3, 2, dtype=torch.int64), cand)
    torch.testing.assert_close(a, b)  # padding side and prefix do not matter
    assert a.shape == (3, 3) and (a[cand < 0] == PAD_SCORE).all() and (a[cand >= 0] > PAD_SCORE).all()
    torch.testing.assert_close(a[1, 2], a[2, 0])  # same user, same node, same score


def test_preference_model_ignores_items_older_than_the_windows() -> None:
    torch.manual_seed(0)
    model = PreferenceModel(num_nodes=4, cfg=SMALL).eval()  # W = 6 most recent items
    memory = torch.randn(1, 8, 8)
    older = memory.clone()
    older[0, :2] = torch.randn(2, 8)  # change the two oldest of 8 valid items
    mask = torch.ones(1, 8, dtype=torch.bool)
    args = (torch.tensor([0]), torch.zeros(1, 1, dtype=torch.int64), torch.tensor([[1, 2, 3]]))
    with torch.no_grad():
        torch.testing.assert_close(model(memory, mask, *args), model(older, mask, *args))
        newest = memory.clone()
        newest[0, -1] += 1.0
        assert not torch.allclose(model(memory, mask, *args), model(newest, mask, *args))


def uneven_tree() -> tuple[TreeIndex, np.ndarray]:
    """9 items, branching 4, 2 levels: subtrees of 4, 3 and 2 leaves, one item per leaf."""
    codes = np.array([[-1, -1], [0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1]])
    index = TreeIndex.from_codes(codes, 4, token_scheme="node")
    index.validate()
    return index, codes


@pytest.mark.parametrize("step", [1, 2])
def test_tree_learning_respects_capacities_and_keeps_every_item_in_one_leaf(step: int) -> None:
    index, codes = uneven_tree()
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(64, index.num_nodes, generator=gen)  # a fixed "model": score = table[user, node]

    def score(histories: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        return table[histories[:, -1, None], cand.clamp(min=0)]

    rng = np.random.default_rng(0)
    targets = rng.integers(1, index.num_items + 1, size=200)
    histories = rng.integers(0, 64, size=(200, 3))
    new_codes, stats = learn_tree(index, codes, score, histories, targets, step)
    new_index = TreeIndex.from_codes(new_codes, 4, token_scheme="node")
    new_index.validate()
    assert np.array_equal(new_index.level_offsets, index.level_offsets)  # same shape, same node ids
    assert sorted(map(tuple, new_codes[1:])) == sorted(map(tuple, codes[1:]))  # one item per leaf slot
    assert np.array_equal(np.diff(new_index.child_offsets), np.diff(index.child_offsets))
    assert 0.0 <= stats["moved"] <= 1.0


def test_tree_learning_follows_the_users_preference_under_capacity() -> None:
    """Items 1..4 are liked by users preferring level-1 node 3 (3 leaves): three of them must go
    there; the fourth overflows. Everything else is indifferent."""
    index, codes = uneven_tree()
    node3_children = index.children(3)
    assert len(node3_children) == 2  # node 3 = the 2-leaf subtree of code 2
    target_node = 2  # code 1: 3 leaves
    assert len(index.children(target_node)) == 3

    def score(histories: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        likes = histories[:, -1] == 1  # [K]
        node_ok = (cand == target_node) | torch.isin(cand, torch.from_numpy(index.children(target_node)))
        return (likes[:, None] & node_ok).float() * 5.0

    targets = np.repeat(np.arange(1, 10), 3)
    histories = np.zeros((targets.size, 2), np.int64)
    histories[targets <= 4, -1] = 1
    new_codes, _ = learn_tree(index, codes, score, histories, targets, 1)
    new_index = TreeIndex.from_codes(new_codes, 4, token_scheme="node")
    under_target = new_index.item_path[1:5, 0] == target_node
    assert under_target.sum() == 3  # capacity 3, four candidates: one overflows


def test_tree_learning_pairs_keeps_the_last_pairs_of_each_item() -> None:
    targets = np.array([3, 1, 3, 3, 2, 3])
    histories = np.arange(6)[:, None]
    h, t = tree_learning_pairs(histories, targets, per_item=2)
    assert t.tolist() == [1, 3, 2, 3] and h[:, 0].tolist() == [1, 3, 4, 5]


def test_model_scores_histories_against_nodes() -> None:
    model = TDRModel(num_items=5, num_nodes=7, cfg=SMALL).eval()
    with torch.no_grad():
        out = model.score_histories(torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[1, 2], [3, -1]]))
    assert out.shape == (2, 2) and out[1, 1] == PAD_SCORE


def test_tdr_on_planted_clusters_beats_popularity_through_the_bundle(tmp_path: Path) -> None:
    """Train every part (SASRec, tree, preference model, one tree-learning round), export, and
    evaluate through ONNX Runtime: Recall@20 must beat popularity by a wide margin."""
    from training.context import TrainContext
    from training.data import synthetic_dataset
    from training.evaluation import evaluate_recommender
    from training.methods.popular import Popularity
    from training.registry import get_method
    from training.splits import make_split

    ds = synthetic_dataset(num_users=600, num_items=200, branching=4, depth=2, seed=0)
    split = make_split(ds, "user", seed=0, max_len=20)
    overrides = {
        "cache_dir": str(tmp_path / "cache"),
        "sasrec.max_epochs": "8",
        "branching": "8",
        "batch_size": "128",
        "epochs": "2",
        "round_epochs": "1",
        "tree_rounds": "1",
        "beam_size": "40",
        "eval_users": "0",
    }
    ctx = TrainContext(dataset=ds, split=split, seed=0, workdir=tmp_path / "run", config_overrides=overrides)
    trained = get_method("tdr")(ctx)
    assert trained.bundle_dir is not None and (trained.bundle_dir / "manifest.json").is_file()
    assert len(trained.info["round_valid_recall@20"]) == 2
    assert Path(trained.info["plot"]).is_file()
    tdr = evaluate_recommender(trained.recommender, split.test, ks=(20,))
    pop = evaluate_recommender(Popularity.fit(split), split.test, ks=(20,))
    assert tdr["recall@20"] > pop["recall@20"] + 0.1, (tdr, pop)


def test_fused_score_equals_the_papers_formulation() -> None:
    """``score`` folds the window sums into the first MLP layer and the product block into a batched
    matmul; ``score_reference`` is eq. 26-27 + concatenation + MLP as written. Float32 re-association
    only: tolerance 1e-5."""
    torch.manual_seed(0)
    model = PreferenceModel(num_nodes=12, cfg=SMALL)
    recent = torch.randn(3, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [False] * 6])
    cand = torch.tensor([[1, 2, 3, -1], [4, 5, 6, 7], [8, 9, -1, -1]])
    torch.testing.assert_close(
        model.score(recent, mask, cand), model.score_reference(recent, mask, cand), atol=1e-5, rtol=1e-5
    )
