"""Large catalogue deltas accepted now and published later (docs/live_catalogue.md "Large deltas").

``POST /admin/items`` with more than ``GENRET_CATALOGUE_ASYNC_ITEMS`` ids answers ``202`` once the
delta is parsed and checked against the newest version (ids, vectors): a :class:`Job`. The
catalogue thread then applies it (placement), publishes it and installs it on this replica, as a
smaller delta is in the request itself. ``GET /admin/items/jobs/{job}`` says where it is:

* ``queued`` -> ``running`` -> ``live``: published as ``version`` and served here (the other
  replicas take it within a poll; every retrieval answer names the ``catalogue_version`` it used);
* ``refused``: it did not apply to the version it met when its turn came (another delta removed
  one of its items first): nothing was written, ``error`` names the field;
* ``failed``: it could not be written (the delta directory), nothing changed.

The version is given once the delta is published: its number is claimed only after it has applied
in full, so that no replica ever meets a number held for a delta that then fails. Jobs live in the
replica's memory (the last :data:`KEPT` finished ones), so the status is asked of the replica that
accepted it.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["queued", "running", "live", "refused", "failed"]
KEPT = 256  # finished jobs remembered per replica


@dataclass
class Job:
    """One accepted delta on its way to being published."""

    id: str
    model: str
    items: int  # ids added + removed
    base_version: int  # the catalogue version it was checked against when accepted
    state: State = "queued"
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result: dict[str, Any] = field(default_factory=dict)  # what POST /admin/items answers once live
    error: dict[str, str] = field(default_factory=dict)  # {"field", "msg"} once refused or failed

    def describe(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "model": self.model,
            "state": self.state,
            "items": self.items,
            "base_version": self.base_version,
            "submitted_at": self.submitted_at,
            "finished_at": self.finished_at,
            **self.result,
            **({"error": self.error} if self.error else {}),
        }


class Jobs:
    """The jobs of one replica (thread-safe: the catalogue thread updates, routes read)."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._guard = threading.Lock()
        self._counter = itertools.count(1)

    def new(self, model: str, items: int, base_version: int) -> Job:
        job = Job(f"{next(self._counter)}-{secrets.token_hex(4)}", model, items, base_version)
        with self._guard:
            self._jobs[job.id] = job
            done = [k for k, j in self._jobs.items() if j.finished_at is not None]
            for key in done[: max(0, len(done) - KEPT)]:
                del self._jobs[key]
        return job

    def get(self, job_id: str) -> Job | None:
        with self._guard:
            return self._jobs.get(job_id)

    def finish(
        self,
        job: Job,
        state: State,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
    ) -> None:
        with self._guard:
            job.result = result or {}
            job.error = error or {}
            job.finished_at = time.time()
            job.state = state
