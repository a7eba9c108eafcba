"""The serving side of the content tower: vectors from attributes, the file format and its checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.nets.content_tower import ARRAYS, ContentTower, ContentTowerError


def tower() -> ContentTower:
    rng = np.random.default_rng(0)
    return ContentTower(
        vocab=np.array(["brand-a", "12", "7"]),
        weight=rng.standard_normal((3, 4)).astype(np.float32),
        bias=rng.standard_normal(4).astype(np.float32),
        norm_weight=np.array([1.0, 2.0, -4.0], np.float32),
        norm_bias=np.array(3.0, np.float32),
    )


def at_norm(u: np.ndarray, n: float) -> np.ndarray:
    return u * (n / np.linalg.norm(u))


def test_vectors_point_along_the_vector_regression_at_the_predicted_norm() -> None:
    t = tower()
    got = t.vectors([["12"], ["7", "brand-a", "unknown"], ["12", "12", "7"], ["7"]])
    assert got.shape == (4, 4) and got.dtype == np.float32 and t.dim == 4
    w, b = t.weight, t.bias
    np.testing.assert_allclose(got[0], at_norm(b + w[1], 3 + 2), rtol=1e-5)
    np.testing.assert_allclose(got[1], at_norm(b + (w[2] + w[0]) / 2, 3 - 1.5), rtol=1e-5)  # unknown ignored
    np.testing.assert_allclose(got[2], at_norm(b + (w[1] + w[2]) / 2, 3 - 1), rtol=1e-5)  # repeats count once
    np.testing.assert_array_equal(got[3], 0.0)  # a negative predicted norm is clamped to 0
    assert t.vectors([]).shape == (0, 4)


def test_an_item_with_no_known_attribute_gets_no_vector() -> None:
    t = tower()
    assert t.has_known(["x", "7"]) and not t.has_known(["x"]) and not t.has_known([])
    with pytest.raises(ValueError, match=r"attribute_lists\[1\] holds no attribute"):
        t.vectors([["7"], ["x", "y"]])


def test_save_load_round_trip(tmp_path: Path) -> None:
    t = tower()
    t.save(tmp_path / "content.npz")
    back = ContentTower.load(tmp_path / "content.npz")
    assert back.vocab.tolist() == t.vocab.tolist()
    np.testing.assert_array_equal(back.weight, t.weight)
    np.testing.assert_array_equal(back.vectors([["12", "7"]]), t.vectors([["12", "7"]]))


def _write(path: Path, **arrays: np.ndarray) -> Path:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": np.zeros((2, 4), np.float32)}, r"weight is float32\[2, 4\], expected float32\[3, 4\]"),
        ({"weight": np.zeros((3, 4), np.float64)}, "weight is float64"),
        ({"bias": np.zeros(4, np.float64)}, "bias is float64"),
        ({"bias": np.full(4, np.nan, np.float32)}, "NaN"),
        ({"vocab": np.array(["a", "a", "b"])}, "duplicate"),
        ({"norm_weight": np.zeros(2, np.float32)}, r"norm_weight is float32\[2\], expected float32\[3\]"),
        ({"norm_bias": np.zeros(1, np.float32)}, r"norm_bias is float32\[1\], expected float32\[\]"),
        ({"norm_weight": np.array([1, np.inf, 0], np.float32)}, "infinite"),
        ({"vocab": np.array(["a", "b", None], dtype=object)}, "cannot read"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, change: dict[str, np.ndarray], message: str) -> None:
    t = tower()
    arrays = {k: getattr(t, k) for k in ARRAYS} | change
    path = _write(tmp_path / "content.npz", **arrays)
    with pytest.raises(ContentTowerError, match=message):
        ContentTower.load(path)


def test_missing_arrays_and_garbage_are_refused(tmp_path: Path) -> None:
    t = tower()
    with pytest.raises(ContentTowerError, match=r"missing arrays \['bias', 'norm_bias'\]"):
        ContentTower.load(
            _write(tmp_path / "a.npz", vocab=t.vocab, weight=t.weight, norm_weight=t.norm_weight)
        )
    (tmp_path / "b.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ContentTowerError, match="cannot read"):
        ContentTower.load(tmp_path / "b.npz")
