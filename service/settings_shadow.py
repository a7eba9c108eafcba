"""Settings field group of experiments, the shadow lane and the quality monitor.

A mixin of :class:`service.settings.Settings` (the one settings class; its validators live there).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class ShadowFields(BaseModel):
    """A/B experiments file, shadow queue and log, quality sampling."""

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
    quality_max_items_per_s: float = Field(
        default=1_000_000.0,
        ge=0.0,
        description="Most items the quality monitor scores exactly per second, on average (0 = no bound): "
        'a sample past it is skipped (genret_quality_samples_total{result="budget"}). At 1M items '
        "about one sample a second; on a small catalogue the share alone decides.",
    )
