"""App factories and lifespan: load + warm bundles, start the batcher, stop gracefully.

``create_app(settings)`` returns the public FastAPI app; the engine is built in its lifespan
(bundles are loaded off the event loop) and stored on ``app.state.engine``. On shutdown the engine
drains: new requests get 503, queued and running ones finish within the time left of
``shutdown_grace_s``. ``create_admin_app(settings, app)`` returns the admin app (``/admin/*``),
served on its own port and sharing the public app's state (engine, settings); it has no lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import heavy_lane
from service.cache.state_cache import CircuitBreaker, LocalCache, NoCache, RedisCache, StateCache
from service.catalogue.live import LiveCatalogue
from service.engine.engine import Engine
from service.engine.request_map import DEFAULT_VARIANT
from service.engine.request_map import user_key as experiment_user_key
from service.errors import PayloadTooLarge, error_response, install_error_handlers
from service.http.body import document_bodies
from service.http.routes import admin_router, router
from service.metrics import ADMIN_ERRORS, ERRORS, observe_admin, observe_public
from service.registry.model_registry import ModelRegistry
from service.schemas import BatchRetrieveRequest, RetrieveRequest
from service.settings import SHUTDOWN_CLOSE_S, Settings
from service.shadow.agreement import Ranked
from service.shadow.experiments import ExperimentHooks, ranked_from_result, router_from_settings
from service.shadow.quality_monitor import QualityMonitor

log = logging.getLogger(__name__)


class ServiceMiddleware:
    """Pure ASGI: refuse bodies over ``max_body_bytes`` (413) and time every request by route, variant, status."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, admin: bool = False) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # the admin port counts in its own registry (service/metrics.py): nothing of it on public /metrics
        self.observe = observe_admin if admin else observe_public
        self.errors = ADMIN_ERRORS if admin else ERRORS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            receive = await self._limited(scope, receive)
        except PayloadTooLarge as exc:
            await error_response(exc, self.errors)(scope, receive, send_and_record)
        else:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            self.observe(
                getattr(route, "path", "unmatched"),
                scope.get("state", {}).get("variant", DEFAULT_VARIANT),
                str(status),
                time.perf_counter() - started,
            )

    async def _limited(self, scope: Scope, receive: Receive) -> Receive:
        """Check Content-Length, or read a body without one up to the limit and replay it."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                size = 0  # malformed header: leave it to the server / body parser
            if size > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"request body of {size} bytes exceeds max_body_bytes={self.max_body_bytes}"
                )
            return receive
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body_bytes:
                raise PayloadTooLarge(f"request body exceeds max_body_bytes={self.max_body_bytes}")
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay


class OneLineStartupError:
    """Pure ASGI around the app: a failed lifespan startup is kept as one line in ``failure``.

    Starlette sends the whole traceback as the ``lifespan.startup.failed`` message; what is kept is the
    exception's type and message on one line (e.g. ``BadBundle: bundle 'x' at ... refused: ...``).
    Uvicorn is sent no message to log: ``service.server`` prints ``failure`` as the one line of a
    start-up mistake (exit status 2).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.failure: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_short(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                self.failure = "application start-up failed"
                message = {**message, "message": ""}
            await send(message)

        try:  # Starlette sends startup.failed, then re-raises: uvicorn logs nothing after startup.failed
            await self.app(scope, receive, send_short)
        except BaseException as exc:
            if self.failure is not None:
                self.failure = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            raise


def make_cache(settings: Settings) -> StateCache:
    secret = settings.cache_hmac_key
    hmac_key = None if secret is None else secret.get_secret_value().encode()
    url = settings.redis_connection_url()
    if url:
        return RedisCache(
            url,
            ttl_s=settings.cache_ttl_s,
            timeout_s=settings.redis_timeout_ms / 1000.0,
            pool_size=settings.redis_pool_size,
            breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s),
            hmac_key=hmac_key,
        )
    if settings.local_cache_entries > 0:
        return LocalCache(settings.local_cache_entries, hmac_key=hmac_key)
    return NoCache()


