"""Service settings: one pydantic-settings class, read from ``GENRET_*`` environment variables.

Every field documents itself and carries its bounds; cross-field checks name the offending values.
Defaults fail closed: ``env`` defaults to ``prod``; without ``admin_token`` the admin API (its own
port) is off; ``/docs`` and ``debug`` answers are off in ``prod`` unless turned on explicitly.
The Redis URL is built here, in one place, with the credentials percent-escaped.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from urllib.parse import quote

from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.settings_cache import CacheFields
from service.settings_models import CatalogueFields, ModelFields
from service.settings_serving import BatchingFields, DeploymentFields, HttpFields, LimitFields
from service.settings_shadow import ShadowFields

MIN_ADMIN_TOKEN_CHARS = 16
# After the drain, uvicorn gets this long to close connections and the lifespan to stop the engine
# (server.py gives each the time left of the grace period, but at least this).
SHUTDOWN_CLOSE_S = 2.0


class Settings(
    DeploymentFields,
    HttpFields,
    ModelFields,
    CatalogueFields,
    LimitFields,
    BatchingFields,
    CacheFields,
    ShadowFields,
    BaseSettings,
):
    """Everything the service reads from its environment (prefix ``GENRET_``).

    The fields are declared in groups (``service/settings_serving.py``, ``settings_models.py``,
    ``settings_cache.py``, ``settings_shadow.py``); this class joins them and checks them together.
    """

    model_config = SettingsConfigDict(env_prefix="GENRET_", frozen=True, extra="forbid")

    @field_validator(
        "experiments_file",
        "shadow_log",
        "catalogue_dir",
        "admin_token",
        "redis_url",
        "redis_host",
        "redis_username",
        "redis_password",
        "cache_hmac_key",
        "redis_ca_file",
        "docs_enabled",
        "debug_responses",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # docker compose passes ``GENRET_EXPERIMENTS_FILE: ${GENRET_EXPERIMENTS_FILE:-}``: empty = unset
        return None if value == "" else value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_parse(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"{part!r} is not an IP address or CIDR") from None
        return value

    @property
    def trusted_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """``trusted_proxies`` parsed (service/http/guard.py asks these who the client is)."""
        return tuple(
            ip_network(p.strip(), strict=False) for p in self.trusted_proxies.split(",") if p.strip()
        )

    @property
    def docs_on(self) -> bool:
        return self.env != "prod" if self.docs_enabled is None else self.docs_enabled

    @property
    def debug_on(self) -> bool:
        return self.env != "prod" if self.debug_responses is None else self.debug_responses

    @property
    def shutdown_budget_s(self) -> float:
        """Longest time from SIGTERM to exit: the drain, then closing connections and the engine."""
        return self.shutdown_grace_s + 2 * SHUTDOWN_CLOSE_S

    def redis_connection_url(self) -> str | None:
        """The one place a Redis URL is built: ``redis_url`` as given, or one from the separate fields."""
        if self.redis_url is not None or self.redis_host is None:
            return self.redis_url
        user = quote(self.redis_username or "", safe="")
        password = (
            "" if self.redis_password is None else quote(self.redis_password.get_secret_value(), safe="")
        )
        auth = f"{user}:{password}@" if user or password else ""
        host = f"[{self.redis_host}]" if ":" in self.redis_host else self.redis_host
        scheme = "rediss" if self.redis_tls else "redis"
        query = (
            "" if self.redis_ca_file is None else "?ssl_ca_certs=" + quote(str(self.redis_ca_file), safe="")
        )
        return f"{scheme}://{auth}{host}:{self.redis_port}/{self.redis_db}{query}"

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.min_beam_size > self.max_beam_size or (
            self.default_beam_size is not None
            and not self.min_beam_size <= self.default_beam_size <= self.max_beam_size
        ):
            raise ValueError(
                "need min_beam_size <= default_beam_size <= max_beam_size, got "
                f"{self.min_beam_size} <= {self.default_beam_size} <= {self.max_beam_size}"
            )
        if self.default_k > self.max_k:
            raise ValueError(f"default_k={self.default_k} exceeds max_k={self.max_k}")
        if self.default_deadline_ms > self.max_deadline_ms:
            raise ValueError(
                f"default_deadline_ms={self.default_deadline_ms} exceeds max_deadline_ms={self.max_deadline_ms}"
            )
        if self.max_wait_ms >= self.default_deadline_ms:
            raise ValueError(
                f"max_wait_ms={self.max_wait_ms} must be below default_deadline_ms={self.default_deadline_ms}, "
                "or every request would expire while its batch forms"
            )
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(f"admin_token needs at least {MIN_ADMIN_TOKEN_CHARS} characters")
        if self.admin_token is not None and self.port != 0 and self.admin_port == self.port:
            raise ValueError(f"admin_port={self.admin_port} must differ from port={self.port}")
        if self.redis_url is not None and self.redis_host is not None:
            raise ValueError("give redis_url or redis_host (with its fields), not both")
        if self.redis_ca_file is not None and not self.redis_tls:
            raise ValueError(f"redis_ca_file={self.redis_ca_file} needs redis_tls=true")
        return self
