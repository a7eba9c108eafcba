"""Settings field group of the encoder-state cache: Redis, its breaker, the in-process LRU.

A mixin of :class:`service.settings.Settings` (the one settings class; its validators and the
Redis URL builder live there).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr


class CacheFields(BaseModel):
    """Redis connection, timeouts, TTL, breaker, local LRU, HMAC."""

    # --- cache ---
    redis_url: str | None = Field(
        default=None,
        description="redis[s]://[user:password@]host:port/db with credentials percent-escaped; or leave it "
        "unset and give redis_host etc.; neither = in-process LRU.",
    )
    redis_host: str | None = Field(default=None, description="Redis host (instead of redis_url).")
    redis_port: int = Field(default=6379, ge=1, le=65535, description="Redis port (with redis_host).")
    redis_db: int = Field(
        default=0, ge=0, le=1_000_000, description="Redis database number (with redis_host)."
    )
    redis_username: str | None = Field(default=None, description="Redis ACL user (with redis_host).")
    redis_password: SecretStr | None = Field(
        default=None, description="Redis password (with redis_host); any characters, escaped here."
    )
    redis_tls: bool = Field(default=False, description="Connect to redis_host over TLS (rediss://).")
    redis_ca_file: Path | None = Field(
        default=None, description="CA bundle that verifies the Redis server's certificate (with redis_tls)."
    )
    redis_timeout_ms: float = Field(
        default=50.0,
        ge=1.0,
        le=5000.0,
        description="Connect and socket timeout for Redis (no retries on the request path).",
    )
    redis_pool_size: int = Field(
        default=16, ge=1, le=1024, description="Redis connections in the blocking pool."
    )
    cache_ttl_s: int = Field(default=3600, ge=1, le=30 * 86_400, description="TTL of cached encoder states.")
    breaker_failures: int = Field(
        default=3, ge=1, le=1000, description="Consecutive Redis failures that open the breaker."
    )
    breaker_reset_s: float = Field(
        default=2.0,
        ge=0.01,
        le=3600.0,
        description="Seconds the breaker stays open before a half-open probe.",
    )
    local_cache_entries: int = Field(
        default=10_000,
        ge=0,
        le=10_000_000,
        description="Entries of the in-process LRU used without Redis (0 = no cache).",
    )
    cache_hmac_key: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="Key (at least 16 characters) of an HMAC-SHA256 over each cached value and its key; "
        "values without a valid tag are misses. Unset = values are checked for bundle and shapes only.",
    )
