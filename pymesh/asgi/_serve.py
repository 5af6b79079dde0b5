"""``pymesh.serve(app, port=9080)``: an ASGI app under uvicorn with the mesh's inbound mTLS.

uvicorn runs the HTTP protocol; pymesh owns the listening socket and decides, per accepted
connection, what Envoy's inbound listener (TLS inspector + filter chain match) would:

1. **peek** the first byte the client sends (``MSG_PEEK``: nothing is consumed). ``0x16`` (a
   TLS handshake record, the ClientHello) => transport ``tls``, anything else =>
   ``raw_buffer``. A client that sends nothing for ``handshake_timeout`` seconds is closed.
2. **filter chain** of the current inbound listener for that transport and the addresses
   (:func:`pymesh.core.inbound.select_filter_chain`): STRICT has one chain demanding mTLS,
   so plaintext is closed; PERMISSIVE has a ``tls`` and a ``raw_buffer`` chain, so both are
   served on the same port; DISABLE has one plaintext chain, so TLS is closed. No chain:
   closed. No listener yet (NOT_SERVING): accepted, and the middleware answers 503.
3. **TLS handshake** (``tls`` only) with a :class:`~pymesh.security.MeshSSLContext` following
   the certificate provider: the client certificate is required when the chain says so and
   must chain to the trust bundle and carry a SPIFFE ID of the trust domain(s) (default: our
   own certificate's). Rotation: every new handshake uses the provider's current certificate;
   connections already open keep theirs.
4. uvicorn's protocol is attached to the connection (``loop.connect_accepted_socket``); the
   connection's :class:`~pymesh.asgi._peer.Connection` (transport, client certificate) is put in
   every request's ``scope["extensions"]`` for :class:`~pymesh.asgi.MeshMiddleware`.

HTTP/1.1 only (uvicorn's httptools protocol): ALPN offers ``http/1.1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

import uvicorn

from pymesh.asgi._middleware import ASGIApp, MeshMiddleware, Receive, Scope, Send
from pymesh.asgi._peer import CONNECTION_KEY, PLAINTEXT, Connection
from pymesh.core import inbound
from pymesh.core.rbac import PeerInfo
from pymesh.errors import PymeshError
from pymesh.security import CertificateProvider, FileWatcherProvider, server_ssl_context
from pymesh.telemetry import asgi_middleware
from pymesh.xds.client import XdsClient

__all__ = ["MeshServer", "serve"]

_log = logging.getLogger(__name__)

TLS_HANDSHAKE_RECORD = 0x16
_ALPN = ("http/1.1",)


class _Corked:
    """A connection's transport that, while corked, gathers what is written and writes it in
    one piece when uncorked: a response's head and its first body chunk leave in one
    ``send`` (one TLS record under mTLS) instead of two. Everything else is the transport's."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._transport.write(data)
        elif data:
            held.append(bytes(data))

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in chunks:
            self.write(data)

    def cork(self) -> None:
        self._held = []

    def uncork(self) -> None:
        held, self._held = self._held, None
        if held:
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.uncork()
        self._transport.close()


def _with_connection(app: ASGIApp, conn: Connection, corked: _Corked | None) -> ASGIApp:
    tls = conn.tls_extension() if conn.tls else None

    async def with_connection(scope: Scope, receive: Receive, send: Send) -> None:
        extensions = dict(scope.get("extensions") or {})
        extensions[CONNECTION_KEY] = conn
        if tls is not None:
            extensions.setdefault("tls", dict(tls))
        scope["extensions"] = extensions
        if corked is None or scope.get("type") != "http":
            await app(scope, receive, send)
            return
        # ASGI lets a server hold the response head until the first body message: the head
        # and that message are written together (one send, one TLS record).
        held: list[MutableMapping[str, Any]] = []
        started = False

        async def coalescing_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if held:
                head = held.pop()
                if message.get("type") != "http.response.body":
                    await send(head)
                    await send(message)
                    return
                corked.cork()
                try:
                    await send(head)
                    await send(message)
                finally:
                    corked.uncork()
                return
            if not started and message.get("type") == "http.response.start":
                started = True
                held.append(message)
                return
            await send(message)

        try:
            await app(scope, receive, coalescing_send)
        except BaseException:
            if held:  # a head without a body: the server sees it as before (and closes)
                with contextlib.suppress(Exception):
                    await send(held.pop())
            raise
        if held:
            await send(held.pop())

    return with_connection


