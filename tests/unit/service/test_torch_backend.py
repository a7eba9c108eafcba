"""The service's ``decoder_backend="torch"`` (``genret serve --backend torch``): the registry's real
loader serves a torch-only bundle from its safetensors modules, and refuses the backend a bundle
holds no files for, naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from benchmarks.synthetic_bundle import make_synthetic_bundle
from models.bundle.manifest import BundleError
from service.registry.model_registry import load_model
from service.settings import Settings


@pytest.fixture(scope="module")
def torch_only_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "torch-only"
    return make_synthetic_bundle(out, 600, 4, 3, dim=16, backends=("torch",))


def test_torch_backend_serves_a_torch_only_bundle(torch_only_bundle: Path) -> None:
    model = load_model("m", torch_only_bundle, Settings(decoder_backend="torch", torch_threads=1))
    assert model.retriever.backend.name == "torch" and "torch" in model.retriever.device_info
    result = model.retriever.retrieve([np.array([1, 2, 3]), np.array([599])], k=5, beam_size=4)
    assert result.items.shape == (2, 5) and (result.items > 0).all()


def test_backend_without_files_and_unknown_backends_are_refused(torch_only_bundle: Path) -> None:
    with pytest.raises(BundleError, match="holds no onnx files"):
        load_model("m", torch_only_bundle, Settings(decoder_backend="onnx"))
    with pytest.raises(ValidationError, match="decoder_backend"):
        Settings(decoder_backend="tensorrt")  # type: ignore[arg-type]
