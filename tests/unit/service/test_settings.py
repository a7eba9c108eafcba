"""Settings: bounds, cross-field checks, environment prefix, fail-closed defaults, the Redis URL
built in one place, and the start-up checks of service/startup.py (unknown variables, one-line errors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.asyncio.connection import parse_url

from service.settings import Settings
from service.startup import StartupError, check_environment, known_variables, load_settings

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "a-long-enough-secret-token"


def test_defaults_fail_closed() -> None:
    s = Settings()
    assert s.env == "prod"
    assert s.min_beam_size <= s.max_beam_size
    assert s.default_beam_size is None  # each bundle's own default beam unless set
    assert s.admin_token is None  # no token: the admin API is not served at all
    assert (s.port, s.admin_port) == (8000, 8081)
    assert not s.docs_on and not s.debug_on
    dev = Settings(env="dev")
    assert dev.docs_on and dev.debug_on and dev.admin_token is None
    assert Settings(env="dev", docs_enabled=False).docs_on is False
    assert Settings(debug_responses=True).debug_on is True


def test_server_limits_default_to_safe_values() -> None:
    s = Settings()
    assert 0 < s.header_timeout_s <= 10
    assert 0 < s.body_timeout_s <= 30
    assert s.keepalive_timeout_s > 0
    assert s.max_connections >= 256
    assert s.shutdown_budget_s > s.shutdown_grace_s


@pytest.mark.parametrize("password", ["p@ss/word", "a:b@c/d?e#f%g h", "plain"])
def test_redis_url_escapes_the_credentials(password: str) -> None:
    s = Settings(redis_host="cache.internal", redis_port=6380, redis_db=2, redis_password=password)  # type: ignore[arg-type]
    url = s.redis_connection_url()
    assert url is not None and url.startswith("redis://")
    parsed = parse_url(url)
    assert (parsed["password"], parsed["host"], parsed["port"], parsed["db"]) == (
        password,
        "cache.internal",
        6380,
        2,
    )


def test_redis_tls_with_a_ca_file_and_a_user() -> None:
    s = Settings(
        redis_host="10.0.0.7",
        redis_username="genret@svc",
        redis_password="x/y",  # type: ignore[arg-type]
        redis_tls=True,
        redis_ca_file=Path("/etc/ssl/redis ca.pem"),
    )
    url = s.redis_connection_url()
    assert url is not None and url.startswith("rediss://")
    parsed = parse_url(url)
    assert (parsed["username"], parsed["password"]) == ("genret@svc", "x/y")
    assert parsed["ssl_ca_certs"] == "/etc/ssl/redis ca.pem"  # type: ignore[typeddict-item]
    assert Settings().redis_connection_url() is None
    assert Settings(redis_url="redis://h:1/0").redis_connection_url() == "redis://h:1/0"


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
        ({"admin_token": "short"}, "16 characters"),
        ({"admin_token": TOKEN, "admin_port": 8000}, "admin_port=8000 must differ from port=8000"),
        ({"redis_url": "redis://a:1/0", "redis_host": "b"}, "not both"),
        ({"redis_host": "b", "redis_ca_file": "/ca.pem"}, "redis_ca_file=/ca.pem needs redis_tls"),
        ({"header_timeout_s": 0}, "header_timeout_s"),
        ({"max_connections": 0}, "max_connections"),
        ({"env": "staging"}, "env"),
        ({"experiments_check_s": -1}, "experiments_check_s"),
        ({"shadow_log_max_bytes": 1023}, "shadow_log_max_bytes"),
        ({"shadow_log_backups": 1001}, "shadow_log_backups"),
        ({"shadow_queue_size": 0}, "shadow_queue_size"),
        ({"shadow_timeout_s": 0}, "shadow_timeout_s"),
        ({"shadow_max_age_s": 3601}, "shadow_max_age_s"),
        ({"trusted_proxies": "10.0.0.0/8, ingress"}, "'ingress' is not an IP address or CIDR"),
        ({"max_connections_per_client": 0}, "max_connections_per_client"),
        ({"max_inflight_per_client": 0}, "max_inflight_per_client"),
    ],
)
def test_bad_values_are_refused_with_the_offending_field(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**overrides)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_prod_accepts_a_real_token_and_empty_means_unset() -> None:
    s = Settings(env="prod", admin_token=TOKEN)  # type: ignore[arg-type]
    assert s.admin_token is not None and s.admin_token.get_secret_value() == TOKEN
    assert Settings(admin_token="").admin_token is None  # type: ignore[arg-type]  # compose passes ""


def test_unknown_variables_are_refused_with_the_closest_name() -> None:
    with pytest.raises(StartupError, match="GENRET_MAX_KK; did you mean GENRET_MAX_K\\?"):
        check_environment({"GENRET_MAX_KK": "3", "PATH": "/bin"})
    with pytest.raises(StartupError, match="GENRET_ADMIN_TOKN; did you mean GENRET_ADMIN_TOKEN"):
        check_environment({"GENRET_ADMIN_TOKN": "x"})
    check_environment({"GENRET_MAX_K": "3", "GENRET_CACHE_DIR": "/tmp", "HOME": "/root"})


def test_every_genret_variable_read_in_the_code_is_known() -> None:
    """Variables read outside Settings (os.environ / getenv) must be known names, not refused typos."""
    read = set()
    for package in ("models", "training", "service", "scripts"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(errors="replace")
            read |= set(re.findall(r"(?:environ\.get|getenv|environ\[)\(?\s*[\"'](GENRET_[A-Z0-9_]+)", text))
    assert "GENRET_CACHE_DIR" in read  # the pattern finds the trainer's variable
    assert read <= known_variables(), read - known_variables()


def test_startup_errors_are_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENRET_MAX_K", "0")
    with pytest.raises(StartupError) as info:
        load_settings({"bundle_path": "/b"}, {"GENRET_MAX_K": "0"})
    message = str(info.value)
    assert "\n" not in message and message.startswith("GENRET_MAX_K=0:")
    monkeypatch.setenv("GENRET_MAX_K", "10")
    with pytest.raises(StartupError) as info:
        load_settings({"default_k": 50}, {"GENRET_MAX_K": "10"})
    assert "default_k=50 exceeds max_k=10" in str(info.value)


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"


def test_trusted_proxies_parse_into_networks() -> None:
    got = Settings(trusted_proxies="10.0.0.0/8, 127.0.0.3 ,fd00::/8").trusted_networks
    assert [str(n) for n in got] == ["10.0.0.0/8", "127.0.0.3/32", "fd00::/8"]
    assert Settings().trusted_networks == ()
