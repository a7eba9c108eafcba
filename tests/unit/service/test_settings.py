"""Settings: bounds, cross-field checks, environment prefix, unsafe defaults refused outside dev."""

from __future__ import annotations

from pathlib import Path

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


def test_experiment_variables_keep_their_names_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.experiments_file, s.experiments_check_s, s.shadow_log) == (None, 5.0, None)
    assert (s.shadow_log_max_bytes, s.shadow_log_backups) == (64 * 2**20, 3)
    assert (s.shadow_queue_size, s.shadow_timeout_s, s.shadow_max_age_s) == (64, 5.0, 2.0)
    monkeypatch.setenv("GENRET_EXPERIMENTS_FILE", "/etc/genret/exp.yaml")
    monkeypatch.setenv("GENRET_EXPERIMENTS_CHECK_S", "0")
    monkeypatch.setenv("GENRET_SHADOW_LOG", "")  # empty = unset (docker compose passes empty strings)
    monkeypatch.setenv("GENRET_SHADOW_LOG_MAX_BYTES", "2048")
    monkeypatch.setenv("GENRET_SHADOW_LOG_BACKUPS", "0")
    monkeypatch.setenv("GENRET_SHADOW_QUEUE_SIZE", "7")
    monkeypatch.setenv("GENRET_SHADOW_TIMEOUT_S", "0.5")
    monkeypatch.setenv("GENRET_SHADOW_MAX_AGE_S", "1.5")
    s = Settings()
    assert s.experiments_file == Path("/etc/genret/exp.yaml") and s.experiments_check_s == 0.0
    assert s.shadow_log is None and (s.shadow_log_max_bytes, s.shadow_log_backups) == (2048, 0)
    assert (s.shadow_queue_size, s.shadow_timeout_s, s.shadow_max_age_s) == (7, 0.5, 1.5)


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
        ({"experiments_check_s": -1}, "experiments_check_s"),
        ({"shadow_log_max_bytes": 1023}, "shadow_log_max_bytes"),
        ({"shadow_log_backups": 1001}, "shadow_log_backups"),
        ({"shadow_queue_size": 0}, "shadow_queue_size"),
        ({"shadow_timeout_s": 0}, "shadow_timeout_s"),
        ({"shadow_max_age_s": 3601}, "shadow_max_age_s"),
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
