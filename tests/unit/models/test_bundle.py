"""Bundle export and verified loading: a good bundle loads; every kind of bad bundle is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from models.bundle.bundle import load_bundle
from models.bundle.manifest import SCHEMA_VERSION, BundleError, bundle_fingerprint, file_sha256
from training.export.onnx_graphs import ExportError
from training.export.writer import export_bundle, publish_dir, record_metrics

from .conftest import DIM, MAX_HISTORY, NUM_ITEMS, TinyModel


def copy_bundle(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def resign(path: Path) -> None:
    """Recompute sizes, checksums and fingerprint, as if a (buggy) exporter had written the files."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"], entry["bytes"] = file_sha256(path / name), (path / name).stat().st_size
    manifest["fingerprint"] = bundle_fingerprint({n: e["sha256"] for n, e in manifest["files"].items()})
    (path / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(path: Path, **changes: object) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_good_bundle_loads(tiny_bundle_dir: Path, tiny_model: TinyModel) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    m = bundle.manifest
    assert (m.schema_version, m.name, m.method, m.version) == (SCHEMA_VERSION, "tiny", "test", "v1")
    assert (
        # cache: 2 layers x (key, value) x D; memory state: 2 layers x (key, value) tensors [B, D, T]
        m.dims == {"memory": DIM, "query": DIM, "cache": 2 * 2 * DIM, "memory_states": 2 * 2}
        and m.num_items == NUM_ITEMS
        and m.max_history == MAX_HISTORY
    )
    assert (m.levels, m.branching, m.token_scheme, m.score_mode) == (2, 4, "level", "logprob")
    assert m["metrics"] == {"recall@20": 0.5} and m.dataset_fingerprint == "tiny-dataset"
    assert set(m.files) == {
        "encoder.onnx",
        "decoder_memory.onnx",
        "decoder.onnx",
        "index.npz",
        "items.npz",
        "modules.json",  # the torch backend's files: see test_torch_bundle.py
        "weights.safetensors",
    }
    assert bundle.item_ids.dtype.kind == "U" and bundle.item_ids.tolist() == tiny_model.item_ids
    np.testing.assert_array_equal(bundle.item_emb, tiny_model.item_emb)
    np.testing.assert_array_equal(bundle.index.leaf_items, tiny_model.index.leaf_items)
    assert m.raw["export"]["parity_max_abs_error"] < 1e-4
    assert not list(tiny_bundle_dir.parent.glob(".tiny.tmp-*")), "temporary export dir left behind"


def test_missing_file_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    (path / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx is missing"):
        load_bundle(path)


def test_missing_manifest_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(path)


def test_truncated_file_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    data = (path / "encoder.onnx").read_bytes()
    (path / "encoder.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"encoder\.onnx has \d+ bytes.*truncated"):
        load_bundle(path)


def test_wrong_checksum_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    data = bytearray((path / "items.npz").read_bytes())
    data[-100] ^= 0xFF  # same size, different content
    (path / "items.npz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"items\.npz sha256 .* does not match"):
        load_bundle(path)


def test_wrong_fingerprint_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    edit_manifest(path, fingerprint="0" * 64)
    with pytest.raises(BundleError, match="fingerprint"):
        load_bundle(path)


def test_unknown_schema_version_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    edit_manifest(path, schema_version=99)
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        load_bundle(path)


def test_a_schema_2_bundle_is_refused_with_the_reason_and_the_remedy(
    tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    """A bundle of the previous schema (no decoder_memory.onnx; its decoder.onnx recomputed the
    cross-attention keys/values per level) is refused by name, saying why and what to do."""
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    raw = json.loads((path / "manifest.json").read_text())
    (path / "decoder_memory.onnx").unlink()
    files = {k: v for k, v in raw["files"].items() if k != "decoder_memory.onnx"}
    dims = {k: v for k, v in raw["dims"].items() if k != "memory_states"}
    edit_manifest(path, schema_version=2, files=files, dims=dims)
    with pytest.raises(BundleError) as caught:
        load_bundle(path)
    message = str(caught.value)
    assert "schema_version 2 is not supported (this build reads 3)" in message
    assert "decoder_memory.onnx" in message and "train or export it again" in message


def test_item_table_shape_mismatch_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    with np.load(path / "items.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["item_emb"] = arrays["item_emb"][:-1]  # N rows instead of N+1
    with (path / "items.npz").open("wb") as fh:
        np.savez(fh, **arrays)
    resign(path)  # checksums pass: the shape check must catch it
    with pytest.raises(BundleError, match=rf"items\.npz: item_emb is float32\[{NUM_ITEMS}, {DIM}\]"):
        load_bundle(path)


def test_manifest_disagreeing_with_the_index_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    edit_manifest(path, levels=3)
    with pytest.raises(BundleError, match=r"index\.npz: levels is 2, the manifest says 3"):
        load_bundle(path)


def test_onnx_with_wrong_signature_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    shutil.copy(path / "encoder.onnx", path / "decoder.onnx")  # a valid graph, the wrong one
    resign(path)
    with pytest.raises(BundleError, match=r"decoder\.onnx: inputs are"):
        load_bundle(path)


def test_pickled_item_ids_are_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    with np.load(path / "items.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["item_ids"] = arrays["item_ids"].astype(object)
    with (path / "items.npz").open("wb") as fh:
        np.savez(fh, **arrays)
    resign(path)
    with pytest.raises(BundleError, match=r"items\.npz: cannot read"):
        load_bundle(path)


def test_export_refuses_bad_inputs_and_leaves_the_old_bundle(tiny_model: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "stale.txt").write_text("old version")
    with pytest.raises(ExportError, match="item_emb must be"):
        export_bundle(
            out,
            name="tiny",
            method="test",
            encoder=tiny_model.encoder,
            decoder=tiny_model.decoder,
            index=tiny_model.index,
            item_emb=tiny_model.item_emb[:-1],
            item_ids=tiny_model.item_ids,
            popularity=tiny_model.popularity,
            score_mode="logprob",
            max_history=MAX_HISTORY,
            metrics={},
            config={},
            dataset_fingerprint="x",
        )
    assert (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "temporary directories left behind"


def test_publish_replaces_an_existing_bundle_whole(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    new = copy_bundle(tiny_bundle_dir, tmp_path)
    out = tmp_path / "served"
    out.mkdir()
    (out / "stale.txt").write_text("old version")
    publish_dir(new, out)
    assert not (out / "stale.txt").exists() and not new.exists()
    assert load_bundle(out).manifest.name == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"], "temporary directories left behind"


def test_recorded_metrics_reach_the_manifest_and_keep_the_fingerprint(
    tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    bundle_dir = tmp_path / "b"
    shutil.copytree(tiny_bundle_dir, bundle_dir)
    before = load_bundle(bundle_dir).fingerprint
    # evaluators hand over numpy scalars; np.float32 is not a float, nor JSON-serialisable
    record_metrics(bundle_dir, {"recall@20": 0.25, "ndcg@20": cast(float, np.float32(0.125))})
    loaded = load_bundle(bundle_dir)
    assert loaded.manifest.metrics == {"recall@20": 0.25, "ndcg@20": 0.125}
    assert loaded.fingerprint == before
