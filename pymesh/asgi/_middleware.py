"""``MeshMiddleware``: the inbound listener of an ASGI app (what a sidecar's inbound does).

Per request, in this order (each step says why it sits there):

1. read the current view **once** (one attribute read: a listener update applies to requests
   that start after it, never to one in flight);
2. no listener yet, or it was removed / is invalid: **503** with the reason (NOT_SERVING;
   Envoy would have no listener at all);
3. the connection (:class:`~pymesh.asgi._peer.Connection`: transport and client certificate,
   put in the scope by ``pymesh.serve`` or read from the ASGI ``tls`` extension) and the
   request become a ``PeerInfo`` and a ``RequestInfo``; the peer identity is put in the
   scope first so that the app and logs see it whatever the verdict;
4. :func:`pymesh.core.inbound.decide` (shared with the gRPC server): filter chain by
   transport protocol and addresses, route configuration, virtual host by ``Host``, route,
   then the HTTP filters in order (fault delay/abort, RBAC); a refusal is answered here with
   Envoy's status and body (403 ``RBAC: access denied``);
5. the app runs; a fault filter's active-fault slot is released when it returns.

Theory of operation — serving state:

=====================  ===========================  =========================================
state                  event                        next state
=====================  ===========================  =========================================
NOT_SERVING (start)    listener snapshot            SERVING
NOT_SERVING            listener error               NOT_SERVING (reason updated)
SERVING                listener snapshot            SERVING with the new listener
SERVING                ambient error (xDS down)     SERVING with the last good listener
SERVING                listener removed / invalid   NOT_SERVING
any                    every chain demands TLS and  NOT_SERVING (a plaintext-only server
                       the server has no TLS        cannot serve an mTLS listener)
=====================  ===========================  =========================================
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from pymesh.asgi._peer import (
    CONNECTION_KEY,
    PEER_KEY,
    Connection,
    Peer,
    connection_of,
    make_peer,
)
from pymesh.core import inbound
from pymesh.core.flow import lowered_headers
from pymesh.core.path_normalization import normalize
from pymesh.core.rbac import PeerInfo
from pymesh.core.types import RequestInfo
from pymesh.errors import PymeshError
from pymesh.model.snapshot import ServerError, ServerSnapshot
from pymesh.xds.client import XdsClient
from pymesh.xds.watch import ServerHandle, watch_server

__all__ = ["ASGIApp", "MeshMiddleware"]

_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}
_MAX_PEERS = 1024


@dataclass(frozen=True, slots=True)
class _View:
    """The one object a request reads: swapped whole on every change."""

    snapshot: ServerSnapshot | None
    message: str


def listener_host(host: str) -> str:
    """The IP the inbound listener is named with (as the gRPC server names it)."""
    if host in ("", "::", "*", "[::]"):
        return "::"
    if host == "localhost":
        return "127.0.0.1"
    return host.strip("[]")


class MeshMiddleware:
    """Inbound mesh policy for any ASGI app: ``app = MeshMiddleware(app)``.

    Watches the inbound listener ``xds.istio.io/grpc/lds/inbound/HOST:PORT`` (the bootstrap's
    ``server_listener_resource_name_template``) through ``xds_client`` (default: the shared
    client of ``GRPC_XDS_BOOTSTRAP``). ``port`` defaults to the port of the first request's
    ``scope["server"]``; :meth:`start` starts the watch explicitly. ``tls_capable``: the
    server in front can terminate TLS (``pymesh.serve`` sets it); when false, a listener
    whose chains all demand mTLS leaves the app NOT_SERVING (503).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        xds_client: XdsClient | None = None,
        port: int | None = None,
        host: str = "0.0.0.0",
        tls_capable: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.app = app
        self._client = xds_client
        self._port = port
        self._host = listener_host(host)
        self.tls_capable = tls_capable
        self._state = inbound.InboundState(rng)
        self._view = _View(None, "waiting for the xDS listener")
        self._handle: ServerHandle | None = None
        self._cancel: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._peer_cache: dict[tuple[Any, ...], tuple[Connection, Peer, PeerInfo]] = {}

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, port: int | None = None) -> None:
        """Start watching the inbound listener of ``port`` (idempotent)."""
        with self._lock:
            if self._handle is not None:
                return
            port = port if port is not None else self._port
            if port is None:
                raise PymeshError("MeshMiddleware needs the port it serves to name its listener")
            self._port = port
            client = self._client or XdsClient.shared()
            self._handle = watch_server(client, self._host, port)
        self._cancel = self._handle.subscribe(self._on_update)

    def close(self) -> None:
        """Stop watching (requests then get 503)."""
        if self._cancel is not None:
            self._cancel()
            self._cancel = None
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()
        self._set_view(_View(None, "server stopped"))

    @property
    def listener_name(self) -> str | None:
        handle = self._handle
        return None if handle is None else handle.listener_name

    @property
    def snapshot(self) -> ServerSnapshot | None:
        """The listener in force (``None``: NOT_SERVING)."""
        return self._view.snapshot

    @property
    def serving(self) -> bool:
        return self._view.snapshot is not None

    @property
    def message(self) -> str:
        """Why the app is not serving (empty while serving)."""
        return self._view.message

    def wait_for_serving(self, timeout: float) -> bool:
        """Block until SERVING (``True``) or ``timeout`` seconds passed (``False``)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._view.snapshot is not None, timeout)

    # -- state (xDS work thread) --------------------------------------------------------

    def _set_view(self, view: _View) -> None:
        with self._changed:
            before = self._view
            self._view = view
            self._changed.notify_all()
        if (before.snapshot is None) != (view.snapshot is None) or (
            view.snapshot is None and before.message != view.message
        ):
            if view.snapshot is not None:
                _log.info("ASGI mesh server %s: SERVING", self.listener_name)
            else:
                _log.warning(
                    "ASGI mesh server %s: NOT_SERVING: %s", self.listener_name, view.message
                )

    def _on_update(self, item: ServerSnapshot | ServerError) -> None:
        if isinstance(item, ServerSnapshot):
            why = inbound.tls_only_message(item.listener, secure=self.tls_capable)
            if why is not None:
                why = why.split(" (bind it", 1)[0] + " (serve the app with pymesh.serve)"
            self._set_view(_View(item, "") if why is None else _View(None, why))
        elif item.ambient and self._view.snapshot is not None:
            _log.warning("ASGI mesh server keeps its last listener: %s", item)
        else:
            self._set_view(_View(None, str(item)))

    # -- per request --------------------------------------------------------------------

    def _peers(self, scope: Scope, conn: Connection) -> tuple[Peer, PeerInfo]:
        """The request's :class:`Peer` and ``PeerInfo``: constants of a connection (its
        certificate and addresses), built once per connection under ``pymesh.serve`` (whose
        :class:`Connection` object lives as long as the connection)."""
        client = scope.get("client") or (None, None)
        server = scope.get("server") or (None, None)
        key = (id(conn), client[0], client[1], server[0], server[1])
        hit = self._peer_cache.get(key)
        if hit is not None and hit[0] is conn:
            return hit[1], hit[2]
        the_peer = make_peer(scope, conn)
        info = _peer_info(scope, conn)
        if (scope.get("extensions") or {}).get(CONNECTION_KEY) is not conn:
            return the_peer, info  # made for this request (another server): not kept
        if len(self._peer_cache) >= _MAX_PEERS:
            self._peer_cache.clear()
        self._peer_cache[key] = (conn, the_peer, info)  # holds conn: its id is not reused
        return the_peer, info

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._handle is None:
            server = scope.get("server") or (None, None)
            self.start(self._port if self._port is not None else server[1])
        view = self._view
        conn = connection_of(scope)
        scope = dict(scope)
        the_peer, peer = self._peers(scope, conn)
        scope[PEER_KEY] = the_peer
        extensions = dict(scope.get("extensions") or {})
        extensions["pymesh"] = the_peer
        extensions.setdefault(CONNECTION_KEY, conn)
        scope["extensions"] = extensions
        if view.snapshot is None:
            await _refuse(scope, send, 503, f"pymesh: not serving: {view.message}")
            return
        if _headers_too_large(scope.get("headers") or ()):
            await _refuse(scope, send, 431, "Request Header Fields Too Large")
            return
        raw_path = scope.get("raw_path")
        chain = self._state.filter_chain(view.snapshot.listener, peer, conn.transport)
        if isinstance(raw_path, bytes) and chain is not None:
            # policy and app see the path Envoy would forward (the chain's HCM settings)
            result = normalize(raw_path, chain.hcm.path_normalization)
            if isinstance(result, int) or (result[1] and _is_grpc(scope)):
                await _refuse(scope, send, 400, "Bad Request")  # REJECT, or a gRPC redirect
                return
            normalized, redirect = result
            if redirect:
                query = scope.get("query_string") or b""
                location = normalized + (b"?" + query if query else b"")
                await _refuse(scope, send, 307, "", ((b"location", location),))
                return
            if normalized != raw_path:
                scope["raw_path"] = normalized
                scope["path"] = urllib.parse.unquote(normalized.decode("ascii", "replace"))
        decision = inbound.decide(
            view.snapshot,
            _request_info(scope, conn),
            peer,
            self._state,
            transport=conn.transport,
            chain=chain,  # selected once per request, above
        )
        try:
            if decision.delay:
                await asyncio.sleep(decision.delay)
            if decision.code is not None:
                await _refuse(scope, send, decision.http_status or 503, decision.message)
                return
            await self.app(scope, receive, send)
        finally:
            if decision.fault is not None:
                decision.fault.end()


def _is_grpc(scope: Scope) -> bool:
    for key, value in scope.get("headers") or ():
        if key == b"content-type":
            return bytes(value).startswith(b"application/grpc")
    return False


def _request_info(scope: Scope, conn: Connection) -> RequestInfo:
    raw_headers = scope.get("headers") or ()
    # one pass: names lowered here (ASGI servers should send them lower-case already)
    headers = lowered_headers(
        tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw_headers)
    )
    authority = headers.get("host") or ""
    if not authority:
        server = scope.get("server")
        authority = f"{server[0]}:{server[1]}" if server else ""
    path = scope.get("raw_path")
    path_text = path.decode("latin-1") if isinstance(path, bytes) else str(scope.get("path", "/"))
    query = scope.get("query_string") or b""
    if query:
        path_text = f"{path_text}?{query.decode('latin-1')}"
    method = str(scope.get("method", "GET"))
    client = scope.get("client") or (None, None)
    return RequestInfo(
        method=method,
        authority=authority,
        path=path_text,
        headers=headers,
        scheme="https" if conn.tls else "http",
        source_ip=client[0],
        grpc=(headers.get("content-type") or "").startswith("application/grpc"),
    )


def _peer_info(scope: Scope, conn: Connection) -> PeerInfo:
    client = scope.get("client") or (None, None)
    server = scope.get("server") or (None, None)
    dst = server[0] if server[0] not in _WILDCARDS else None
    return PeerInfo(
        source_ip=client[0],
        source_port=client[1],
        destination_ip=dst,
        destination_port=server[1],
        tls=conn.tls,
        uri_sans=conn.uri_sans,
        dns_sans=conn.dns_sans,
        subject=conn.subject,
        server_name=conn.server_name,
    )


async def _refuse(
    scope: Scope, send: Send, status: int, body: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """Envoy's local reply: ``status`` with a ``text/plain`` body and ``extra`` headers (a
    WebSocket handshake is closed with 1008 policy violation before it is accepted)."""
    if scope.get("type") == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": body[:120]})
        return
    data = body.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(data)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


MAX_REQUEST_HEADERS_COUNT = 100
"""Envoy's HTTP connection manager default (``max_request_headers_count``)."""
MAX_REQUEST_HEADERS_BYTES = 60 * 1024
"""Envoy's HTTP connection manager default (``max_request_headers_kb``: 60)."""


def _headers_too_large(headers: Any) -> bool:
    """Envoy's limits on the request headers a sidecar accepts (431 beyond them)."""
    if len(headers) > MAX_REQUEST_HEADERS_COUNT:
        return True
    size = 0
    for name, value in headers:
        size += len(name) + len(value)
    return size > MAX_REQUEST_HEADERS_BYTES
