"""Run the app under uvicorn with a draining shutdown.

On the first SIGTERM/SIGINT the engine starts draining (``/readyz`` turns false, new requests get
503) while queued and running requests finish; uvicorn is told to exit once the engine is idle or
the grace period has passed. A second signal exits at once. A drained exit returns status 0.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._grace_s = grace_s
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started is None and sig in (signal.SIGTERM, signal.SIGINT):
            log.info("signal %d: draining for up to %.1fs", sig, self._grace_s)
            self._drain_started = time.monotonic()
            engine = getattr(self._app.state, "engine", None)
            if engine is not None:
                engine.begin_drain()  # a flag: safe here, the handler runs on the loop's thread
            return
        self.should_exit = True
        self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            engine = getattr(self._app.state, "engine", None)
            if engine is not None:
                engine.begin_drain()
            waited = time.monotonic() - self._drain_started
            if engine is None or engine.idle or waited >= self._grace_s:
                if waited >= self._grace_s:
                    log.warning("grace period of %.1fs over with requests still running", self._grace_s)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: Settings) -> int:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=int(max(1, settings.shutdown_grace_s)),
        lifespan="on",
    )
    DrainingServer(config, app, settings.shutdown_grace_s).run()
    return 0
