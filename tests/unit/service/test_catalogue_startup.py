"""Version 0 of the live catalogue is built when a model loads, before it serves, and holds no copy
of the bundle's item table or id map until a delta adds items (service/catalogue/live.py,
docs/live_catalogue.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.catalogue.live import LiveCatalogue
from service.registry.model_registry import ModelRegistry
from service.settings import Settings

ITEMS = 120


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("bundles") / "small"
    return make_synthetic_bundle(out, ITEMS, 8, 2, dim=16, seed=0, num_layers=1, backends=("torch",))


def serving(bundle: Path, deltas: Path, prebuild: bool) -> tuple[ModelRegistry, LiveCatalogue]:
    settings = Settings(
        bundle_path=bundle, decoder_backend="torch", catalogue_dir=deltas, catalogue_prebuild=prebuild
    )
    registry = ModelRegistry(settings)
    live = LiveCatalogue(settings, registry)
    registry.load_all()
    return registry, live


def test_version_0_is_built_at_load_sharing_the_bundles_arrays(bundle: Path, tmp_path: Path) -> None:
    registry, live = serving(bundle, tmp_path, prebuild=True)
    model = registry.get()
    built = live._base.get(model.fingerprint)
    assert built is not None, "version 0 must exist before the model serves"
    assert live.catalogue_of(model) is built  # the first delta pays only itself
    emb = np.asarray(model.bundle.item_emb)
    assert np.shares_memory(built.item_emb, emb)  # no second item table
    assert built.dense_of is model.dense_of and built.item_ids is model.raw_ids  # one id map
    before = emb.copy()
    vector = np.random.default_rng(0).normal(size=16).tolist()
    live.add(None, {"add": [{"id": "new-1", "vector": vector}]})
    grown = live.catalogue_of(registry.get())
    assert not np.shares_memory(grown.item_emb, emb)  # the first added item copies the table
    np.testing.assert_array_equal(emb, before)  # and never writes the bundle's
    np.testing.assert_allclose(grown.item_emb[ITEMS + 1], vector, rtol=1e-6)
    assert "new-1" not in model.dense_of  # the shared id map of version 0 is untouched


def test_without_prebuild_the_first_delta_builds_it(bundle: Path, tmp_path: Path) -> None:
    registry, live = serving(bundle, tmp_path, prebuild=False)
    assert registry.get().fingerprint not in live._base
    out = live.add(None, {"remove": ["item001"]})
    assert out["version"] == 1 and registry.get().catalogue_version == 1


def test_on_the_cpu_a_grown_version_serves_from_the_catalogues_own_table(
    bundle: Path, tmp_path: Path
) -> None:
    """One item table in host memory after a delta adds items, not the catalogue's plus a copy."""
    registry, live = serving(bundle, tmp_path, prebuild=True)
    live.add(None, {"add": [{"id": f"n{i}", "vector": [0.1 * i] * 16} for i in range(3)]})
    model = registry.get()
    table = live.catalogue_of(model).item_emb
    assert model.retriever.item_emb.device.type == "cpu" and model.item_emb.shape[0] == ITEMS + 4
    assert np.shares_memory(model.retriever.item_emb.numpy(), table)
    found = model.retriever.retrieve([np.array([1, 2])], k=5, beam_size=4)  # it serves from it
    assert (found.items > 0).all()
