"""The shadow lane's JSONL log: one record per shadow run (schema 1), written by a background
thread into a rotating file, and read back by ``genret replay`` / ``genret experiment report``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import time
from collections.abc import Iterator, Mapping, Sequence
from logging.handlers import QueueListener, RotatingFileHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.shadow.agreement import Agreement, Ranked, ShadowJob


def request_to_json(request: Any, exclude: Sequence[str] = ()) -> Any:
    """A JSON-ready view of a request (pydantic model, dataclass or mapping) without the ``exclude`` fields."""
    if hasattr(request, "model_dump"):
        view = request.model_dump(mode="json", exclude_defaults=True)
    elif dataclasses.is_dataclass(request) and not isinstance(request, type):
        view = dataclasses.asdict(request)
    elif isinstance(request, Mapping):
        view = dict(request)
    else:
        return repr(request)
    return {k: v for k, v in view.items() if k not in exclude}


def _ms(seconds: float) -> float | None:
    return None if not math.isfinite(seconds) else round(seconds * 1000.0, 3)


def make_record(
    job: ShadowJob[Any],
    shadow: Ranked | None,
    agreement: Agreement | None,
    error: str | None,
    log_exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """One shadow-log line (schema 1); ``genret replay --log`` reads exactly these fields."""
    return {
        "schema": 1,
        "ts": round(time.time(), 3),
        "request_id": job.request_id,
        "experiment": job.experiment,
        "variant": job.variant,
        "user": job.user_hash,
        "k": job.k,
        "request": request_to_json(job.request, log_exclude),
        "primary": {
            "bundle": job.primary.bundle,
            "version": job.primary.version,
            "items": list(job.primary.items),
            "latency_ms": _ms(job.primary.latency_s),
        },
        "shadow": {
            "bundle": job.shadow_bundle,
            "version": shadow.version if shadow else None,
            "items": list(shadow.items) if shadow else [],
            "latency_ms": _ms(shadow.latency_s) if shadow else None,
            "error": error,
        },
        "agreement": dataclasses.asdict(agreement) if agreement else None,
    }


class ShadowLog:
    """Rotating JSONL file, written by a background thread (the event loop only enqueues a line)."""

    def __init__(self, path: str | Path, max_bytes: int = 64 * 2**20, backups: int = 3) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = QueueListener(self._queue, self._handler)
        self._listener.start()
        self._closed = False

    def write(self, record: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError(f"shadow log {self.path} is closed")
        line = json.dumps(record, separators=(",", ":"), allow_nan=False)
        self._queue.put(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO"}))

    def close(self) -> None:
        """Flush every queued line and close the file (idempotent)."""
        if not self._closed:
            self._closed = True
            self._listener.stop()
            self._handler.close()


def log_files(path: str | Path) -> list[Path]:
    """``path`` and its rotated files (``path.N``), oldest first."""
    path = Path(path)
    rotated = sorted(
        (p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    return [*rotated, *([path] if path.exists() else [])]


def read_records(path: str | Path, *, include_rotated: bool = False) -> Iterator[dict[str, Any]]:
    """The records of a shadow log, in write order; raises ValueError naming the bad line."""
    paths = log_files(path) if include_rotated else [Path(path)]
    for p in paths:
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{n}: not JSON: {exc.msg}") from None
                if not isinstance(record, dict) or "primary" not in record or "shadow" not in record:
                    raise ValueError(f"{p}:{n}: not a shadow record (needs 'primary' and 'shadow')")
                yield record
