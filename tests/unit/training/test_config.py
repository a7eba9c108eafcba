"""training.config: one override rule and one coercion for every method's config."""

from __future__ import annotations

import pytest

from training.config import coerce
from training.methods.sasrec.config import SASRecConfig
from training.methods.seater.config import SeaterConfig
from training.methods.tdr.config import TDRConfig
from training.methods.uri.config import URIConfig
from training.registry import check_overrides


def test_one_coercion_rule() -> None:
    assert [coerce("b", v, False) for v in ("true", "No", "ON", 0, True)] == [True, False, True, False, True]
    assert coerce("i", "3", 0) == 3 and coerce("i", 4.0, 0) == 4 and coerce("f", "1e-3", 0.0) == 1e-3
    assert coerce("t", "1,2,6", (1,)) == (1, 2, 6) and coerce("t", [3, "4"], (1,)) == (3, 4)
    assert coerce("s", 5, "x") == "5"
    for key, value, default in (("b", "maybe", True), ("i", 1.5, 0), ("i", "x", 0), ("t", "1,a", (1,))):
        with pytest.raises(ValueError, match=f"config {key}="):
            coerce(key, value, default)


def test_prefixed_keys_win_over_bare_keys_and_bare_keys_reach_every_method() -> None:
    overrides = {"batch_size": "32", "seater.batch_size": 16}
    assert SeaterConfig.load(overrides).batch_size == 16
    assert TDRConfig.load(overrides).batch_size == 32
    assert URIConfig.load(overrides).batch_size == 32
    assert SASRecConfig.load(overrides).batch_size == 32


def test_max_epochs_caps_every_epoch_field_after_the_other_overrides() -> None:
    overrides = {"max_epochs": "1", "sasrec.max_epochs": 9, "seater.epochs": 5}
    assert SASRecConfig.load(overrides).max_epochs == 1
    assert SeaterConfig.load(overrides).epochs == 1
    tdr = TDRConfig.load(overrides)
    assert (tdr.epochs, tdr.round_epochs) == (1, 1)
    uri = URIConfig.load(overrides)
    assert (uri.level_min_epochs, uri.level_max_epochs, uri.ranker_epochs) == (1, 1, 1)
    assert SeaterConfig.load({"max_epochs": 50}).epochs == SeaterConfig.load().epochs  # a cap, never a raise


def test_keys_no_method_reads_are_refused() -> None:
    check_overrides(
        {"cache_dir": "/x", "sasrec.cache": "false", "max_epochs": 1, "uri.k": 4, "rectify": "true"}
    )
    for key in ("uri.nope", "nope", "other.dim"):
        with pytest.raises(ValueError, match=f"unknown setting '{key}'"):
            check_overrides({key: 1})
