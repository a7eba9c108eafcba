"""The content tower fitted at export: it recovers a planted linear map, picks its penalty by
cross-validation, travels in the bundle (``content.npz`` checksummed, attributes in ``items.npz``)
and a corrupted one is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.bundle.attributes import ItemAttributes
from models.bundle.bundle import load_bundle
from models.bundle.manifest import BundleError, bundle_fingerprint, file_sha256
from tests.unit.models.conftest import DIM, MAX_HISTORY, NUM_ITEMS, build_tiny_model
from training.content_tower import ContentFitConfig, fit_content_tower
from training.data.formats import load_dataset
from training.export.spec import dataset_item_attributes
from training.export.writer import export_bundle

Planted = tuple[ItemAttributes, np.ndarray, np.ndarray, np.ndarray, list[list[str]]]


def planted(num_items: int, num_attrs: int, dim: int, noise: float, seed: int = 0) -> Planted:
    """Items with 1-4 attributes each and vectors ``bias + mean(W[attrs]) + noise``."""
    rng = np.random.default_rng(seed)
    rows: list[list[str]] = [[]]
    for _ in range(num_items):
        k = int(rng.integers(1, 5))
        rows.append([f"a{a}" for a in rng.choice(num_attrs, size=k, replace=False)])
    attrs = ItemAttributes.from_rows(rows, vocab=[f"a{a}" for a in range(num_attrs)])
    W = rng.standard_normal((num_attrs, dim))
    bias = rng.standard_normal(dim)
    emb = np.zeros((num_items + 1, dim), np.float32)
    for i in range(1, num_items + 1):
        idx = [int(a[1:]) for a in set(rows[i])]
        emb[i] = bias + W[idx].mean(axis=0) + noise * rng.standard_normal(dim)
    return attrs, emb, W, bias, rows


def test_recovers_a_planted_linear_map() -> None:
    attrs, emb, W, bias, _ = planted(num_items=600, num_attrs=30, dim=8, noise=0.01)
    fit = fit_content_tower(emb, attrs)
    assert fit is not None
    assert fit.report["cv_cosine"] > 0.99 and fit.report["lambda_relative"] <= 1e-2
    t = fit.tower
    # the map is identifiable up to a constant shared by all rows (each x sums to 1): compare
    # predictions, not raw weights; the direction is the linear map's, the norm is itself a ridge
    # (the norm of a mean is not linear in the attributes): close, not exact
    new = [["a3", "a7"], ["a11"], ["a0", "a1", "a29"]]
    want = np.stack([bias + W[[int(a[1:]) for a in r]].mean(axis=0) for r in new])
    got = t.vectors(new)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=0.25)


def test_pure_noise_targets_get_a_strong_penalty() -> None:
    attrs, _, _, _, _ = planted(num_items=400, num_attrs=30, dim=8, noise=0.0)
    emb = np.random.default_rng(1).standard_normal((401, 8)).astype(np.float32)  # unrelated to attrs
    fit = fit_content_tower(emb, attrs)
    assert fit is not None
    assert fit.report["lambda_relative"] >= 1.0  # shrinks towards the mean vector
    assert fit.report["cv_mse"] <= fit.report["cv_mse_mean"] * 1.02


def test_too_few_items_give_no_tower_and_the_vocabulary_is_capped() -> None:
    attrs, emb, _, _, _ = planted(num_items=8, num_attrs=5, dim=4, noise=0.0)
    assert fit_content_tower(emb, attrs) is None
    attrs, emb, _, _, _ = planted(num_items=300, num_attrs=30, dim=4, noise=0.0)
    fit = fit_content_tower(emb, attrs, ContentFitConfig(max_attributes=10))
    assert fit is not None and len(fit.tower.vocab) == 10 and fit.report["attributes"] == 10


def test_dataset_attributes_keep_the_raw_attribute_ids(tmp_path: Path) -> None:
    (tmp_path / "Shop.txt").write_text("1 1 2\n2 2 3\n")
    (tmp_path / "Shop_item2attributes.json").write_text(json.dumps({"1": [70, 9], "3": [9], "99": [4]}))
    ds = load_dataset(tmp_path / "Shop.txt", "seq")
    attrs = dataset_item_attributes(ds)
    assert attrs is not None and attrs.num_rows == ds.num_items + 1
    dense = {raw: ds.vocab.dense(raw) or 0 for raw in ("1", "2", "3")}
    assert sorted(attrs.attributes_of(dense["1"])) == ["70", "9"]
    assert attrs.attributes_of(dense["2"]) == [] and attrs.attributes_of(dense["3"]) == ["9"]
    assert attrs.items_with(["9"]).tolist() == sorted([dense["1"], dense["3"]])


@pytest.fixture(scope="module")
def attr_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    """The tiny model of tests/unit/models exported with planted attributes (torch files only: fast)."""
    tiny = build_tiny_model()
    attrs, emb, _, _, rows = planted(num_items=NUM_ITEMS, num_attrs=6, dim=DIM, noise=0.05)
    out = export_bundle(
        tmp_path_factory.mktemp("bundles") / "attrs",
        name="attrs",
        method="test",
        encoder=tiny.encoder,
        decoder=tiny.decoder,
        index=tiny.index,
        item_emb=emb,
        item_ids=tiny.item_ids,
        popularity=tiny.popularity,
        score_mode="logprob",
        max_history=MAX_HISTORY,
        metrics={},
        config={},
        dataset_fingerprint="attrs",
        backends=["torch"],
        item_attributes=attrs,
    )
    return out, rows


def test_bundle_carries_attributes_and_the_tower(attr_bundle: tuple[Path, list[list[str]]]) -> None:
    path, rows = attr_bundle
    b = load_bundle(path)
    assert b.item_attributes is not None and b.content is not None
    for i in range(NUM_ITEMS + 1):
        assert sorted(b.item_attributes.attributes_of(i)) == sorted(set(rows[i]))
    assert b.content.dim == DIM and b.manifest.files["content.npz"]["sha256"] == file_sha256(
        path / "content.npz"
    )
    assert b.manifest["content"]["items"] == NUM_ITEMS and b.manifest["content"]["cv_cosine"] > 0.9
    got = b.content.vectors([rows[5]])[0]
    cos = got @ b.item_emb[5] / np.linalg.norm(got) / np.linalg.norm(b.item_emb[5])
    assert cos > 0.9


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def _resign(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"], entry["bytes"] = file_sha256(path / name), (path / name).stat().st_size
    manifest["fingerprint"] = bundle_fingerprint({n: e["sha256"] for n, e in manifest["files"].items()})
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_corrupted_content_file_is_refused(
    attr_bundle: tuple[Path, list[list[str]]], tmp_path: Path
) -> None:
    path = _copy(attr_bundle[0], tmp_path)
    data = bytearray((path / "content.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "content.npz").write_bytes(data)
    with pytest.raises(BundleError, match=r"content\.npz sha256 .* does not match"):
        load_bundle(path)
    _resign(path)  # checksums pass: reading it must still fail, naming the file
    with pytest.raises(BundleError, match=r"content\.npz: "):
        load_bundle(path)


def test_a_content_file_of_the_wrong_width_is_refused(
    attr_bundle: tuple[Path, list[list[str]]], tmp_path: Path
) -> None:
    path = _copy(attr_bundle[0], tmp_path)
    with np.load(path / "content.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["weight"], arrays["bias"] = arrays["weight"][:, :3], arrays["bias"][:3]
    with (path / "content.npz").open("wb") as fh:
        np.savez(fh, **arrays)
    _resign(path)
    with pytest.raises(
        BundleError, match=r"content\.npz: vectors have width 3, the manifest's dims.query is"
    ):
        load_bundle(path)


def test_an_unlisted_content_file_is_refused_and_a_bundle_without_one_loads(
    attr_bundle: tuple[Path, list[list[str]]], tmp_path: Path
) -> None:
    path = _copy(attr_bundle[0], tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["content.npz"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    _resign(path)
    with pytest.raises(BundleError, match=r"content\.npz is present but manifest\.json does not list it"):
        load_bundle(path)
    (path / "content.npz").unlink()
    b = load_bundle(path)
    assert b.content is None and b.item_attributes is not None


def test_attribute_arrays_must_come_together(
    attr_bundle: tuple[Path, list[list[str]]], tmp_path: Path
) -> None:
    path = _copy(attr_bundle[0], tmp_path)
    with np.load(path / "items.npz") as data:
        arrays = {k: data[k] for k in data.files if k != "attr_values"}
    with (path / "items.npz").open("wb") as fh:
        np.savez(fh, **arrays)
    _resign(path)
    with pytest.raises(BundleError, match=r"items\.npz: has .* but not \['attr_values'\]"):
        load_bundle(path)
