"""SASRec's device setting (``sasrec.device``): it trains on each present device (:mod:`tests.devices`;
the GPU check names ``cuda``) and hands back a CPU model that learned the planted data; the setting
is validated, a GPU this machine lacks is refused by name, and it leaves the cache key alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.devices import DEVICES, require
from training.evaluation import evaluate_recommender
from training.methods.popular import Popularity
from training.methods.sasrec.cache import sasrec_cache_key
from training.methods.sasrec.config import SASRecConfig
from training.methods.sasrec.train import fit_sasrec
from training.trainer import training_device

FAST = SASRecConfig(dim=32, batch_size=64, dropout=0.1, max_epochs=6, patience=6)


@pytest.mark.parametrize("device", DEVICES)
def test_sasrec_trains_on_the_device_and_comes_back_on_the_cpu(device: str, synthetic_split) -> None:
    model = fit_sasrec(synthetic_split, dataclasses.replace(FAST, device=require(device)))
    assert model.info["device"].startswith(device)
    assert all(p.device.type == "cpu" for p in model.module.parameters())
    sasrec = evaluate_recommender(model, synthetic_split.test, (20,))["recall@20"]
    popular = evaluate_recommender(Popularity.fit(synthetic_split), synthetic_split.test, (20,))["recall@20"]
    assert sasrec > 2 * popular


def test_device_setting_is_checked_and_resolved() -> None:
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or auto, got 'gpu'"):
        SASRecConfig(device="gpu")
    assert training_device("cpu") == torch.device("cpu")
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"device 'cuda:99': this machine has \d+ usable GPU"):
        training_device("cuda:99")


def test_device_is_not_part_of_the_cache_key(synthetic, synthetic_split) -> None:
    def key(config: SASRecConfig) -> str:
        return sasrec_cache_key(synthetic.fingerprint(), synthetic_split, 0, config, 1)

    assert key(FAST) == key(dataclasses.replace(FAST, device="cuda"))
    assert key(FAST) != key(dataclasses.replace(FAST, dim=16))
