"""``genret catalogue add | show``: deltas written offline in the service's delta-directory layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli.main import main
from models.bundle.bundle import load_bundle
from service.catalogue.store import DeltaStore, delta_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("catalogue-cli") / "tiny"
    return make_synthetic_bundle(out, 60, 4, 2, dim=16, seed=0, num_layers=1, backends=("torch",))


@pytest.fixture
def bundle(built: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (its delta directory sits beside it)."""
    return Path(shutil.copytree(built, tmp_path / "tiny"))


def write_delta(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def vector(bundle: Path, i: int) -> list[float]:
    emb = load_bundle(bundle).item_emb
    return [float(x) for x in np.asarray(emb[i]) + 0.01]


def test_add_writes_the_next_file_and_show_counts_it(bundle: Path, tmp_path: Path, capsys) -> None:
    d1 = write_delta(tmp_path / "d1.json", {"add": [{"id": "new-1", "vector": vector(bundle, 3)}]})
    assert main(["catalogue", "add", "--bundle", str(bundle), "--delta", str(d1)]) == 0
    d2 = write_delta(tmp_path / "d2.json", {"remove": ["new-1", load_bundle(bundle).item_ids[5].item()]})
    assert main(["catalogue", "add", "--bundle", str(bundle), "--delta", str(d2)]) == 0
    store = DeltaStore(delta_dir(bundle, None))
    assert store.directory == bundle.parent / "tiny.deltas"
    assert store.sequences() == [1, 2]
    first = store.read(1)
    assert first.base_fingerprint == load_bundle(bundle).manifest.fingerprint and first.version == 1
    assert first.delta is not None and [i.id for i in first.delta.add] == ["new-1"]
    capsys.readouterr()
    assert main(["catalogue", "show", "--bundle", str(bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == 2 and info["live_items"] == 59 and info["items"] == 61
    assert [d["status"] for d in info["deltas"]] == ["applied as version 1", "applied as version 2"]


def test_a_bad_delta_is_refused_and_writes_nothing(bundle: Path, tmp_path: Path, capsys) -> None:
    existing = load_bundle(bundle).item_ids[1].item()
    for bad in (
        {"add": [{"id": existing, "vector": vector(bundle, 1)}]},  # already live
        {"add": [{"id": "x", "vector": [0.0, 1.0]}]},  # wrong dimension
        {"remove": ["never-there"]},
    ):
        path = write_delta(tmp_path / "bad.json", bad)
        assert main(["catalogue", "add", "--bundle", str(bundle), "--delta", str(path)]) == 2
        assert "genret catalogue add" in capsys.readouterr().out
    assert DeltaStore(delta_dir(bundle, None)).sequences() == []


def test_catalogue_dir_and_files_of_another_bundle(bundle: Path, tmp_path: Path, capsys) -> None:
    shared = tmp_path / "shared"
    d1 = write_delta(tmp_path / "d1.json", {"add": [{"id": "new-1", "vector": vector(bundle, 2)}]})
    store = DeltaStore(delta_dir(bundle, shared))
    store.claim(1, "f" * 64, 1, load_delta(d1))  # another version of the bundle wrote file 1
    args = ["--bundle", str(bundle), "--catalogue-dir", str(shared)]
    assert main(["catalogue", "add", *args, "--delta", str(d1)]) == 0
    assert store.sequences() == [1, 2] and store.read(2).version == 1
    capsys.readouterr()
    assert main(["catalogue", "show", *args]) == 0
    out = capsys.readouterr().out
    assert "version 1: 61 live items" in out and "other bundle ffffffffffff" in out


def load_delta(path: Path) -> Any:
    from models.catalogue.delta import Delta

    return Delta.from_json(json.loads(path.read_text()))