def wire_experiment(hooks: ExperimentHooks, engine: Engine) -> None:
    """Check the experiment names only loaded bundles, shadow sampled primary answers, and start its
    shadow lane on the engine's staged shadow runs."""
    for bundle in hooks.source.router().config.bundles:
        engine.registry.get(bundle)  # UnknownModel at startup, not on the first request
    engine.registry.keep_loaded(lambda: hooks.source.router().config.bundles)  # a reload may not drop them
    engine.on_primary_result(hooks.maybe_shadow)

    async def run_shadow(request: RetrieveRequest) -> Ranked:
        started = time.perf_counter()
        result = await engine.run_shadow(request)
        return ranked_from_result(result, time.perf_counter() - started)

    hooks.start_lane(run_shadow, lambda: engine.batcher.idle)


def grace_left(app: FastAPI, settings: Settings) -> float:
    """Seconds the engine may still take to stop: what the drain (server.py) left, at least a little."""
    deadline: float | None = getattr(app.state, "shutdown_deadline", None)
    if deadline is None:
        return settings.shutdown_grace_s
    return max(SHUTDOWN_CLOSE_S, deadline - time.monotonic())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        registry = ModelRegistry(settings)
        # every load builds version 0 of the catalogue and applies the bundle's deltas, before
        # /readyz answers ready (docs/live_catalogue.md: no start-up build competing with requests)
        catalogue = LiveCatalogue(settings, registry)
        await asyncio.to_thread(registry.load_all)
        cache = make_cache(settings)
        hooks = router_from_settings(settings)
        engine = Engine(settings, registry, cache, router=hooks, assignment_key=experiment_user_key)
        heavy_lane.configure(settings.heavy_lane_share, lambda: engine.light_inflight > 0)
        if hooks is not None:
            wire_experiment(hooks, engine)
        monitor = QualityMonitor(
            engine, settings.quality_sample, max_items_per_s=settings.quality_max_items_per_s
        )
        engine.start()
        monitor.start()
        app.state.engine = engine
        app.state.catalogue = catalogue
        poller = (
            asyncio.create_task(catalogue.poll(settings.catalogue_poll_s))
            if settings.catalogue_poll_s > 0
            else None
        )
        watcher = (
            asyncio.create_task(registry.watch(settings.reload_poll_s))
            if settings.reload_poll_s > 0
            else None
        )
        log.info(
            "ready: models=%s device=%s backend=%s mode=%s cache=%s",
            registry.names(),
            settings.device,
            settings.decoder_backend,
            settings.search_mode,
            cache.status(),
        )
        try:
            yield
        finally:
            for task in (watcher, poller):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if hooks is not None:
                await hooks.aclose()
            await monitor.aclose()
            await engine.stop(grace_left(app, settings))
            await cache.close()

    app = FastAPI(
        title="genret",
        version="0.1.0",
        summary="Online generative retrieval: history -> beam search over an item-index trie -> top-K items",
        lifespan=lifespan,
        **docs_urls(settings),
    )
    app.state.settings = settings
    app.state.engine = None
    app.state.catalogue = None
    app.state.shutdown_deadline = None  # set by server.DrainingServer when a drain begins
    install_error_handlers(app)
    app.include_router(router)
    document_bodies(app, [RetrieveRequest, BatchRetrieveRequest])
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_body_bytes)
    exposed = [path for route in router.routes if (path := getattr(route, "path", "")).startswith("/admin")]
    if exposed:  # admin routes belong to service.http.routes.admin_router (the admin port) only
        raise RuntimeError(f"admin routes on the public app: {exposed}")
    return app


def docs_urls(settings: Settings) -> dict[str, Any]:
    if settings.docs_on:
        return {}
    return {"docs_url": None, "redoc_url": None, "openapi_url": None}


def create_admin_app(settings: Settings, public: FastAPI) -> FastAPI:
    """The ``/admin/*`` routes, on their own app and port; the engine is the public app's."""
    admin = FastAPI(title="genret admin", version="0.1.0", **docs_urls(settings))
    admin.state = public.state  # settings + the engine the public lifespan builds
    install_error_handlers(admin, ADMIN_ERRORS)
    admin.include_router(admin_router)
    admin.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_admin_body_bytes, admin=True)
    return admin
