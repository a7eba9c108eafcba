"""Service settings: one pydantic-settings class, read from ``GENRET_*`` environment variables.

Every field documents itself and carries its bounds; cross-field checks name the offending values.
Defaults fail closed: ``env`` defaults to ``prod``; without ``admin_token`` the admin API (its own
port) is off; ``/docs`` and ``debug`` answers are off in ``prod`` unless turned on explicitly.
The Redis URL is built here, in one place, with the credentials percent-escaped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_ADMIN_TOKEN_CHARS = 16
# After the drain, uvicorn gets this long to close connections and the lifespan to stop the engine
# (server.py gives each the time left of the grace period, but at least this).
SHUTDOWN_CLOSE_S = 2.0


class Settings(BaseSettings):
    """Everything the service reads from its environment (prefix ``GENRET_``)."""

    model_config = SettingsConfigDict(env_prefix="GENRET_", frozen=True, extra="forbid")

    # --- deployment ---
    env: Literal["dev", "test", "prod"] = Field(
        default="prod",
        description="Deployment environment; 'prod' (the default) turns /docs and debug answers off.",
    )
    host: str = Field(default="127.0.0.1", description="Address the public API binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port of the public API (0 = any free port).")
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for /admin/* (at least 16 characters); unset or empty = admin API off.",
    )
    admin_host: str = Field(
        default="127.0.0.1",
        description="Address the admin API binds to; loopback keeps it to `kubectl port-forward`/exec.",
    )
    admin_port: int = Field(
        default=8081, ge=0, le=65535, description="Port of the admin API, apart from the public one."
    )
    docs_enabled: bool | None = Field(
        default=None, description="Serve /docs and /openapi.json (unset = on unless env='prod')."
    )
    debug_responses: bool | None = Field(
        default=None,
        description="Answer `debug: true` with batch size, candidates and batch-level timings (unset = on "
        "unless env='prod'); off, such a request gets 422. No debug field tells whether a cache entry exists.",
    )
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0.5,
        le=600.0,
        description="On SIGTERM: seconds to finish queued and running requests (the whole shutdown "
        "takes at most this plus a small fixed margin).",
    )

    # --- HTTP server (uvicorn, service/http/guard.py) ---
    header_timeout_s: float = Field(
        default=10.0,
        ge=0.1,
        le=120.0,
        description="A connection must deliver a request's complete headers within this many seconds "
        "of opening or of the previous response (else 408 and close).",
    )
    body_timeout_s: float = Field(
        default=30.0,
        ge=0.1,
        le=600.0,
        description="A request's complete body must arrive within this many seconds after its headers "
        "(else the connection is closed).",
    )
    keepalive_timeout_s: int = Field(
        default=5,
        ge=1,
        le=600,
        description="An idle keep-alive connection is closed after this many seconds.",
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Open connections (or running requests) per port; past it a request gets 503.",
    )

    # --- models ---
    bundle_path: Path | None = Field(
        default=None,
        description="A bundle directory, or a directory whose subdirectories are bundles (served by name).",
    )
    default_model: str | None = Field(
        default=None,
        description="Model served when a request names none; defaults to the only/first one loaded.",
    )
    device: str = Field(default="cpu", description="Torch / ONNX Runtime device, e.g. 'cpu' or 'cuda:0'.")
    decoder_backend: Literal["onnx", "torch"] = Field(
        default="onnx",
        description="Retriever backend for the encoder and decoder steps: 'onnx' (ONNX Runtime; CUDA provider "
        "with IO binding on cuda devices, needs onnxruntime-gpu) or 'torch' (the modules rebuilt from the "
        "bundle's weights.safetensors + modules.json, tensors on `device`); the bundle must hold its files.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="torch.set_num_threads for the search and rerank tensors (None = torch's default). "
        "On a small shared CPU, 1 avoids threads spinning against each other.",
    )
    intra_op_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="ONNX Runtime intra-op threads per session (None = its default).",
    )
    search_mode: Literal["generative", "bruteforce"] = Field(
        default="generative",
        description="'generative': beam search over the index trie then rerank; "
        "'bruteforce': encode then exact inner-product top-K over the whole item table (baseline).",
    )
    reload_poll_s: float = Field(
        default=0.0,
        ge=0.0,
        le=3600.0,
        description="Poll the bundle path for new versions every N seconds (0 = off).",
    )
    catalogue_dir: Path | None = Field(
        default=None,
        description="Where the catalogue deltas live: `{dir}/{bundle dir name}.deltas/` (docs/live_catalogue.md); "
        "a volume every replica mounts. Unset = beside each bundle (its parent directory).",
    )
    catalogue_poll_s: float = Field(
        default=2.0,
        ge=0.0,
        le=3600.0,
        description="Apply deltas other replicas wrote every N seconds (0 = only this replica's own).",
    )
    catalogue_prebuild: bool = Field(
        default=True,
        description="Build each model's catalogue in the background at startup (the first add "
        "does not pay it; memory: a copy of the item table with spare rows).",
    )
    max_delta_items: int = Field(
        default=100_000, ge=1, le=10_000_000, description="Most items added + removed by one delta."
    )

    # --- request limits ---
    default_k: int = Field(default=10, ge=1, le=10_000, description="k used when a request gives none.")
    max_k: int = Field(default=200, ge=1, le=10_000, description="Largest k a request may ask for.")
    default_beam_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Beam width used when a request gives none; unset = each bundle's own default "
        "(manifest config.beam_size, the catalogue rule of models/search/beam_policy.py).",
    )
    min_beam_size: int = Field(
        default=1, ge=1, le=4096, description="Smallest beam width a request may ask for."
    )
    max_beam_size: int = Field(
        default=256, ge=1, le=4096, description="Largest beam width a request may ask for."
    )
    max_history_items: int = Field(
        default=2000,
        ge=1,
        le=100_000,
        description="Most history items accepted in one request (before truncation).",
    )
    max_exclude_items: int = Field(
        default=2000, ge=0, le=100_000, description="Most ids in one request's `exclude`."
    )
    max_allow_items: int = Field(
        default=100_000, ge=0, le=10_000_000, description="Most ids in one request's `allow`."
    )
    max_batch_requests: int = Field(
        default=64, ge=1, le=4096, description="Most requests in one /v1/retrieve/batch."
    )
    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description="Largest request body in bytes (413 past it).",
    )
    max_admin_body_bytes: int = Field(
        default=64 * 1_048_576,
        ge=1024,
        le=1024 * 1_048_576,
        description="Largest admin request body (bytes).",
    )
    default_deadline_ms: int = Field(
        default=1000, ge=1, le=600_000, description="Request deadline when a request gives none."
    )
    max_deadline_ms: int = Field(
        default=30_000, ge=1, le=600_000, description="Largest deadline a request may ask for."
    )

    # --- batching ---
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Most requests computed together.")
    max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=10_000.0,
        description="How long the batcher waits to fill a batch after its first request.",
    )
    pipeline: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Encode the next batch (cache lookup + encoder) on its own thread while the current "
        "one is searched ('auto': on when the process may use >= 2 CPU cores; 'off': encode and search "
        "of a batch run in turn on the compute thread).",
    )
    queue_size: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Requests waiting for the batcher; past it requests get 429.",
    )
    retry_after_s: int = Field(
        default=1, ge=1, le=3600, description="Retry-After header value sent with 429."
    )

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

    # --- experiments and shadow traffic (service/shadow/experiments.py, service/shadow/lane.py) ---
    experiments_file: Path | None = Field(
        default=None,
        description="YAML of A/B variants and shadow bundles (see service/shadow/experiments.py); "
        "unset or empty = no experiment.",
    )
    experiments_check_s: float = Field(
        default=5.0,
        ge=0.0,
        le=3600.0,
        description="Seconds between checks of the experiment file for edits (0 = check on every request).",
    )
    shadow_log: Path | None = Field(
        default=None,
        description="JSONL file of shadowed requests with both answers; unset or empty = metrics only.",
    )
    shadow_log_max_bytes: int = Field(
        default=64 * 2**20,
        ge=1024,
        le=2**40,
        description="Size in bytes at which the shadow log is rotated.",
    )
    shadow_log_backups: int = Field(default=3, ge=0, le=1000, description="Rotated shadow log files kept.")
    shadow_queue_size: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Shadow copies waiting to run; past it new copies are dropped (counted).",
    )
    shadow_timeout_s: float = Field(
        default=5.0, ge=0.01, le=600.0, description="Seconds one shadow copy may run before it is abandoned."
    )
    shadow_max_age_s: float = Field(
        default=2.0,
        ge=0.01,
        le=3600.0,
        description="A shadow copy waiting longer than this for spare capacity is dropped.",
    )
    quality_sample: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Share of primary requests also run as exact inner-product top-K in the shadow lane "
        "(service/shadow/quality_monitor.py: genret_quality_overlap / _beam_coverage per model); 0 = off.",
    )

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
