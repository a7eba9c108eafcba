"""ModelRegistry rules without ONNX: model names, the default model, reloads that unload a model and
reloads refused because they would change the default (a stub loader stands in for load + warm);
then the real loader on synthetic bundles: a typed, warmed model, and a reload that swaps a changed
bundle in while a request holding the old version still gets the old answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.synthetic_bundle import make_synthetic_bundle
from models.index import SCORE_MODES
from models.search.retriever import Retriever
from service.errors import BadBundle, ReloadConflict, UnknownModel
from service.registry.model_registry import LoadedModel, ModelRegistry
from service.settings import Settings


def write_bundle(root: Path, name: str, fingerprint: str = "fp1", manifest_name: str | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"name": manifest_name or name, "fingerprint": fingerprint, "version": fingerprint}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def stub_loader(name: str, path: Path, settings: Settings) -> LoadedModel:
    manifest: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    return LoadedModel(
        name=name,
        version=manifest["version"],
        method="stub",
        fingerprint=manifest["fingerprint"],
        path=path,
        bundle=None,  # type: ignore[arg-type]  # the rules never read the bundle or retriever
        retriever=None,  # type: ignore[arg-type]
        raw_ids=["", "a"],
        dense_of={"a": 1},
        popular=np.array([1]),
        popularity=np.array([0.0, 1.0]),
        item_emb=torch.zeros(2, 4),
        max_history=5,
        memory_dim=8,
        query_dim=4,
        loaded_at=0.0,
    )


def registry(root: Path, default: str | None = None) -> ModelRegistry:
    return ModelRegistry(Settings(bundle_path=root, default_model=default), loader=stub_loader)


@pytest.mark.parametrize("bad", ["Upper", "../../etc", ".hidden-not", "-dash", "a b", "x" * 65, "é"])
def test_bad_model_names_are_refused_with_the_rule(tmp_path: Path, bad: str) -> None:
    write_bundle(tmp_path, "one", manifest_name=bad)
    with pytest.raises(BadBundle, match="model name"):
        registry(tmp_path / "one").load_all()  # a single bundle: its manifest name is the model name


def test_good_names_load_and_the_state_spec_follows_the_model(tmp_path: Path) -> None:
    write_bundle(tmp_path, "one", manifest_name="seater-ml1m_v2.1")
    reg = registry(tmp_path / "one")
    reg.load_all()
    assert reg.default_name == "seater-ml1m_v2.1"
    spec = reg.get().state_spec(3)
    assert (spec.fingerprint, spec.length, spec.memory_dim, spec.query_dim) == ("fp1", 3, 8, 4)


def test_a_bad_name_on_reload_is_reported_and_the_other_bundles_still_load(tmp_path: Path) -> None:
    write_bundle(tmp_path, "main")
    write_bundle(tmp_path, "other")
    reg = registry(tmp_path, default="main")
    reg.load_all()
    write_bundle(tmp_path, "Main2")
    write_bundle(tmp_path, "other", fingerprint="fp2")
    write_bundle(tmp_path, "third")
    with pytest.raises(BadBundle, match="'Main2'"):
        registry(tmp_path, default="main").load_all()  # at start-up the first refusal fails it
    outcomes = {o["name"]: o for o in reg.reload()}
    assert "model name 'Main2' refused" in outcomes["Main2"]["refused"]
    assert outcomes["Main2"]["new_version"] is None and outcomes["Main2"]["changed"] is False
    assert outcomes["other"]["new_version"] == "fp2" and "refused" not in outcomes["other"]
    assert reg.names() == ["main", "other", "third"] and reg.get("other").version == "fp2"
    with pytest.raises(BadBundle, match="'Main2'"):
        reg.reload("Main2")
    with pytest.raises(BadBundle, match="'Main2'"):
        reg.reload(force=False)  # the poll: nothing but the refused folder would change


def test_several_models_need_a_default(tmp_path: Path) -> None:
    write_bundle(tmp_path, "a")
    write_bundle(tmp_path, "b")
    with pytest.raises(BadBundle, match="GENRET_DEFAULT_MODEL"):
        registry(tmp_path).load_all()
    with pytest.raises(BadBundle, match="'c'"):
        registry(tmp_path, default="c").load_all()
    reg = registry(tmp_path, default="b")
    reg.load_all()
    assert reg.default_name == "b" and reg.names() == ["a", "b"]


def test_reload_unloads_models_whose_bundle_left_and_keeps_the_default(tmp_path: Path) -> None:
    write_bundle(tmp_path, "a")
    write_bundle(tmp_path, "b")
    reg = registry(tmp_path, default="a")
    reg.load_all()
    (tmp_path / "b" / "manifest.json").rename(tmp_path / "b" / "gone.json")
    outcomes = reg.reload()
    assert {o["name"]: o["removed"] for o in outcomes} == {"a": False, "b": True}
    assert reg.names() == ["a"]
    with pytest.raises(UnknownModel):
        reg.get("b")
    write_bundle(tmp_path, "b", fingerprint="fp2")
    assert [o["name"] for o in reg.reload("b")] == ["b"] and reg.get("b").version == "fp2"
    (tmp_path / "b" / "manifest.json").unlink()
    assert reg.reload("b") == [
        {"name": "b", "old_version": "fp2", "new_version": None, "changed": True, "removed": True}
    ]
    with pytest.raises(UnknownModel):
        reg.reload("b")  # neither on disk nor loaded


def test_reload_that_would_drop_the_configured_default_is_refused(tmp_path: Path) -> None:
    write_bundle(tmp_path, "a")
    write_bundle(tmp_path, "b")
    reg = registry(tmp_path, default="a")
    reg.load_all()
    (tmp_path / "a" / "manifest.json").unlink()
    write_bundle(tmp_path, "b", fingerprint="fp2")
    with pytest.raises(ReloadConflict, match="GENRET_DEFAULT_MODEL='a'"):
        reg.reload()
    assert reg.names() == ["a", "b"] and reg.get("b").version == "fp1"  # nothing swapped


def test_without_a_default_a_reload_may_not_add_or_switch_the_only_model(tmp_path: Path) -> None:
    write_bundle(tmp_path, "a")
    reg = registry(tmp_path)
    reg.load_all()
    write_bundle(tmp_path, "b")
    with pytest.raises(ReloadConflict, match="no GENRET_DEFAULT_MODEL"):
        reg.reload()  # a second model: which one requests without `model` get would be a guess
    (tmp_path / "a" / "manifest.json").unlink()
    with pytest.raises(ReloadConflict, match="from 'a' to 'b'"):
        reg.reload()  # the only model replaced by another name: the default would change silently
    assert reg.names() == ["a"] and reg.default_name == "a"
    write_bundle(tmp_path, "a", fingerprint="fp2")
    (tmp_path / "b" / "manifest.json").unlink()
    assert reg.reload()[0]["new_version"] == "fp2"  # the same name, a new version: allowed


def test_a_bundle_that_fails_to_load_keeps_its_version_and_the_others_still_load(tmp_path: Path) -> None:
    write_bundle(tmp_path, "a")
    write_bundle(tmp_path, "b")
    calls: list[str] = []

    def flaky(name: str, path: Path, settings: Settings) -> LoadedModel:
        calls.append(name)
        if name == "b" and len(calls) > 2:
            raise ValueError("damaged")
        return stub_loader(name, path, settings)

    reg = ModelRegistry(Settings(bundle_path=tmp_path, default_model="a"), loader=flaky)
    reg.load_all()
    write_bundle(tmp_path, "a", fingerprint="fp2")
    outcomes = {o["name"]: o for o in reg.reload()}
    assert "damaged" in outcomes["b"]["refused"] and outcomes["b"]["new_version"] == "fp1"
    assert reg.get("a").version == "fp2" and reg.get("b").version == "fp1"  # "b" keeps serving its old one
    with pytest.raises(BadBundle, match="damaged"):
        reg.reload("b")  # one named model refused: an error, nothing swapped


def test_a_model_the_experiment_names_is_never_unloaded(tmp_path: Path) -> None:
    write_bundle(tmp_path, "a")
    write_bundle(tmp_path, "b")
    reg = registry(tmp_path, default="a")
    reg.load_all()
    reg.keep_loaded(lambda: ["a", "b"])  # e.g. variant b of the experiment file
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(ReloadConflict, match=r"\['b'\]"):
        reg.reload()
    assert reg.names() == ["a", "b"]
    reg.keep_loaded(lambda: ["a"])  # the experiment moved on
    assert reg.reload("b")[0]["removed"] is True


def test_the_real_loader_serves_a_changed_bundle_after_reload_and_the_old_one_still_answers(
    tmp_path: Path,
) -> None:
    make_synthetic_bundle(tmp_path / "a", 120, 4, 2, dim=16, seed=0, max_history=6, backends=("torch",))
    settings = Settings(bundle_path=tmp_path, decoder_backend="torch", device="cpu")
    reg = ModelRegistry(settings)
    reg.load_all()
    old = reg.get()
    assert old.name == "a" and isinstance(old.retriever, Retriever)
    assert old.bundle.manifest.score_mode in SCORE_MODES and old.num_items == 120
    assert old.item_emb.shape == (121, old.query_dim)
    history = [np.array([3, 7, 9], np.int64)]
    before = old.retriever.retrieve(history, k=5, beam_size=8).items
    assert reg.reload(force=False) == []  # nothing changed on disk: nothing loaded

    staged = make_synthetic_bundle(
        tmp_path / ".partial", 120, 4, 2, dim=16, seed=1, max_history=6, backends=("torch",)
    )
    (tmp_path / "a").rename(tmp_path / ".old")
    staged.rename(tmp_path / "a")
    (outcome,) = reg.reload(force=False)
    new = reg.get()
    assert outcome["changed"] and new.fingerprint != old.fingerprint and new is not old
    np.testing.assert_array_equal(old.retriever.retrieve(history, k=5, beam_size=8).items, before)
    assert not np.array_equal(new.retriever.retrieve(history, k=5, beam_size=8).items, before)
