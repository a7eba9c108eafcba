"""Settings field groups of the serving edge: deployment, the HTTP server, request limits, batching.

Mixins of :class:`service.settings.Settings` (the one settings class; its validators live there).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr


class DeploymentFields(BaseModel):
    """Environment, addresses and ports, admin token, docs/debug switches, shutdown."""

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
        description="Answer `debug: true` with batch size, candidates and the queue wait (unset = on "
        "unless env='prod'); off, such a request gets 422. No debug field tells whether a cache entry exists "
        "(only the queue wait is timed); the response time itself still does: keep it off in prod.",
    )
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0.5,
        le=600.0,
        description="On SIGTERM: seconds to finish queued and running requests (the whole shutdown "
        "takes at most this plus a small fixed margin).",
    )


class HttpFields(BaseModel):
    """Connection timeouts and caps of the uvicorn server (service/http/guard.py)."""

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
    max_connections_per_client: int = Field(
        default=256,
        ge=1,
        le=1_000_000,
        description="Open connections from one client address per port (trusted proxies exempt); a "
        "connection past it is closed at once, so one client cannot take the whole max_connections.",
    )
    max_inflight_per_client: int = Field(
        default=256,
        ge=1,
        le=1_000_000,
        description="Requests of one client (behind a trusted proxy: the address it reports) being "
        "answered at once per port; past it 429 with Retry-After (kind client_limit).",
    )
    gil_switch_ms: float = Field(
        default=1.0,
        ge=0.1,
        le=100.0,
        description="sys.setswitchinterval in ms: how long a thread running Python (the heavy lane, the "
        "compute thread) may keep the interpreter before the event loop gets its turn (Python's default 5).",
    )
    trusted_proxies: str = Field(
        default="",
        description="Comma-separated addresses or CIDRs of proxies (ingress pods, load balancers) whose "
        "X-Forwarded-For names the client; their own connections are not capped per client. Empty = "
        "the peer address is the client (the k8s Service keeps pod source addresses).",
    )


class LimitFields(BaseModel):
    """What one request may ask for."""

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
    heavy_body_bytes: int = Field(
        default=65_536,
        ge=0,
        le=1024 * 1_048_576,
        description="Request bodies at least this large are parsed and validated in the heavy lane "
        "(one worker thread, service/heavy_lane.py) instead of on the event loop.",
    )
    heavy_lane_share: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Most share of the wall time the heavy lane runs (service/heavy_lane.py): it sleeps "
        "between chunks of work so that the threads serving other requests get the GIL back at once.",
    )
    heavy_request_ids: int = Field(
        default=4096,
        ge=1,
        le=10_000_000,
        description="Requests with at least this many history, exclude and allow ids together are heavy: "
        "mapped to dense ids in the heavy lane instead of on the event loop, and batched apart from "
        "lighter requests (the two kinds take turns, so a light request waits for at most one heavy batch).",
    )
    default_deadline_ms: int = Field(
        default=1000, ge=1, le=600_000, description="Request deadline when a request gives none."
    )
    max_deadline_ms: int = Field(
        default=30_000, ge=1, le=600_000, description="Largest deadline a request may ask for."
    )


class BatchingFields(BaseModel):
    """The dynamic batcher and its queue."""

    # --- batching ---
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Most requests computed together.")
    batch_work_budget: int = Field(
        default=100_000,
        ge=1,
        le=100_000_000,
        description="Most ids (history + exclude + allow, summed over rows) computed in one batch: a row "
        "that would take a batch past it waits for the next one, so one expensive row never holds up "
        "cheap batch-mates (a row over the budget on its own is computed alone).",
    )
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
