"""Prometheus metrics of the service, all prefixed ``genret_``, in two registries.

``REGISTRY`` is what the public port's ``/metrics`` renders; ``ADMIN_REGISTRY`` holds what the admin
port's own requests and errors count (``genret_admin_*``), rendered only at ``/admin/metrics`` on the
admin port, so the public port says nothing about admin activity (routes, wrong tokens). Both are
module-level (one per process, like the process itself).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUEST_SECONDS = Histogram(
    "genret_request_duration_seconds",
    "End-to-end HTTP request duration.",
    ["route", "variant", "status"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "genret_stage_duration_seconds",
    "Duration of one retrieval stage: queue and total per request; cache, encode, search and rerank once "
    "per batch (search = the beam search or brute-force top-K; rerank = the beam's leaf items scored and cut "
    "to k). With the pipelined batcher, encode of one batch overlaps search of the previous one.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "genret_batch_size",
    "Requests computed together in one batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("genret_queue_depth", "Requests waiting for the batcher.", registry=REGISTRY)
INFLIGHT = Gauge(
    "genret_inflight_requests", "Retrieval requests accepted and not yet answered.", registry=REGISTRY
)
CACHE_RESULTS = Counter(
    "genret_cache_results_total",
    "Encoder-state cache lookups by result: hit, miss, invalid (a value the serving model cannot use: "
    "another bundle's, wrong shapes, damaged or unsigned; deleted and recomputed), error (Redis failed), "
    "breaker_open (Redis not asked).",
    ["result"],
    registry=REGISTRY,
)
CACHE_BREAKER_STATE = Gauge(
    "genret_cache_breaker_state",
    "The Redis circuit breaker: 0 closed (Redis used), 1 half-open (one probe out), 2 open (Redis not "
    "asked: every lookup a miss). 0 without Redis.",
    registry=REGISTRY,
)
ROW_FAILURES = Counter(
    "genret_row_failures_total",
    "Rows of a batch whose compute failed while their batch-mates were answered, by stage (encode, search) "
    "and outcome (recomputed: a fresh encode answered it; failed: answered with a 500).",
    ["stage", "outcome"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "genret_errors_total", "Requests answered with an error, by kind.", ["kind"], registry=REGISTRY
)
UNKNOWN_HISTORY_ITEMS = Counter(
    "genret_unknown_history_items_total",
    "History ids not in the model's vocabulary (skipped).",
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "genret_fallbacks_total", "Requests answered without the model, by reason.", ["reason"], registry=REGISTRY
)
ADMIN_REGISTRY = CollectorRegistry(auto_describe=True)
ADMIN_REQUEST_SECONDS = Histogram(
    "genret_admin_request_duration_seconds",
    "Admin API request duration (admin port only).",
    ["route", "status"],
    buckets=LATENCY_BUCKETS,
    registry=ADMIN_REGISTRY,
)
ADMIN_ERRORS = Counter(
    "genret_admin_errors_total",
    "Admin API requests answered with an error, by kind (admin port only).",
    ["kind"],
    registry=ADMIN_REGISTRY,
)
RELOADS = Counter("genret_reloads_total", "Bundle reload attempts by result.", ["result"], registry=REGISTRY)
MODEL_INFO = Gauge(
    "genret_model_info",
    "Loaded models (value 1) with their identity.",
    ["name", "version", "method", "device", "backend"],
    registry=REGISTRY,
)


def observe_public(route: str, variant: str, status: str, seconds: float) -> None:
    REQUEST_SECONDS.labels(route=route, variant=variant, status=status).observe(seconds)


def observe_admin(route: str, variant: str, status: str, seconds: float) -> None:
    ADMIN_REQUEST_SECONDS.labels(route=route, status=status).observe(seconds)


def render(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The exposition text of ``registry`` (default: the public one) and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
