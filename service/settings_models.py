"""Settings field groups of the models: bundles, device and backend, the live catalogue.

Mixins of :class:`service.settings.Settings` (the one settings class; its validators live there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator


class ModelFields(BaseModel):
    """Which bundles serve, on which device and backend, and how they are reloaded."""

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


class CatalogueFields(BaseModel):
    """The live catalogue's delta log (docs/live_catalogue.md)."""

    # --- live catalogue (service/catalogue/) ---
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
        description="Build each model's catalogue (version 0) when it loads, before it serves or "
        "reports ready (the first add does not pay it; it shares the bundle's item table).",
    )
    max_delta_items: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="Most items added + removed by one delta; a delta file listing more is quarantined.",
    )
    catalogue_log: Literal["dir", "redis"] = Field(
        default="dir",
        description="Where replicas share the delta log: `dir` = numbered files in catalogue_dir (a volume "
        "every replica mounts), `redis` = a Redis Stream at catalogue_redis_url (docs/live_catalogue.md).",
    )
    catalogue_redis_url: SecretStr | None = Field(
        default=None,
        description="redis[s]://[user:password@]host:port/db of the catalogue stream (catalogue_log=redis); "
        "its own connection, apart from the encoder-state cache's. Its maxmemory-policy must not be "
        "allkeys-* (start-up refuses it: the stream would be evictable).",
    )
    catalogue_redis_timeout_ms: float = Field(
        default=2000.0,
        ge=10.0,
        le=60_000.0,
        description="Socket timeout of the catalogue stream's Redis connection (ms, 10..60000).",
    )
    catalogue_share: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Most share of the wall time the catalogue thread runs (reading, placing and "
        "applying deltas) while requests are being answered: it sleeps between chunks of its work so "
        "that the serving threads get the GIL back at once (service/heavy_lane.py).",
    )
    catalogue_async_items: int = Field(
        default=1000,
        ge=1,
        le=10_000_000,
        description="POST /admin/items with more ids than this answers 202 with a job once the delta is "
        "checked, and applies it on the catalogue thread (GET /admin/items/jobs/{job}); smaller ones "
        "answer 200 once live here.",
    )
    catalogue_max_file_bytes: int = Field(
        default=512 * 1_048_576,
        ge=1_048_576,
        le=8 * 1_073_741_824,
        description="Largest delta file a replica reads (bytes, 1 MiB..8 GiB); a larger one is quarantined "
        "unread (docs/live_catalogue.md). Vectors are base64 float32 in files: 100,000 items of 256 "
        "floats take about 140 MB.",
    )

    @model_validator(mode="after")
    def _check_catalogue_log(self) -> CatalogueFields:
        if self.catalogue_log == "redis" and self.catalogue_redis_url is None:
            raise ValueError("catalogue_log=redis needs catalogue_redis_url")
        return self
