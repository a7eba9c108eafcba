"""Service settings: one pydantic-settings class, read from ``GENRET_*`` environment variables.

Every field documents itself and carries its bounds; cross-field checks name the offending values.
Outside ``env=dev`` the default admin token is refused, so a deployment cannot ship it by accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ADMIN_TOKEN = "dev-admin-token"


class Settings(BaseSettings):
    """Everything the service reads from its environment (prefix ``GENRET_``)."""

    model_config = SettingsConfigDict(env_prefix="GENRET_", frozen=True, extra="forbid")

    # --- deployment ---
    env: Literal["dev", "test", "prod"] = Field(
        default="dev", description="Deployment environment; outside 'dev' unsafe defaults are refused."
    )
    host: str = Field(default="127.0.0.1", description="Address `genret serve` binds to.")
    port: int = Field(
        default=8000, ge=0, le=65535, description="Port `genret serve` binds to (0 = any free port)."
    )
    admin_token: SecretStr = Field(
        default=SecretStr(DEFAULT_ADMIN_TOKEN),
        description="Bearer token for /admin/*; the default is accepted only when env='dev'.",
    )
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0.5,
        le=600.0,
        description="On SIGTERM: seconds to finish queued and running requests.",
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
    decoder_backend: Literal["onnx"] = Field(
        default="onnx",
        description="Retriever backend for the encoder and decoder steps: ONNX Runtime, the only one a bundle "
        "can serve (the PyTorch reference needs the training modules).",
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

    # --- request limits ---
    default_k: int = Field(default=10, ge=1, le=10_000, description="k used when a request gives none.")
    max_k: int = Field(default=200, ge=1, le=10_000, description="Largest k a request may ask for.")
    default_beam_size: int = Field(
        default=20, ge=1, le=4096, description="Beam width used when a request gives none."
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
    max_batch_requests: int = Field(
        default=64, ge=1, le=4096, description="Most requests in one /v1/retrieve/batch."
    )
    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description="Largest request body in bytes (413 past it).",
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
        description="redis://host:port/db for the shared encoder-state cache; unset = in-process LRU.",
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

    # --- experiments and shadow traffic (service/experiments.py, service/shadow.py) ---
    experiments_file: Path | None = Field(
        default=None,
        description="YAML of A/B variants and shadow bundles (see service/experiments.py); "
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

    @field_validator("experiments_file", "shadow_log", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        # docker compose passes ``GENRET_EXPERIMENTS_FILE: ${GENRET_EXPERIMENTS_FILE:-}``: empty = unset
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if not self.min_beam_size <= self.default_beam_size <= self.max_beam_size:
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
        if self.env != "dev" and self.admin_token.get_secret_value() == DEFAULT_ADMIN_TOKEN:
            raise ValueError(f"env={self.env!r} refuses the default admin_token: set GENRET_ADMIN_TOKEN")
        if self.env != "dev" and len(self.admin_token.get_secret_value()) < 16:
            raise ValueError(f"env={self.env!r} needs an admin_token of at least 16 characters")
        return self
