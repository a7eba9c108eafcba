"""App factory and lifespan: load + warm bundles, start the batcher, stop gracefully.

``create_app(settings)`` returns the FastAPI app; the engine is built in the lifespan (bundles are
loaded off the event loop) and stored on ``app.state.engine``. On shutdown the engine drains:
new requests get 503, queued and running ones finish within ``shutdown_grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import router
from service.cache import CircuitBreaker, LocalCache, NoCache, RedisCache, StateCache
from service.engine import DEFAULT_VARIANT, Engine
from service.errors import PayloadTooLarge, error_response, install_error_handlers
from service.metrics import REQUEST_SECONDS
from service.models_registry import ModelRegistry
from service.settings import Settings

log = logging.getLogger(__name__)


class ServiceMiddleware:
    """Pure ASGI: refuse bodies over ``max_body_bytes`` (413) and time every request by route, variant, status."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

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
            await error_response(exc)(scope, receive, send_and_record)
        else:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            REQUEST_SECONDS.labels(
                route=getattr(route, "path", "unmatched"),
                variant=scope.get("state", {}).get("variant", DEFAULT_VARIANT),
                status=str(status),
            ).observe(time.perf_counter() - started)

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


def make_cache(settings: Settings) -> StateCache:
    if settings.redis_url:
        return RedisCache(
            settings.redis_url,
            ttl_s=settings.cache_ttl_s,
            timeout_s=settings.redis_timeout_ms / 1000.0,
            pool_size=settings.redis_pool_size,
            breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s),
        )
    if settings.local_cache_entries > 0:
        return LocalCache(settings.local_cache_entries)
    return NoCache()


def load_experiment(
    settings: Settings,
) -> tuple[Any | None, Callable[[str | None, Sequence[str]], str]]:
    """``service.experiments.router_from_settings(settings)`` (None without ``experiments_file``,
    i.e. ``GENRET_EXPERIMENTS_FILE``) and its assignment-key function."""
    experiments: Any = importlib.import_module("service.experiments")
    return experiments.router_from_settings(settings), experiments.user_key


def wire_experiment(hooks: Any, engine: Engine) -> None:
    """Check the experiment names only loaded bundles, and give its shadow lane a way to run copies."""
    from service.shadow import Ranked

    for bundle in hooks.source.router().config.bundles:
        engine.registry.get(bundle)  # UnknownModel at startup, not on the first request

    async def run_shadow(request: Any) -> Any:
        started = time.perf_counter()
        response = await engine.run_shadow(request)
        return Ranked(
            items=tuple(item.id for item in response.items),
            bundle=response.model.name,
            version=response.model.version,
            latency_s=time.perf_counter() - started,
        )

    hooks.bind(run_shadow, lambda: engine.batcher.idle)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        registry = ModelRegistry(settings)
        await asyncio.to_thread(registry.load_all)
        cache = make_cache(settings)
        hooks, assignment_key = load_experiment(settings)
        engine = Engine(
            settings,
            registry,
            cache,
            router=hooks,
            on_primary_result=None if hooks is None else hooks.maybe_shadow,
            assignment_key=assignment_key,
        )
        if hooks is not None:
            wire_experiment(hooks, engine)
        engine.start()
        app.state.engine = engine
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
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if hooks is not None:
                await hooks.aclose()
            await engine.stop(settings.shutdown_grace_s)
            await cache.close()

    app = FastAPI(
        title="genret",
        version="0.1.0",
        summary="Online generative retrieval: history -> beam search over an item-index trie -> top-K items",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = None
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_body_bytes)
    return app
