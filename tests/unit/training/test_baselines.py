from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.context import TrainContext
from training.evaluation import evaluate_recommender
from training.methods.popular import Popularity
from training.methods.sasrec.cache import sasrec_config, sasrec_for, train_sasrec
from training.methods.sasrec.model import SASRec, SASRecConfig, pad_histories, top_k_excluding
from training.methods.sasrec.train import training_chunks
from training.registry import get_method

FAST = {"sasrec.max_epochs": 6, "sasrec.dim": 32, "sasrec.batch_size": 64, "sasrec.dropout": 0.1}


@pytest.fixture(scope="module")
def trained(synthetic, synthetic_split, tmp_path_factory) -> tuple[TrainContext, SASRec]:
    cache = tmp_path_factory.mktemp("cache")
    ctx = TrainContext(synthetic, synthetic_split, 0, cache, {**FAST, "cache_dir": str(cache)})
    return ctx, sasrec_for(ctx)


def test_popularity_ranks_by_training_count_and_excludes_history(synthetic_split) -> None:
    pop = Popularity(np.array([0.0, 5.0, 9.0, 1.0, 7.0]))
    ranked = pop.recommend([np.array([2]), np.array([], dtype=np.int64)], 3, [np.array([2]), np.array([])])
    assert ranked.tolist() == [[4, 1, 3], [2, 4, 1]]
    assert pop.recommend([np.array([1])], 6, [np.array([1, 2, 3, 4])]).tolist() == [[0] * 6]
    fitted = Popularity.fit(synthetic_split)
    assert fitted.counts[0] == 0 and fitted.counts.sum() == sum(len(s) for s in synthetic_split.train)


def test_sasrec_beats_popularity_on_planted_sequences(trained, synthetic_split) -> None:
    ctx, model = trained
    pop = get_method("popular")(ctx).recommender
    sasrec = evaluate_recommender(model, synthetic_split.test, (20,))
    popular = evaluate_recommender(pop, synthetic_split.test, (20,))
    assert sasrec["recall@20"] > 2 * popular["recall@20"]
    assert model.info["best_epoch"] >= 1 and model.info["cached"] is False


def test_sasrec_interface_shapes(trained, synthetic) -> None:
    _, model = trained
    histories = [np.array([1, 2, 3]), np.array([7])]
    emb = model.item_embeddings()
    assert emb.shape == (synthetic.num_items + 1, 32) and not emb[0].any()
    users = model.encode(histories)
    assert users.shape == (2, 32) and users.dtype == np.float32
    scores = model.score_items(histories)
    assert scores.shape == (2, synthetic.num_items + 1) and torch.isinf(scores[:, 0]).all()
    torch.testing.assert_close(scores[:, 1:], torch.from_numpy(users @ emb[1:].T), rtol=1e-4, atol=1e-4)
    ranked = model.recommend(histories, 10, histories)
    assert ranked.shape == (2, 10) and not np.isin(ranked[0], [1, 2, 3]).any() and (ranked > 0).all()


def test_sasrec_is_cached_on_disk_and_reloaded(trained) -> None:
    ctx, model = trained
    again = train_sasrec(TrainContext(ctx.dataset, ctx.split, 0, ctx.workdir, dict(ctx.config_overrides)))
    assert again.info["cached"] is True
    np.testing.assert_array_equal(again.item_embeddings(), model.item_embeddings())
    other_seed = TrainContext(
        ctx.dataset, ctx.split, 1, ctx.workdir, {**ctx.config_overrides, "sasrec.max_epochs": 1}
    )
    assert train_sasrec(other_seed).info["cached"] is False  # another key


def test_save_and_load_round_trip(trained, tmp_path: Path) -> None:
    _, model = trained
    loaded = SASRec.load(model.save(tmp_path / "m"))
    histories = [np.array([4, 5, 6])]
    np.testing.assert_allclose(loaded.encode(histories), model.encode(histories), rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="no saved SASRec"):
        SASRec.load(tmp_path / "empty")


@pytest.mark.parametrize("negatives", ["in_batch", "uniform"])
def test_sampled_softmax_trains(synthetic, synthetic_split, tmp_path: Path, negatives: str) -> None:
    overrides = {
        **FAST,
        "sasrec.max_epochs": 1,
        "sasrec.loss": "sampled",
        "sasrec.negatives": negatives,
        "sasrec.num_negatives": 32,
        "sasrec.cache": False,
    }
    model = train_sasrec(TrainContext(synthetic, synthetic_split, 0, tmp_path, overrides))
    assert model.info["epochs"] == 1 and model.info["cache_dir"] is None
    assert not list(tmp_path.iterdir())


def test_config_overrides_are_typed_and_checked() -> None:
    config = sasrec_config({"sasrec.dim": "32", "max_epochs": 3, "uri.k": 1})
    assert config.dim == 32 and config.max_epochs == 3 and config == SASRecConfig(dim=32, max_epochs=3)
    assert sasrec_config({"sasrec.max_epochs": 7, "max_epochs": 3}).max_epochs == 3  # max_epochs caps
    with pytest.raises(ValueError, match=r"unknown setting 'sasrec\.depth'"):
        sasrec_config({"sasrec.depth": 2})
    with pytest.raises(ValueError, match="is not a int"):
        sasrec_config({"sasrec.dim": 1.5})
    with pytest.raises(ValueError, match="loss must be"):
        sasrec_config({"sasrec.loss": "bpr"})


def test_training_chunks_make_every_item_after_the_first_a_target_once() -> None:
    seq = np.arange(1, 12)  # 11 items, windows of max_len + 1 = 5
    inputs, targets = training_chunks([seq, np.array([3])], max_len=4)
    flat = targets[targets > 0]
    assert sorted(flat.tolist()) == list(range(2, 12))
    for inp, tgt in zip(inputs, targets, strict=True):
        valid = tgt > 0
        assert (inp[valid] + 1 == tgt[valid]).all()  # input t predicts the next item


def test_pad_histories_and_top_k_helpers() -> None:
    padded = pad_histories([np.array([1, 2, 3, 4]), np.array([9])], max_len=3)
    assert padded.tolist() == [[2, 3, 4], [0, 0, 9]]
    scores = torch.tensor([[9.0, 1.0, 3.0, 2.0]])
    assert top_k_excluding(scores, 3, [np.array([2])]).tolist() == [[3, 1, 0]]
