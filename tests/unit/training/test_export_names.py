"""Bundle names as the service accepts them (service.registry.model_registry.MODEL_NAME)."""

from __future__ import annotations

import pytest

from service.registry.model_registry import MODEL_NAME
from training.export.onnx_graphs import ExportError
from training.export.writer import served_name


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("uri-Beauty", "uri-beauty"),
        ("seater-ml-100k", "seater-ml-100k"),
        ("tdr-Amazon Beauty/2026", "tdr-amazon-beauty-2026"),
        ("..Weird__Name", "weird__name"),
        ("x" * 80, "x" * 64),
    ],
)
def test_served_name_is_a_valid_model_name(raw: str, want: str) -> None:
    got = served_name(raw)
    assert got == want
    assert MODEL_NAME.fullmatch(got)


def test_a_name_with_nothing_usable_is_refused() -> None:
    with pytest.raises(ExportError, match="no character"):
        served_name("../..")
