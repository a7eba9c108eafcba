"""Run the public and the admin app under uvicorn, in one process and one event loop.

Start-up (``run``): the checks of ``service.startup`` (unknown ``GENRET_*`` variables, settings,
bundle path, ports) each end `genret serve` with one line on stderr and exit status 2. Both
sockets are bound before uvicorn starts. The admin app (``/admin/*``) listens on
``admin_host:admin_port`` only when ``admin_token`` is set.

Connections are guarded by ``service.http.guard`` (header/body read timeouts, connection cap).

Shutdown: on the first SIGTERM/SIGINT the engine starts draining (``/readyz`` turns false, new
requests get 503) while queued and running requests finish; the server exits once the engine is
idle or ``shutdown_grace_s`` has passed. Closing connections and stopping the engine then get the
time left of the grace period (at least ``SHUTDOWN_CLOSE_S`` each), so SIGTERM to exit takes at
most ``settings.shutdown_budget_s``; uploads still sending their body are cut at once. A second
signal exits at once. A drained exit returns status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI

from service.app import OneLineStartupError, create_admin_app, create_app
from service.http.guard import guarded_protocol
from service.settings import SHUTDOWN_CLOSE_S, Settings
from service.startup import (
    StartupError,
    bind,
    check_bundle_path,
    check_files_and_device,
    check_redis,
    load_settings,
)

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
            self._app.state.shutdown_deadline = self._drain_started + self._grace_s
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
                # uvicorn's wait for open connections gets what is left of the grace period
                self.config.timeout_graceful_shutdown = max(SHUTDOWN_CLOSE_S, self._grace_s - waited)  # type: ignore[assignment]
                self.should_exit = True
        return await super().on_tick(counter)


class AdminServer(uvicorn.Server):
    """The admin port's server: the public server owns the signals and tells this one to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: Any, settings: Settings, lifespan: Literal["on", "off"]) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=guarded_protocol(
            settings.header_timeout_s,
            settings.body_timeout_s,
            settings.max_connections,
            max_connections_per_client=settings.max_connections_per_client,
            max_inflight_per_client=settings.max_inflight_per_client,
            trusted=settings.trusted_networks,
            retry_after_s=settings.retry_after_s,
        ),
        log_level="info",
        access_log=False,
        timeout_keep_alive=settings.keepalive_timeout_s,
        timeout_graceful_shutdown=int(max(1, settings.shutdown_grace_s)),
        lifespan=lifespan,
    )


async def serve_both(
    public: DrainingServer,
    public_sock: socket.socket,
    admin: AdminServer | None,
    admin_sock: socket.socket | None,
) -> None:
    if admin is None or admin_sock is None:
        await public.serve(sockets=[public_sock])
        return

    async def stop_admin_with_public() -> None:
        while not public.should_exit:  # the drain is over: the admin port closes alongside
            await asyncio.sleep(0.1)
        admin.should_exit = True

    admin_task = asyncio.create_task(admin.serve(sockets=[admin_sock]))
    watcher = asyncio.create_task(stop_admin_with_public())
    try:
        await public.serve(sockets=[public_sock])
    finally:
        watcher.cancel()
        admin.should_exit = True
        await admin_task


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def serve(settings: Settings) -> int:
    """Bind both ports, then serve until shut down; raises :class:`StartupError` on a busy port."""
    public_sock = bind(settings.host, settings.port, "port")
    admin_sock = None
    if settings.admin_token is not None:
        try:
            admin_sock = bind(settings.admin_host, settings.admin_port, "admin_port")
        except StartupError:
            public_sock.close()
            raise
    sys.setswitchinterval(settings.gil_switch_ms / 1000.0)
    app = create_app(settings)
    wrapped = OneLineStartupError(app)
    public = DrainingServer(uvicorn_config(wrapped, settings, "on"), app, settings.shutdown_grace_s)
    admin = None
    if admin_sock is not None:
        admin = AdminServer(uvicorn_config(create_admin_app(settings, app), settings, "off"))
        admin.config.timeout_graceful_shutdown = int(SHUTDOWN_CLOSE_S)  # within the shutdown budget
    log.info(
        "public API on %s; admin API %s",
        address(public_sock),
        "off (GENRET_ADMIN_TOKEN is not set)" if admin_sock is None else f"on {address(admin_sock)}",
    )
    runner = asyncio.Runner(loop_factory=public.config.get_loop_factory())
    quiet = StartupFailedFilter()
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        runner.run(serve_both(public, public_sock, admin, admin_sock))
    except SystemExit as exc:  # uvicorn exits this way when the app's startup fails
        if wrapped.failure is not None:
            raise StartupError(wrapped.failure) from None
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
        runner.close()
    return 0


class StartupFailedFilter(logging.Filter):
    """Drops uvicorn's own "Application startup failed. Exiting." line: `genret serve` prints the
    cause instead, as the one line of a start-up mistake."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Application startup failed. Exiting."


def run(overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> int:
    """`genret serve`: the start-up checks, then :func:`serve`; a mistake is one line on stderr, status 2."""
    try:
        settings = load_settings(overrides, os.environ if environ is None else environ)
        check_bundle_path(settings)
        check_redis(settings)
        check_files_and_device(settings)
        return serve(settings)
    except StartupError as exc:
        print(f"genret serve: {exc}", file=sys.stderr, flush=True)
        return 2
