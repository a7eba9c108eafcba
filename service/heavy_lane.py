"""The heavy lane: one worker thread for the Python work of large requests.

A request whose body is at least ``GENRET_HEAVY_BODY_BYTES`` is parsed and validated there
(:mod:`service.http.body`), and one whose ids (history, exclude, allow) number at least
``GENRET_HEAVY_REQUEST_IDS`` is mapped to dense ids there (:class:`service.engine.engine.Engine`).
Each such step is tens of milliseconds of Python for a maximal allow-list; on the event loop it
would hold up every other client's request for that long. In the lane, large requests wait for one
another (one at a time, in order) while the event loop keeps its turn: the interpreter hands the GIL
back to the loop's thread at least every switch interval (``GENRET_GIL_SWITCH_MS``).

That alone is not enough: a thread that releases the GIL around a C call (the compute thread at each
ONNX Runtime or numpy call, the loop at each socket wait) waits up to a switch interval to get it
back while the lane runs Python, so a busy lane slows every other request. The lane therefore keeps
to a share of the time while other requests are being answered: its work calls :func:`pace` between
short chunks, which then sleeps so that the lane runs at most ``GENRET_HEAVY_LANE_SHARE`` of the wall
time (set by :func:`configure`); with nothing else running, the lane runs at full speed. One C call
is not interrupted, which is why the work is chunked (a ``json.loads`` of 1 MB takes about 7 ms).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from prometheus_client import Counter, Gauge

from service.metrics import REGISTRY

T = TypeVar("T")

_LANE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genret-heavy")
_SHARE = [0.1]  # the lane's most share of the wall time while others are served (configure)
_OTHERS: list[Callable[[], bool]] = [lambda: True]  # whether other requests are being answered
_pacing = threading.local()  # in the lane's thread: when the running chunk began

HEAVY_WORK = Counter(
    "genret_heavy_lane_total",
    "Steps of large requests run in the heavy lane instead of on the event loop, by step "
    "(parse: body JSON and validation; map: ids to dense ids).",
    ["step"],
    registry=REGISTRY,
)
HEAVY_WAITING = Gauge(
    "genret_heavy_lane_waiting", "Steps queued for or running in the heavy lane.", registry=REGISTRY
)
HEAVY_SECONDS = Counter(
    "genret_heavy_lane_seconds_total",
    "Seconds from entering the heavy lane to leaving it (queue and work), by step.",
    ["step"],
    registry=REGISTRY,
)


def configure(share: float, others_busy: Callable[[], bool]) -> None:
    """While ``others_busy()``, the lane runs at most ``share`` (0 < share <= 1) of the wall time
    (``GENRET_HEAVY_LANE_SHARE``); ``others_busy`` is read from the lane's thread."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"the heavy lane's share must be in (0, 1], got {share}")
    _SHARE[0] = share
    _OTHERS[0] = others_busy


def pace() -> None:
    """Between two chunks of heavy work: in the lane, while other requests are being answered, sleep
    so that the chunk just done stays within the lane's share of the time; anywhere else (a small
    request on the loop), nothing."""
    began = getattr(_pacing, "began", None)
    if began is None:
        return
    ran = time.perf_counter() - began
    share = _pacing.share
    if share < 1.0 and _OTHERS[0]():
        time.sleep(ran * (1.0 - share) / share)
    _pacing.began = time.perf_counter()


def paced(fn: Callable[[], T], share: float | None = None) -> T:
    """``fn()`` on this thread with its :func:`pace` calls keeping it to ``share`` of the time while
    other requests are served (default: the heavy lane's); the catalogue thread runs its work so."""
    _pacing.began = time.perf_counter()
    _pacing.share = _SHARE[0] if share is None else share
    try:
        return fn()
    finally:
        pace()  # the last chunk's rest, before the next request's work
        _pacing.began = None


async def in_heavy_lane(step: str, fn: Callable[[], T]) -> T:
    """``fn()`` run in the heavy lane (paced, see :func:`pace`); its exception is raised here."""
    HEAVY_WORK.labels(step=step).inc()
    HEAVY_WAITING.inc()
    started = time.perf_counter()
    try:
        return await asyncio.get_running_loop().run_in_executor(_LANE, paced, fn)
    finally:
        HEAVY_WAITING.dec()
        HEAVY_SECONDS.labels(step=step).inc(time.perf_counter() - started)
