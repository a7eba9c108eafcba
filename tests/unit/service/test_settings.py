"""Settings: bounds, cross-field checks, environment prefix, unsafe defaults refused outside dev."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import DEFAULT_ADMIN_TOKEN, Settings


def test_defaults_are_consistent_in_dev() -> None:
    s = Settings()
    assert s.env == "dev"
    assert s.min_beam_size <= s.default_beam_size <= s.max_beam_size
    assert s.admin_token.get_secret_value() == DEFAULT_ADMIN_TOKEN


def test_environment_variables_use_the_genret_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENRET_MAX_K", "77")
    monkeypatch.setenv("GENRET_SEARCH_MODE", "bruteforce")
    s = Settings()
    assert s.max_k == 77
    assert s.search_mode == "bruteforce"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"max_k": 0}, "max_k"),
        ({"queue_size": 0}, "queue_size"),
        ({"default_beam_size": 500, "max_beam_size": 100}, "default_beam_size"),
        ({"default_k": 50, "max_k": 10}, "default_k=50"),
        ({"default_deadline_ms": 5000, "max_deadline_ms": 1000}, "default_deadline_ms=5000"),
        ({"max_wait_ms": 100, "default_deadline_ms": 50}, "max_wait_ms=100"),
        ({"env": "prod"}, "admin_token"),
        ({"env": "prod", "admin_token": "short"}, "16 characters"),
    ],
)
def test_bad_values_are_refused_with_the_offending_field(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**overrides)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_prod_accepts_a_real_token() -> None:
    s = Settings(env="prod", admin_token="a-long-enough-secret-token")  # type: ignore[arg-type]
    assert s.env == "prod"


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"
