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
        headers: dict[str, str] = {}
        raw = scope.get("headers") or ()
        for k, v in raw:  # ASGI: names already lower-case
            headers[k.decode("latin-1")] = v.decode("latin-1")
        if tel.peer_exchange and (_MX_ID in headers or _MX in headers):
            # Istio's metadata exchange filter removes the peer's headers on the way in:
            # the application never sees them (they are read here, into source_* labels).
            scope = {**scope, "headers": [kv for kv in raw if kv[0] not in _MX_RAW]}
        path = scope.get("path", "/")
        query = scope.get("query_string") or b""
        if query:
            path += "?" + query.decode("latin-1")
        authority = headers.get("host", "")
        protocol = (
            "grpc" if headers.get("content-type", "").startswith("application/grpc") else "http"
        )
        call = tel.server_call(
            protocol=protocol,
            method=str(scope.get("method", "GET")),
            authority=authority,
            path=path,
            get_header=headers.get,
        )
        counts = [500, 0, 0]  # status, bytes received, bytes sent
        # Our metadata for the caller's labels, only to a caller that took part in the
        # exchange (a browser or an outside client learns nothing about the workload).
        exchange = tel.exchange_headers_raw if call.peer is not None or _MX_ID in headers else ()

        async def counting_receive() -> Message:
            message = await receive()
            if message.get("type") == "http.request":
                counts[1] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            kind = message.get("type")
            if kind == "http.response.start":
                counts[0] = int(message.get("status", 500))
                if exchange:
                    message = {**message, "headers": [*message.get("headers", ()), *exchange]}
            elif kind == "http.response.body":
                counts[2] += len(message.get("body", b""))
            await send(message)

        conn = (scope.get("extensions") or {}).get(_CONNECTION_KEY)
        sans = tuple(getattr(conn, "uri_sans", ()) or ())
        mtls = bool(getattr(conn, "tls", False) and sans)
        try:
            await app(scope, counting_receive, counting_send)
        finally:
            try:
                call.finish(
                    status=counts[0],
                    peer_uri_sans=sans,
                    mtls=mtls,
                    request_bytes=counts[1],
                    response_bytes=counts[2],
                )
            except Exception:  # telemetry must never fail the application's request
                _telemetry._log.exception("telemetry: recording a request failed")

    return middleware
