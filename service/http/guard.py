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

Fairness between clients (docs/deployment.md "Fairness between clients"): one client address may
hold at most ``max_connections_per_client`` open connections (one past it is closed as soon as it
is accepted, counted ``genret_errors_total{kind="client_connections"}``), so a client holding idle
or slowloris sockets cannot take the whole ``max_connections``; and at most
``max_inflight_per_client`` of its requests are answered at once (past it 429 with Retry-After,
kind ``client_limit``). The client is the peer address, or, when the peer is one of the trusted
proxies, the rightmost address of ``X-Forwarded-For`` that is not itself a trusted proxy (an
address a client wrote further left is not believed); a trusted proxy's own connections are not
capped per client.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any, ClassVar

from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.errors import ClientLimit, Overloaded, error_response
from service.metrics import ERRORS

log = logging.getLogger(__name__)

LINGER_S = 2.0
"""Longest a timed-out connection stays half-closed, dropping what the client still sends."""


class _Slot:
    """One request counted in its client's in-flight share."""

    __slots__ = ("client", "released", "started")

    def __init__(self, client: str) -> None:
        self.client = client
        self.started = False
        self.released = False


class GuardedHttpProtocol(HttpToolsProtocol):
    """Set by :func:`guarded_protocol`; uvicorn builds one instance per connection."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    max_connections_per_client: int = 1_000_000
    max_inflight_per_client: int = 1_000_000
    trusted: tuple[IPv4Network | IPv6Network, ...] = ()
    retry_after_s: int = 1
    # per server (a fresh dict for each class guarded_protocol makes): client -> its count
    open_by_client: ClassVar[dict[str, int]] = {}
    inflight_by_client: ClassVar[dict[str, int]] = {}

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
        self._counted_peer: str | None = None  # the client address this connection is counted under
        self._slots: set[_Slot] = set()  # this connection's requests counted in flight

    # --- connection ---
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = self.client[0] if self.client else None
        if peer is not None and not self._is_trusted(peer):
            held = self.open_by_client.get(peer, 0)
            if held >= self.max_connections_per_client:
                ERRORS.labels(kind="client_connections").inc()
                transport.close()  # never read: costs the server one accept, the client nothing held
                return
            self.open_by_client[peer] = held + 1
            self._counted_peer = peer
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        for slot in [s for s in self._slots if not s.started]:  # pipelined ones that will never run
            self._release(slot)
        peer, self._counted_peer = self._counted_peer, None
        if peer is not None:
            left = self.open_by_client.get(peer, 1) - 1
            if left > 0:
                self.open_by_client[peer] = left
            else:
                self.open_by_client.pop(peer, None)
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
        if over:
            self.app = self._overloaded
        else:
            client = self._client_key()
            if self.inflight_by_client.get(client, 0) >= self.max_inflight_per_client:
                self.app = self._client_limited
            else:  # counted now, not when its task first runs: requests parsed together see each other
                slot = _Slot(client)
                self.inflight_by_client[client] = self.inflight_by_client.get(client, 0) + 1
                self._slots.add(slot)
                self.app = partial(self._counted, slot)
        super().on_headers_complete()
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._on_body_timeout)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._request_begun = False
        super().on_message_complete()

    # --- clients ---
    def _is_trusted(self, address: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def _client_key(self) -> str:
        """The peer address, or behind a trusted proxy the first untrusted address from the right of
        ``X-Forwarded-For`` (each proxy appends the address it saw)."""
        peer = self.client[0] if self.client else "unknown"
        if not self._is_trusted(peer):
            return peer
        forwarded = b",".join(v for n, v in self.headers if n == b"x-forwarded-for").decode("latin-1")
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            if not self._is_trusted(hop):
                return hop
        return peer

    async def _counted(self, slot: _Slot, scope: Scope, receive: Receive, send: Send) -> None:
        slot.started = True
        try:
            await self._app(scope, receive, send)
        finally:
            self._release(slot)

    def _release(self, slot: _Slot) -> None:
        """The request left (answered, or never to run): once per slot."""
        self._slots.discard(slot)
        if slot.released:
            return
        slot.released = True
        left = self.inflight_by_client.get(slot.client, 1) - 1
        if left > 0:
            self.inflight_by_client[slot.client] = left
        else:
            self.inflight_by_client.pop(slot.client, None)

    async def _client_limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = ClientLimit(
            f"this client has max_inflight_per_client={self.max_inflight_per_client} requests running",
            self.retry_after_s,
        )
        await error_response(exc)(scope, receive, send)

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
    header_timeout_s: float,
    body_timeout_s: float,
    max_connections: int,
    *,
    max_connections_per_client: int | None = None,
    max_inflight_per_client: int | None = None,
    trusted: tuple[IPv4Network | IPv6Network, ...] = (),
    retry_after_s: int = 1,
) -> type[GuardedHttpProtocol]:
    """A protocol class with these limits (per-client ones: None = only the total), for
    ``uvicorn.Config(http=...)``; each class counts its own clients (one per server, so per port)."""
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
            "max_connections_per_client": max_connections_per_client or max_connections,
            "max_inflight_per_client": max_inflight_per_client or max_connections,
            "trusted": trusted,
            "retry_after_s": retry_after_s,
            "open_by_client": {},
            "inflight_by_client": {},
        },
    )
