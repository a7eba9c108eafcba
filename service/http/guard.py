"""uvicorn's httptools protocol with the limits it lacks: header and body read timeouts, a JSON 503
past a connection cap, and a shutdown that drops stalled uploads at once.

uvicorn (0.54) closes idle keep-alive connections but has no read timeout: a client that stops
mid-headers or mid-body holds its connection (and, mid-body, a request task) forever, and at
shutdown uvicorn waits for that request until its graceful timeout. Per connection this protocol
keeps two timers:

* header timer: armed when the connection opens and when a request's first byte arrives,
  cancelled when its headers are complete. On expiry: 408 if a request had begun, then close.
  Between requests uvicorn's keep-alive timer closes an idle connection.
* body timer: armed when the headers are complete, cancelled when the body is complete (a request
  without body completes in the same parser call). On expiry: 408 unless the app already started
  its response, then close; the app's ``receive()`` returns ``http.disconnect``.

Past ``max_connections`` open connections (or as many running requests) a request is answered
503 by ``service.errors`` (kind ``overloaded``) instead of reaching the app. Each server (public,
admin) has its own ``ServerState``, so the cap is per port.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.errors import Overloaded, error_response
from service.metrics import ERRORS

log = logging.getLogger(__name__)

LINGER_S = 2.0
"""Longest a timed-out connection stays half-closed, dropping what the client still sends."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """Set by :func:`guarded_protocol`; uvicorn builds one instance per connection."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._app = self.app
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._request_begun = False
        self._lingering = False  # answered a timeout and half-closed: what still arrives is dropped

    # --- connection ---
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """Server shutdown: a request still waiting for its body will not get it; close at once."""
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
            self._cancel_timers()
            self._reject("shutdown while the request body was incomplete", 503, linger=False)
            return
        super().shutdown()

    # --- parser callbacks ---
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        # uvicorn reads ``self.app`` in the call below; past the cap it gets the 503 app instead
        over = len(self.connections) > self.max_connections or len(self.tasks) >= self.max_connections
        self.app = self._overloaded if over else self._app
        super().on_headers_complete()
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._on_body_timeout)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._request_begun = False
        super().on_message_complete()

    # --- timers ---
    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a request is running (a pipelined one's headers are still coming): check again later
            self._arm_header_timer()
            return
        if self._request_begun:
            ERRORS.labels(kind="header_timeout").inc()
            self._reject(f"request headers incomplete after header_timeout_s={self.header_timeout_s}", 408)
        else:
            self.transport.close()  # idle: nothing was asked, nothing to answer

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.cycle is None or not self.cycle.more_body:
            return
        ERRORS.labels(kind="body_timeout").inc()
        self._reject(f"request body incomplete after body_timeout_s={self.body_timeout_s}", 408)

    def _reject(self, reason: str, status: int, *, linger: bool = True) -> None:
        """Answer ``status`` with ``connection: close`` unless a response has begun, then close.

        With ``linger`` the close is graceful: write side shut (FIN after the answer), what the client
        still sends dropped for up to :data:`LINGER_S`, then closed. Closing at once with the
        client's bytes unread makes the kernel send a reset, which can destroy the answer before the
        client reads it (a slowloris client trickling bytes saw "connection reset" instead of 408)."""
        log.warning("closing %s: %s", self.client, reason)
        running = self.cycle is not None and not self.cycle.response_complete
        if not running or not self.cycle.response_started:  # nothing of another answer on the wire
            body = reason.encode()
            self.transport.write(
                b"".join(
                    (
                        STATUS_LINE[status],
                        b"content-type: text/plain; charset=utf-8\r\n",
                        b"content-length: " + str(len(body)).encode() + b"\r\n",
                        b"connection: close\r\n\r\n",
                        body,
                    )
                )
            )
        if running:  # the app's receive() returns http.disconnect; its answer is dropped
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if linger and self.transport.can_write_eof():
            self._lingering = True
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    async def _overloaded(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = Overloaded(f"more than max_connections={self.max_connections} connections or requests")
        response = error_response(exc)
        response.headers["connection"] = "close"
        await response(scope, receive, send)


def guarded_protocol(
    header_timeout_s: float, body_timeout_s: float, max_connections: int
) -> type[GuardedHttpProtocol]:
    """A protocol class with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
        },
    )