def _protocol_class(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, tagging each request with its connection's TLS state and
    writing each response's head with its first body chunk."""

    class MeshProtocol(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            conn = PLAINTEXT if ssl_object is None else Connection.from_ssl_object(ssl_object)
            corked = _Corked(transport)
            self.transport = corked
            app: ASGIApp = self.app  # type: ignore[has-type]
            self.app = _with_connection(app, conn, corked)

    return MeshProtocol


class _Acceptor:
    """The accept loop, with uvicorn's ``asyncio.Server`` interface for shutdown."""

    def __init__(self, owner: MeshServer, sock: socket.socket, factory: Any) -> None:
        self._owner = owner
        self._sock = sock
        self._factory = factory
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            task = loop.create_task(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, conn: socket.socket) -> None:
        owner = self._owner
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and accepted
        # sockets of socket.create_server have proto 0: without it, Nagle and delayed ACKs
        # add ~40 ms to every keep-alive request.
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            first = await self._peek(conn)
            if first is None:
                conn.close()
                return
            transport = "tls" if first == TLS_HANDSHAKE_RECORD else "raw_buffer"
            context = owner._admit(transport, conn)
            if context is False:
                owner.refused += 1
                conn.close()
                return
            await loop.connect_accepted_socket(
                self._factory,
                conn,
                ssl=context or None,
                ssl_handshake_timeout=owner.handshake_timeout if context else None,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            owner.handshake_failures += 1
            _log.info("pymesh.serve: connection refused: %s", exc)
            conn.close()

    async def _peek(self, conn: socket.socket) -> int | None:
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = conn.fileno()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await asyncio.wait_for(readable, self._owner.handshake_timeout)
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(fd)
        try:
            data = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        return data[0] if data else None

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, owner: MeshServer) -> None:
        super().__init__(config)
        self._owner = owner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise PymeshError("pymesh.serve: the app's lifespan startup failed")
        config = self.config
        protocol_class = _protocol_class(config.http_protocol_class)

        def create_protocol() -> asyncio.Protocol:
            return protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        acceptor = _Acceptor(self._owner, self._owner.socket, create_protocol)
        acceptor.start()
        self.servers = [acceptor]  # type: ignore[list-item]
        self.started = True
        self._owner._started.set()


class MeshServer:
    """An ASGI app served on the mesh (see the module doc); :func:`serve` runs one.

    ``app`` is wrapped in :class:`MeshMiddleware` unless it is one. Certificates come from
    ``certificate_provider`` or the bootstrap's ``file_watcher`` provider ``instance``
    (Istio's agent writes ``default``); without either, the server is plaintext only (an
    mTLS listener makes it NOT_SERVING). ``trust_domains``: client SPIFFE IDs accepted
    (default: the trust domain of our own certificate). ``certificate_wait``: how long to
    wait for the provider's first certificate (Istio's agent may write the files after the
    app starts); none by then: plaintext only, logged. ``telemetry``: report every request
    to the installed :mod:`pymesh.telemetry` (server reporter metrics, server span, access
    log, metadata exchange; nothing while none is installed). :meth:`start` runs it on a thread
    (for tests and embedding), :meth:`run` on the calling thread; :meth:`stop` stops it.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        port: int = 9080,
        host: str = "0.0.0.0",
        xds_client: XdsClient | None = None,
        certificate_provider: CertificateProvider | None = None,
        instance: str = "default",
        trust_domains: Iterable[str] | None = None,
        handshake_timeout: float = 10.0,
        certificate_wait: float = 10.0,
        log_level: str = "warning",
        telemetry: bool = True,
    ) -> None:
        self.host = host
        self.handshake_timeout = handshake_timeout
        self.refused = 0
        """Connections closed by filter chain (plaintext on STRICT, TLS on DISABLE)."""
        self.handshake_failures = 0
        """TLS handshakes that failed (bad, missing or untrusted client certificates)."""
        self._owned: list[CertificateProvider] = []
        client = xds_client
        provider = certificate_provider
        if provider is None:
            client = client or XdsClient.shared()
            entry = client.bootstrap.certificate_providers.get(instance)
            if entry is not None and entry.file_watcher is not None:
                provider = FileWatcherProvider.from_config(entry.file_watcher)
                self._owned.append(provider)
        if provider is not None and not _has_certificate(provider, certificate_wait):
            _log.warning(
                "pymesh.serve: certificate provider %r has no certificate after %.1fs: "
                "serving plaintext only (an mTLS listener leaves the app NOT_SERVING)",
                instance,
                certificate_wait,
            )
            provider = None
        self.provider = provider
        self._contexts: dict[bool, ssl.SSLContext] = {}
        if provider is not None:
            if trust_domains is None:
                identity = provider.current().identity
                domain = _trust_domain(identity)
                trust_domains = [domain] if domain else None
            for require in (True, False):
                self._contexts[require] = server_ssl_context(
                    provider, require, alpn=_ALPN, trust_domains=trust_domains
                )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host.strip("[]"), port), family=family, backlog=1024)
        self.socket.setblocking(False)
        self.port: int = self.socket.getsockname()[1]
        if isinstance(app, MeshMiddleware):
            self.middleware = app
            self.middleware.tls_capable = provider is not None
        else:
            self.middleware = MeshMiddleware(
                app, xds_client=client, host=host, tls_capable=provider is not None
            )
        self.middleware.start(self.port)
        served: ASGIApp = self.middleware
        if telemetry:
            # Outermost, so refusals by the inbound policy are reported too; a pass-through
            # (one global read per request) while no telemetry is installed.
            served = asgi_middleware(served)
        config = uvicorn.Config(
            served,
            http="httptools",  # ~95 us less server CPU per request than h11 (docs/mtls.md)
            ws="none",
            lifespan="auto",
            proxy_headers=False,
            server_header=False,
            log_level=log_level,
            access_log=False,
        )
        self._server = _Uvicorn(config, self)
        self._started = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host = self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _admit(self, transport: str, conn: socket.socket) -> ssl.SSLContext | bool | None:
        """The TLS context for a connection (``None``: plaintext) or ``False``: close it."""
        snapshot = self.middleware.snapshot
        if snapshot is None:  # NOT_SERVING: let the middleware answer 503
            if transport == "tls":
                return self._contexts.get(False, False)
            return None
        try:
            src = conn.getpeername()
            dst = conn.getsockname()
        except OSError:
            return False
        peer = PeerInfo(
            source_ip=src[0], source_port=src[1], destination_ip=dst[0], destination_port=dst[1]
        )
        chain = inbound.select_filter_chain(snapshot.listener, peer, transport=transport)
        if chain is None:
            return False
        if transport == "raw_buffer":
            return None if chain.tls is None else False
        if chain.tls is None:
            return False
        return self._contexts.get(chain.tls.require_client_certificate, False)

    # -- running ------------------------------------------------------------------------

    def run(self) -> None:
        """Serve on the calling thread until :meth:`stop` (or SIGINT/SIGTERM in the main
        thread)."""
        try:
            asyncio.run(self._server.serve())
        finally:
            self._close()

    def start(self, timeout: float = 10.0) -> MeshServer:
        """Serve on a background thread; returns once accepting connections."""
        self._thread = threading.Thread(target=self.run, name=f"pymesh-serve-{self.port}")
        self._thread.daemon = True
        self._thread.start()
        if not self._started.wait(timeout):
            raise PymeshError(f"pymesh.serve on {self.address} did not start in {timeout}s")
        return self

    def wait_for_serving(self, timeout: float) -> bool:
        """Block until the inbound listener arrived (SERVING)."""
        return self.middleware.wait_for_serving(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (uvicorn's graceful shutdown),
        stop watching the listener and close owned certificate providers."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._close()

    def _close(self) -> None:
        self.socket.close()
        for ctx in self._contexts.values():
            close = getattr(ctx, "close", None)
            if callable(close):
                close()
        self._contexts.clear()
        for provider in self._owned:
            provider.close()
        self._owned.clear()
        self.middleware.close()

    def __enter__(self) -> MeshServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _has_certificate(provider: CertificateProvider, wait: float) -> bool:
    try:
        provider.wait_ready(wait)
    except PymeshError:
        return False
    try:
        return provider.current().has_identity
    except PymeshError:
        return False


def _trust_domain(identity: str | None) -> str | None:
    if not identity or not identity.startswith("spiffe://"):
        return None
    return identity[len("spiffe://") :].split("/", 1)[0] or None


def serve(
    app: ASGIApp,
    port: int = 9080,
    host: str = "0.0.0.0",
    *,
    xds_client: XdsClient | None = None,
    certificate_provider: CertificateProvider | None = None,
    log_level: str = "info",
    telemetry: bool = True,
) -> None:
    """Run ``app`` on the mesh until interrupted: inbound listener policy, RBAC, and mTLS per
    PeerAuthentication (STRICT / PERMISSIVE on one port / DISABLE) with certificates from the
    bootstrap's ``file_watcher`` provider (or ``certificate_provider``), and Istio's server
    telemetry unless ``telemetry=False``. See :class:`MeshServer` for embedding
    (``start``/``stop``)."""
    MeshServer(
        app,
        port=port,
        host=host,
        xds_client=xds_client,
        certificate_provider=certificate_provider,
        log_level=log_level,
        telemetry=telemetry,
    ).run()
