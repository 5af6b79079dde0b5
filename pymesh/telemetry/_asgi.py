"""Server-side telemetry for ASGI apps: one middleware, no ASGI framework imported.

Wrap the application (outside ``pymesh.asgi.MeshMiddleware``, so refusals by the inbound
policy are reported too)::

    app = telemetry.asgi_middleware(pymesh.asgi.MeshMiddleware(app))

``pymesh.serve`` / :class:`pymesh.asgi.MeshServer` apply it by default. Each HTTP request
then gets a server span (the caller's W3C / B3 context joined, made
current for the handler: its outbound mesh calls continue the trace) and is reported as
``reporter="destination"`` when it ends. The peer identity is read from the connection
``pymesh.serve`` puts in ``scope["extensions"]["pymesh.connection"]`` (URI SANs, TLS), the
caller's workload from its ``x-envoy-peer-metadata`` header (Istio's metadata exchange),
and the response carries this workload's own exchange headers for the caller's labels (to
a caller that sent its own). As behind Istio's sidecar, the caller's exchange headers are
removed before the application sees the request.
With no telemetry installed the middleware passes requests straight through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pymesh.telemetry import _telemetry

__all__ = ["asgi_middleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

_CONNECTION_KEY = "pymesh.connection"
_MX = "x-envoy-peer-metadata"
_MX_ID = "x-envoy-peer-metadata-id"
_MX_RAW = frozenset((_MX.encode(), _MX_ID.encode()))


def asgi_middleware(app: App) -> App:
    """``app`` with every HTTP request reported to the installed telemetry."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        tel = _telemetry.current()
        if tel is None or scope.get("type") != "http":
            await app(scope, receive, send)
            return
        raw = scope.get("headers") or ()
        # ASGI: names already lower-case; one dict, the last of repeated names wins
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
        get = headers.get
        mx_id = _MX_ID in headers
        if (mx_id or _MX in headers) and tel.peer_exchange:
            # Istio's metadata exchange filter removes the peer's headers on the way in:
            # the application never sees them (they are read here, into source_* labels).
            scope = {**scope, "headers": [kv for kv in raw if kv[0] not in _MX_RAW]}
        path = scope.get("path", "/")
        query = scope.get("query_string")
        if query:
            path += "?" + query.decode("latin-1")
        content_type = get("content-type")
        call = tel.server_call(
            protocol="grpc"
            if content_type is not None and content_type.startswith("application/grpc")
            else "http",
            method=str(scope.get("method", "GET")),
            authority=get("host", ""),
            path=path,
            get_header=get,
        )
        counter = _Counter(
            receive,
            send,
            # Our metadata for the caller's labels, only to a caller that took part in the
            # exchange (a browser or an outside client learns nothing about the workload).
            tel.exchange_headers_raw if call.peer is not None or mx_id else (),
        )
        extensions = scope.get("extensions")
        conn = extensions.get(_CONNECTION_KEY) if extensions else None
        sans = tuple(getattr(conn, "uri_sans", ()) or ()) if conn is not None else ()
        try:
            await app(scope, counter.receive, counter.send)
        finally:
            try:
                call.finish(
                    status=counter.status,
                    peer_uri_sans=sans,
                    mtls=bool(sans and getattr(conn, "tls", False)),
                    request_bytes=counter.received,
                    response_bytes=counter.sent,
                )
            except Exception:  # telemetry must never fail the application's request
                _telemetry._log.exception("telemetry: recording a request failed")

    return middleware


class _Counter:
    """One request's ``receive`` / ``send``, counting the bodies and taking the status
    (and adding this workload's exchange headers to the response when due)."""

    __slots__ = ("_exchange", "_receive", "_send", "received", "sent", "status")

    def __init__(self, receive: Receive, send: Send, exchange: tuple[Any, ...]) -> None:
        self._receive = receive
        self._send = send
        self._exchange = exchange
        self.status = 500
        self.received = 0
        self.sent = 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message.get("type") == "http.request":
            self.received += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.body":
            self.sent += len(message.get("body", b""))
        elif kind == "http.response.start":
            self.status = int(message.get("status", 500))
            if self._exchange:
                message = {**message, "headers": [*message.get("headers", ()), *self._exchange]}
        await self._send(message)
