"""``MeshTransport`` / ``AsyncMeshTransport``: httpx transports that route through the mesh.

Both drive the same :func:`pymesh.core.flow.call_flow` generator (STYLE.md #2); this module
only does what the flow asks: send an attempt on the endpoint's pooled connection, sleep,
fire a mirror, drop a response. Everything shared by the two transports (request and
response conversion, error translation, the mesh verdict) lives in :class:`_MeshCore`.

Connections: one connection pool per endpoint (``HOST:PORT``), protocol and TLS context:
pymesh's own HTTP/1.1 engine (:mod:`pymesh.httpx._h1`) for HTTP/1.1 upstreams, httpcore for
HTTP/2 with prior knowledge (when the cluster's protocol options say so) and for async
clients without an asyncio loop (trio); keep-alive, idle expiry from the cluster's
``idle_timeout``. When EDS removes an endpoint
from every cluster, its pool is drained: no new request uses it, and it is closed once its
connections are idle (checked at the start of each request, so the check costs nothing when
nothing was removed).

Errors: ``httpcore`` exceptions during an attempt become the flow's outcomes (connect
failure, reset, per-try timeout) so retries and outlier detection see them; a timeout that
was the *application's own* httpx timeout (shorter than the mesh's) is raised as the httpx
exception, as it would be behind a sidecar. Errors while the application reads a body are
raised as the matching httpx exceptions. With ``raise_on_mesh_error=True`` the mesh's local
replies are raised as :class:`~pymesh.errors.MeshError` subclasses instead of returned.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import ssl
import threading
import time
from asyncio import _get_running_loop as _running_loop
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Literal

import anyio
import httpcore
import httpx

from pymesh.core.flow import (
    MESH_FAILURES,
    AttemptResult,
    CallResult,
    Mirror,
    ReplyKind,
    Send,
    call_flow,
    drive_async,
    drive_sync,
    lowered_headers,
)
from pymesh.core.runtime import MeshRuntime
from pymesh.core.types import Headers, Outcome, RequestInfo, ResetKind
from pymesh.errors import (
    ConfigError,
    FaultAbortError,
    MeshError,
    NoHealthyUpstreamError,
    NoRouteError,
    NotInMeshError,
    UpstreamConnectError,
    UpstreamOverflowError,
    UpstreamTimeoutError,
)
from pymesh.httpx import _h1
from pymesh.httpx._h1 import AsyncPool, Done, SyncPool
from pymesh.httpx._targets import MeshTarget, TargetResolver, Verdict
from pymesh.httpx._tls import UpstreamTls, endpoint_tls
from pymesh.model.cluster import UpstreamProtocol
from pymesh.model.snapshot import TargetError
from pymesh.telemetry import _telemetry
from pymesh.xds.client import XdsClient

__all__ = ["RESULT_EXTENSION", "AsyncMeshTransport", "MeshTransport", "OutboundTrafficPolicy"]

_log = logging.getLogger("pymesh.httpx")

OutboundTrafficPolicy = Literal["ALLOW_ANY", "REGISTRY_ONLY"]

RESULT_EXTENSION = "pymesh.result"
"""``response.extensions[RESULT_EXTENSION]`` is the call's :class:`~pymesh.core.flow.
CallResult` (flags, attempts, cluster, host) for mesh-routed responses."""

_MAX_MIRRORS_IN_FLIGHT = 64
_MAX_SEEN_HEADERS = 256

# httpcore URLs by (scheme, endpoint host, port, target): httpcore never mutates a request's
# URL, so one object serves every request to the same endpoint and path. Bounded.
_URLS: dict[tuple[bytes, str, int, str], httpcore.URL] = {}
_MAX_URLS = 1024
_DISCARD_READ_LIMIT = 64 * 1024

_ERRORS: dict[str, type[MeshError]] = {
    ReplyKind.NO_ROUTE: NoRouteError,
    ReplyKind.CLUSTER_NOT_FOUND: NoRouteError,
    ReplyKind.UNSUPPORTED_ROUTE: NoRouteError,
    ReplyKind.NO_HEALTHY_UPSTREAM: NoHealthyUpstreamError,
    ReplyKind.OVERFLOW: UpstreamOverflowError,
    ReplyKind.TIMEOUT: UpstreamTimeoutError,
    ReplyKind.UPSTREAM_RESET: UpstreamConnectError,
    ReplyKind.FAULT_ABORT: FaultAbortError,
}

# httpcore -> httpx, most specific first (the edge translation, STYLE.md #10).
_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.NetworkError, httpx.NetworkError),
)


_ByteStream: type[Any] = type(httpcore.Request(b"GET", b"http://x/").stream)
"""httpcore's stream of a ``bytes`` body (``httpcore.Request(content=bytes)`` wraps it so)."""


def _core_request(
    method: bytes,
    url: httpcore.URL,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    extensions: dict[str, Any],
) -> httpcore.Request:
    """``httpcore.Request(method, url, headers=headers, content=body, extensions=...)``
    without the constructor's argument checks, which only coerce str to bytes and validate
    types that are already right here (bytes method, a ``URL``, a fresh list of bytes
    pairs), at ~4 µs per attempt: ``isinstance`` against ``typing.Mapping`` and
    ``typing.Sequence`` and two calls per header. ``tests/integration/httpx/test_hotpath.py``
    checks the result against the checked constructor (an httpcore upgrade that changes
    ``Request`` fails there); a ``target`` extension takes the constructor's own path."""
    if "target" in extensions:
        return httpcore.Request(method, url, headers=headers, content=body, extensions=extensions)
    request = object.__new__(httpcore.Request)
    request.method = method
    request.url = url
    request.headers = headers
    request.stream = _ByteStream(body)
    request.extensions = extensions
    return request


def _to_httpx(exc: Exception) -> Exception:
    for src, dst in _HTTPX_ERRORS:
        if isinstance(exc, src):
            new = dst(str(exc))
            new.__cause__ = exc
            return new
    return exc


def _reset_of(exc: Exception) -> ResetKind | None:
    """The flow's view of an attempt that failed with ``exc`` (``None``: not ours)."""
    if isinstance(exc, httpcore.ConnectTimeout | httpcore.ConnectError):
        return ResetKind.CONNECT_FAILURE
    if isinstance(exc, httpcore.TimeoutException):
        return ResetKind.PER_TRY_TIMEOUT
    if isinstance(exc, httpcore.RemoteProtocolError | httpcore.ReadError | httpcore.WriteError):
        return ResetKind.RESET
    return None


def _phase(exc: Exception) -> str:
    if isinstance(exc, httpcore.WriteTimeout):
        return "write"
    if isinstance(exc, httpcore.PoolTimeout):
        return "pool"
    return ""


class _Timeouts:
    """The httpcore timeouts of one attempt and whose each one is: the mesh's (route or
    per-try timeout, stream or per-try idle timeout), the cluster's ``connect_timeout``, or
    the application's own httpx timeout when that is shorter."""

    __slots__ = ("app_phases", "connect_source", "read_source", "value")

    def __init__(self, send: Send, app: dict[str, float | None]) -> None:
        t = send.timeout
        # Reads: the earliest of the attempt's deadline, the idle timeouts and the app's.
        read, source = t, "mesh"
        value = send.per_try_idle
        if value is not None and (read is None or value < read):
            read = value
        value = send.idle
        if value is not None and (read is None or value < read):
            read, source = value, "idle"
        value = app.get("read")
        if value is not None and (read is None or value < read):
            read, source = value, "app"
        app_phases: tuple[str, ...] = ()
        write = app.get("write")
        if write is not None and (t is None or write < t):
            app_phases = ("write",)
        else:
            write = t
        pool = app.get("pool")
        if pool is not None and (t is None or pool < t):
            app_phases += ("pool",)
        else:
            pool = t
        connect = send.cluster.config.cluster.connect_timeout
        connect_source = "cluster"
        if t is not None and t < connect:
            connect, connect_source = t, "mesh"
        app_connect = app.get("connect")
        if app_connect is not None and app_connect < connect:
            connect, connect_source = app_connect, "app"
        self.value = {"read": read, "write": write, "pool": pool, "connect": connect}
        self.read_source = source
        self.connect_source = connect_source
        self.app_phases = app_phases


class _Link:
    """How an attempt reaches its endpoint: TLS context (``None``: plaintext) and SNI."""

    __slots__ = ("sni", "ssl_context")

    def __init__(self, ssl_context: ssl.SSLContext | None, sni: str | None = None) -> None:
        self.ssl_context = ssl_context
        self.sni = sni


_PLAINTEXT = _Link(None)


class _Origin:
    """The application's request headers (minus ``host``): as the core saw them, and as
    bytes, so an unchanged prefix is sent without re-encoding."""

    __slots__ = ("count", "items", "raw")

    def __init__(self, items: tuple[tuple[str, str], ...], raw: list[tuple[bytes, bytes]]) -> None:
        self.items = items
        self.count = len(items)
        self.raw = raw


class _RawHeaders(Headers):
    """Response headers decoded only if a policy looks at them (most never do: a 200 is
    final without reading a header), saving a decode per request on the hot path.

    ``Headers`` keeps its items in the ``_items`` slot; this subclass leaves it unset and
    fills it on first access (``__getattr__`` runs only for an attribute not found).
    ``tests/unit/core/test_flow.py`` checks it behaves as a ``Headers``.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        if name != "_items":
            raise AttributeError(name)
        items = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in self._raw)
        self._items = items
        return items


class _MeshCore:
    """The transport half shared by sync and async: no I/O."""

    def __init__(
        self,
        xds_client: XdsClient | None,
        *,
        runtime: MeshRuntime | None,
        outbound_traffic_policy: OutboundTrafficPolicy,
        raise_on_mesh_error: bool,
        namespace: str | None,
        cluster_domain: str,
        mesh_wait: float,
        external_wait: float,
    ) -> None:
        if outbound_traffic_policy not in ("ALLOW_ANY", "REGISTRY_ONLY"):
            raise ValueError(
                "outbound_traffic_policy must be 'ALLOW_ANY' or 'REGISTRY_ONLY', "
                f"not {outbound_traffic_policy!r}"
            )
        if runtime is None:
            runtime = MeshRuntime.for_client(xds_client or XdsClient.shared())
        self.runtime = runtime
        client = runtime.client
        self.client = client  # the runtime only holds it weakly: keep it alive while we live
        if namespace is None:
            namespace = (client.bootstrap.node.namespace if client is not None else "") or "default"
        self.registry_only = outbound_traffic_policy == "REGISTRY_ONLY"
        self.raise_on_mesh_error = raise_on_mesh_error
        self.resolver = TargetResolver(
            runtime.watch,
            runtime.unwatch,
            namespace=namespace,
            cluster_domain=cluster_domain,
            mesh_wait=mesh_wait,
            external_wait=external_wait,
        )
        self.tls = UpstreamTls(client.bootstrap if client is not None else None)
        self._app_tls: ssl.SSLContext | None = None
        self._tls_errors: set[str] = set()
        self.removed: collections.deque[frozenset[str]] = collections.deque()
        self._remove_listener = runtime.add_hosts_removed_listener(self.removed.append)
        self.clock = time.monotonic
        self._seen_headers: dict[tuple[tuple[bytes, bytes], ...], tuple[str, _Origin, Headers]]
        self._seen_headers = {}

    def close(self) -> None:
        self._remove_listener()
        self.resolver.close()
        self.tls.close()

    def tls_failure(self, send: Send, error: ConfigError) -> AttemptResult:
        """TLS settings we cannot honour fail the attempt as a connection failure (what a
        sidecar without the secret does); logged once per cluster."""
        name = send.cluster.name
        if name not in self._tls_errors:
            self._tls_errors.add(name)
            _log.error("cluster %s: upstream TLS unavailable: %s", name, error)
        return AttemptResult(Outcome(reset=ResetKind.CONNECT_FAILURE))

    # -- requests -------------------------------------------------------------------------

    @staticmethod
    def port_of(url: httpx.URL) -> int:
        port = url.port
        if port is None:
            return 443 if url.scheme == "https" else 80
        return port

    def request_info(self, request: httpx.Request) -> tuple[RequestInfo, _Origin]:
        """The request as the policy core sees it, and its original header bytes.

        The header conversion is memoized per exact header list: an application sends the
        same few header sets again and again (the client's defaults plus the URL's host), so
        the usual request costs one tuple hash instead of decoding every header. Bounded:
        the memo is dropped when full (per-request headers such as tokens just miss).
        """
        raw_items = tuple(request.headers.raw)
        seen = self._seen_headers.get(raw_items)
        if seen is None:
            seen = self._convert_headers(raw_items)
        authority, origin, headers = seen
        url = request.url
        info = RequestInfo(
            request.method,
            authority or url.netloc.decode("ascii"),
            url.raw_path.decode("ascii"),
            headers,
            url.scheme,
        )
        return info, origin

    def _convert_headers(
        self, raw_items: tuple[tuple[bytes, bytes], ...]
    ) -> tuple[str, _Origin, Headers]:
        authority = ""
        raw: list[tuple[bytes, bytes]] = []
        items: list[tuple[str, str]] = []
        for pair in raw_items:
            name = pair[0].decode("latin-1").lower()
            if name == "host":
                authority = pair[1].decode("latin-1")
            else:
                raw.append(pair)
                items.append((name, pair[1].decode("latin-1")))
        lowered = tuple(items)
        # Names lowered above: no second pass. Headers and _Origin are immutable in use.
        seen = (authority, _Origin(lowered, raw), lowered_headers(lowered))
        if len(self._seen_headers) >= _MAX_SEEN_HEADERS:
            self._seen_headers.clear()
        self._seen_headers[raw_items] = seen
        return seen

    def link(self, send: Send | Mirror) -> _Link:
        """How to reach ``send.host``: mesh mTLS when the cluster says so for this endpoint,
        else the application's own scheme (``https``: TLS to the endpoint with the URL's
        host as SNI), else plaintext. Raises :class:`ConfigError` for TLS settings we cannot
        honour."""
        cluster = send.cluster.config.cluster
        if cluster.tls is not None or cluster.transport_socket_matches:
            tls = endpoint_tls(cluster, send.host)
            if tls is not None:
                return _Link(self.tls.context(tls), tls.sni or None)
        if send.request.scheme == "https":
            authority = send.request.authority
            host = authority.rsplit(":", 1)[0] if not authority.startswith("[") else ""
            return _Link(self.app_tls(), host or None)
        return _PLAINTEXT

    def app_tls(self) -> ssl.SSLContext:
        ctx = self._app_tls
        if ctx is None:
            ctx = self._app_tls = httpx.create_ssl_context()
        return ctx

    @staticmethod
    def upstream_request(  # noqa: PLR0917 - hot path, positional
        send: Send | Mirror,
        body: bytes,
        extensions: dict[str, Any],
        origin: _Origin | None = None,
        link: _Link | None = None,
        tcall: _telemetry.ClientCall | None = None,
    ) -> httpcore.Request:
        info = send.request
        address = send.host.address
        headers: list[tuple[bytes, bytes]] = [(b"host", info.authority.encode("latin-1"))]
        items = tuple(info.headers)
        if origin is not None and items[: origin.count] == origin.items:
            # The usual case: the application's headers, plus what the mesh appended
            # (x-request-id, ...): reuse the original bytes, encode only the additions.
            headers += origin.raw
            items = items[origin.count :]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in items]
        if tcall is not None:  # telemetry: trace context, metadata exchange (mesh only)
            headers += tcall.upstream_headers(send.cluster)
        scheme = b"http"
        if link is not None and link.ssl_context is not None:
            scheme = b"https"
            if link.sni:
                extensions = {**extensions, "sni_hostname": link.sni}
        key = (scheme, address.host, address.port, info.path)
        url = _URLS.get(key)
        if url is None:
            url = httpcore.URL(
                scheme=scheme,
                host=address.host.encode("ascii"),
                port=address.port,
                target=info.path.encode("ascii"),
            )
            if len(_URLS) >= _MAX_URLS:
                _URLS.clear()
            _URLS[key] = url
        return _core_request(info.method.encode("ascii"), url, headers, body, extensions)

    @staticmethod
    def outcome_of(response: httpcore.Response) -> Outcome:
        raw = response.headers
        grpc_status = None
        for k, v in raw:
            if k.lower() == b"grpc-status" and v.isdigit():
                grpc_status = int(v)
                break
        return Outcome(status=response.status, grpc_status=grpc_status, headers=_RawHeaders(raw))

    def failure(self, exc: Exception, timeouts: _Timeouts) -> AttemptResult:
        """An attempt failed with ``exc``: the flow's outcome, or raise (the app's own
        timeout, or a bug of the request itself)."""
        reset = _reset_of(exc)
        if reset is None:
            raise _to_httpx(exc) from exc
        if isinstance(exc, httpcore.ConnectTimeout):
            if timeouts.connect_source == "app":
                raise _to_httpx(exc) from exc
            if timeouts.connect_source == "mesh":
                reset = ResetKind.PER_TRY_TIMEOUT
        elif isinstance(exc, httpcore.ReadTimeout):
            if timeouts.read_source == "app":
                raise _to_httpx(exc) from exc
            if timeouts.read_source == "idle":
                return AttemptResult(Outcome(reset=reset), stream_idle=True)
        elif _phase(exc) in timeouts.app_phases:  # the app's own write / pool timeout
            raise _to_httpx(exc) from exc
        return AttemptResult(Outcome(reset=reset))

    # -- responses ------------------------------------------------------------------------

    def response_headers(
        self, raw: list[tuple[bytes, bytes]], result: CallResult
    ) -> list[tuple[bytes, bytes]]:
        ops = result.response_ops
        extra = result.response_headers_to_add
        if ops is None and not extra:
            return raw
        headers = Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)
        if ops is not None:
            headers = ops.apply(headers, result.upstream_request)
        for k, v in extra:
            headers = headers.with_set(k, v)
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]

    def local_response(
        self, result: CallResult, request: httpx.Request, target: str
    ) -> httpx.Response:
        reply = result.local_reply
        assert reply is not None
        if self.raise_on_mesh_error and reply.kind in MESH_FAILURES:
            error = _ERRORS.get(reply.kind, MeshError)
            message = reply.body.decode("utf-8", "replace") or f"HTTP {reply.status}"
            raise error(
                message, status=reply.status, flags=result.flags, body=reply.body, target=target
            )
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
        raw.append((b"content-length", str(len(reply.body)).encode("ascii")))
        raw = self.response_headers(raw, result)
        return httpx.Response(
            reply.status,
            headers=raw,
            content=reply.body,
            request=request,
            extensions={RESULT_EXTENSION: result},
        )

    def not_mesh(
        self, request: httpx.Request, mt: MeshTarget, verdict: Verdict
    ) -> httpx.Response | None:
        """The answer for a host without a usable snapshot; ``None``: pass it through."""
        error = mt.error() if verdict is Verdict.BROKEN else None
        if error is not None:
            return self.broken(request, mt.name, error)
        if self.registry_only:
            return self.refused(request, mt.name, "not a mesh service (REGISTRY_ONLY)")
        return None

    def refused(self, request: httpx.Request, target: str, why: str) -> httpx.Response:
        """REGISTRY_ONLY and the host is not a mesh service: Istio's BlackHoleCluster (502)."""
        if self.raise_on_mesh_error:
            raise NotInMeshError(why, status=502, target=target)
        return httpx.Response(502, content=b"", request=request)

    def broken(self, request: httpx.Request, target: str, error: TargetError) -> httpx.Response:
        """A mesh service whose config is unusable: 503 as a sidecar with that config."""
        if self.raise_on_mesh_error:
            raise NoHealthyUpstreamError(str(error), status=503, flags=("UH",), target=target)
        body = b"no healthy upstream"
        return httpx.Response(
            503,
            headers=[(b"content-type", b"text/plain")],
            content=body,
            request=request,
        )


def _pool_idle(pool: Any) -> bool:
    if isinstance(pool, SyncPool | AsyncPool):
        return pool.is_idle()
    return all(c.is_idle() or c.is_closed() for c in pool.connections)


def _pool_key(send: Send | Mirror, link: _Link) -> tuple[str, bool, int, str | None]:
    return (
        send.host.key,
        send.cluster.protocol is UpstreamProtocol.HTTP2,
        id(link.ssl_context),
        link.sni,
    )


class _SyncPools:
    """One pool per (endpoint, HTTP/2?, TLS): pymesh's HTTP/1.1 engine, httpcore for HTTP/2;
    draining pools close once idle."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, bool, int, str | None], Any] = {}
        self._draining: list[Any] = []
        self._lock = threading.Lock()

    def get(self, send: Send | Mirror, link: _Link) -> Any:
        key = _pool_key(send, link)
        pool = self._pools.get(key)
        if pool is None:
            with self._lock:
                pool = self._pools.get(key)
                if pool is None:
                    pool = self._pools[key] = _new_pool(send, link, SyncPool, asyncio=False)
        return pool

    def drain(self, removed: collections.deque[frozenset[str]]) -> None:
        with self._lock:
            while removed:
                keys = removed.popleft()
                for k in [k for k in self._pools if k[0] in keys]:
                    self._draining.append(self._pools.pop(k))
            still: list[Any] = []
            for pool in self._draining:
                if _pool_idle(pool):
                    pool.close()
                else:
                    still.append(pool)
            self._draining = still

    def close(self) -> None:
        with self._lock:
            pools = [*self._pools.values(), *self._draining]
            self._pools.clear()
            self._draining = []
        for pool in pools:
            pool.close()


def _new_pool(send: Send | Mirror, link: _Link, engine: type[Any], *, asyncio: bool) -> Any:
    """pymesh's HTTP/1.1 engine for HTTP/1.1 upstreams (``engine``: ``SyncPool`` or, on
    asyncio, ``AsyncPool``); httpcore for HTTP/2 upstreams and trio."""
    h2 = send.cluster.protocol is UpstreamProtocol.HTTP2
    options = send.cluster.config.cluster.http_protocol_options
    expiry = options.idle_timeout
    address = send.host.address
    if not h2 and engine is not None and _h1.AVAILABLE:
        return engine(
            address.host,
            address.port,
            ssl_context=link.ssl_context,
            sni=link.sni,
            keepalive_expiry=expiry,
            max_requests=options.max_requests_per_connection,
        )
    cls = httpcore.AsyncConnectionPool if asyncio else httpcore.ConnectionPool
    return cls(
        ssl_context=link.ssl_context,
        max_connections=None,
        max_keepalive_connections=None,
        keepalive_expiry=expiry,
        http1=not h2,
        http2=h2,
    )


class _AsyncPools:
    def __init__(self) -> None:
        self._pools: dict[tuple[str, bool, int, str | None], Any] = {}
        self._draining: list[Any] = []

    def get(self, send: Send | Mirror, link: _Link) -> Any:
        key = _pool_key(send, link)
        pool = self._pools.get(key)
        if pool is None or (type(pool) is AsyncPool and _running_loop() is None):
            # pymesh's engine runs on asyncio; under trio (no asyncio loop) httpcore's
            engine = AsyncPool if _running_loop() is not None else None
            pool = _new_pool(send, link, engine, asyncio=True)  # type: ignore[arg-type]
            old = self._pools.get(key)
            if old is not None:
                self._draining.append(old)
            self._pools[key] = pool
        return pool

    async def drain(self, removed: collections.deque[frozenset[str]]) -> None:
        while removed:
            keys = removed.popleft()
            for k in [k for k in self._pools if k[0] in keys]:
                self._draining.append(self._pools.pop(k))
        still: list[Any] = []
        for pool in self._draining:
            if _pool_idle(pool):
                await pool.aclose()
            else:
                still.append(pool)
        self._draining = still

    async def aclose(self) -> None:
        pools = [*self._pools.values(), *self._draining]
        self._pools.clear()
        self._draining = []
        for pool in pools:
            await pool.aclose()


def _released() -> None:
    """A stream's release once it was called (releasing is idempotent)."""


class _SyncStream(httpx.SyncByteStream):
    """The upstream body; closing it ends the request's accounting (``release``)."""

    def __init__(self, stream: Any, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

    def __iter__(self) -> Iterator[bytes]:
        stream = self._stream
        if type(stream) is Done:
            return iter(stream.chunks)  # read already: nothing to translate
        return self._translated()

    def _translated(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except Exception as exc:
            raise _to_httpx(exc) from exc

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            release, self._release = self._release, _released
            release()  # and the stream no longer holds the call (nor a cycle through it)

    def __del__(self) -> None:
        # A response dropped without close() must not hold its breaker slot forever.
        self._release()


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

    def __aiter__(self) -> AsyncIterator[bytes]:
        stream = self._stream
        if type(stream) is Done:
            return stream.__aiter__()  # read already: nothing to translate
        return self._translated()

    async def _translated(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except Exception as exc:
            raise _to_httpx(exc) from exc

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            release, self._release = self._release, _released
            release()  # see _SyncStream.close

    def __del__(self) -> None:
        self._release()  # see _SyncStream.__del__


class MeshTransport(httpx.BaseTransport):
    """An httpx transport that sends mesh hosts through the mesh (see the module docs).

    ``xds_client``: the :class:`~pymesh.xds.client.XdsClient` (default: the process-wide
    one from the bootstrap). ``outbound_traffic_policy``: what to do with hosts the control
    plane does not know: ``"ALLOW_ANY"`` sends them with ``passthrough`` (a plain
    ``httpx.HTTPTransport`` by default), ``"REGISTRY_ONLY"`` answers 502 as Istio's
    BlackHoleCluster. ``raise_on_mesh_error`` raises :class:`~pymesh.errors.MeshError`
    subclasses instead of returning Envoy's local replies. ``namespace`` (default: the
    bootstrap node's) expands short host names; ``mesh_wait`` / ``external_wait`` bound the
    first request's wait for the control plane's listener for a cluster-domain / other host
    (see :mod:`pymesh.httpx._targets`).
    """

    def __init__(
        self,
        xds_client: XdsClient | None = None,
        *,
        runtime: MeshRuntime | None = None,
        outbound_traffic_policy: OutboundTrafficPolicy = "ALLOW_ANY",
        raise_on_mesh_error: bool = False,
        namespace: str | None = None,
        cluster_domain: str = "cluster.local",
        mesh_wait: float = 5.0,
        external_wait: float = 0.5,
        passthrough: httpx.BaseTransport | None = None,
    ) -> None:
        self._core = _MeshCore(
            xds_client,
            runtime=runtime,
            outbound_traffic_policy=outbound_traffic_policy,
            raise_on_mesh_error=raise_on_mesh_error,
            namespace=namespace,
            cluster_domain=cluster_domain,
            mesh_wait=mesh_wait,
            external_wait=external_wait,
        )
        self._passthrough = passthrough
        self._pools = _SyncPools()
        self._mirrors: concurrent.futures.ThreadPoolExecutor | None = None
        self._mirrors_in_flight = 0

    @property
    def runtime(self) -> MeshRuntime:
        return self._core.runtime

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        core = self._core
        url = request.url
        mt = core.resolver.lookup(url.host, core.port_of(url))
        found = mt.current()
        if found is None:
            verdict = mt.verdict()
            if verdict is Verdict.UNKNOWN:
                verdict = mt.wait_sync()
            found = mt.current()
            if found is None:
                return self._not_mesh(request, mt, verdict)
        target, snapshot = found
        if core.removed:
            self._pools.drain(core.removed)
        body = request.read()
        app_timeouts, extensions = _split_extensions(request.extensions)

        def send(action: Send) -> AttemptResult:
            try:
                link = core.link(action)
            except ConfigError as exc:
                return core.tls_failure(action, exc)
            timeouts = _Timeouts(action, app_timeouts)
            req = core.upstream_request(
                action, body, {**extensions, "timeout": timeouts.value}, origin, link, tcall
            )
            try:
                resp = self._pools.get(action, link).handle_request(req)
            except httpcore.TimeoutException as exc:
                return core.failure(exc, timeouts)
            except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
                return core.failure(exc, timeouts)
            return AttemptResult(core.outcome_of(resp), resp)

        info, origin = core.request_info(request)
        tcall = _telemetry.http_client_call(info)  # telemetry: call timed
        if tcall is not None:
            info = tcall.info  # telemetry's own headers go per attempt (bytes)
        flow = call_flow(core.runtime, snapshot, info, clock=core.clock)
        result = drive_sync(
            flow,
            send=send,
            sleep=time.sleep,
            mirror=lambda m: self._mirror(m, body, tcall),
            discard=_discard_sync,
        )
        if result.local_reply is not None:
            if tcall is not None:
                _telemetry.finish_local(tcall, result, len(body))
            return core.local_response(result, request, target)
        resp = result.response
        assert isinstance(resp, httpcore.Response)
        if tcall is None:
            raw, stream, release = resp.headers, resp.stream, result.release
        else:  # counted and recorded; the server's exchange headers read, not shown
            raw, stream, release = tcall.response(
                result, resp.status, resp.headers, resp.stream, len(body)
            )
        return httpx.Response(
            resp.status,
            headers=core.response_headers(raw, result),
            stream=_SyncStream(stream, release),
            extensions={**resp.extensions, RESULT_EXTENSION: result},
        )

    def _not_mesh(self, request: httpx.Request, mt: MeshTarget, verdict: Verdict) -> httpx.Response:
        local = self._core.not_mesh(request, mt, verdict)
        return local if local is not None else self._pass(request)

    def _pass(self, request: httpx.Request) -> httpx.Response:
        if self._passthrough is None:
            self._passthrough = httpx.HTTPTransport()
        return self._passthrough.handle_request(request)

    def _mirror(
        self, action: Mirror, body: bytes, tcall: _telemetry.ClientCall | None = None
    ) -> None:
        if self._mirrors_in_flight >= _MAX_MIRRORS_IN_FLIGHT:
            return  # shadowing must never slow or queue the real traffic
        if self._mirrors is None:
            self._mirrors = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="pymesh-mirror"
            )
        try:
            link = self._core.link(action)
        except ConfigError:
            return
        self._mirrors_in_flight += 1
        timeout = action.timeout
        req = self._core.upstream_request(
            action,
            body,
            {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
            None,
            link,
            tcall,
        )
        pool = self._pools.get(action, link)

        def run() -> None:
            try:
                resp = pool.handle_request(req)
                try:
                    resp.read()
                finally:
                    resp.close()
            except Exception as exc:  # fire and forget
                _log.debug("mirror to %s failed: %r", action.host.key, exc)
            finally:
                self._mirrors_in_flight -= 1

        self._mirrors.submit(run)

    def close(self) -> None:
        if self._mirrors is not None:
            self._mirrors.shutdown(wait=True)
        self._pools.close()
        if self._passthrough is not None:
            self._passthrough.close()
        self._core.close()


_NO_EXTENSIONS: dict[str, Any] = {}


def _split_extensions(extensions: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The app's httpx timeouts, and its other request extensions (usually none: only
    ``timeout``, then a shared empty dict, never mutated: attempts copy it)."""
    timeouts = extensions.get("timeout", {})
    if len(extensions) == 1 and "timeout" in extensions:
        return timeouts, _NO_EXTENSIONS
    return timeouts, {k: v for k, v in extensions.items() if k != "timeout"}


def _discard_sync(response: object) -> None:
    assert isinstance(response, httpcore.Response)
    try:
        length = int(dict(response.headers).get(b"content-length", b"0") or 0)
        if length <= _DISCARD_READ_LIMIT:
            response.read()  # keeps the connection reusable
    except Exception:
        pass
    finally:
        response.close()


async def _discard_async(response: object) -> None:
    assert isinstance(response, httpcore.Response)
    try:
        length = int(dict(response.headers).get(b"content-length", b"0") or 0)
        if length <= _DISCARD_READ_LIMIT:
            await response.aread()
    except Exception:
        pass
    finally:
        await response.aclose()


async def _sleep(seconds: float) -> None:
    # anyio (an httpx dependency) so that asyncio and trio both work.
    await anyio.sleep(seconds)


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """The asyncio/trio twin of :class:`MeshTransport` (same arguments, same flow)."""

    def __init__(
        self,
        xds_client: XdsClient | None = None,
        *,
        runtime: MeshRuntime | None = None,
        outbound_traffic_policy: OutboundTrafficPolicy = "ALLOW_ANY",
        raise_on_mesh_error: bool = False,
        namespace: str | None = None,
        cluster_domain: str = "cluster.local",
        mesh_wait: float = 5.0,
        external_wait: float = 0.5,
        passthrough: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._core = _MeshCore(
            xds_client,
            runtime=runtime,
            outbound_traffic_policy=outbound_traffic_policy,
            raise_on_mesh_error=raise_on_mesh_error,
            namespace=namespace,
            cluster_domain=cluster_domain,
            mesh_wait=mesh_wait,
            external_wait=external_wait,
        )
        self._passthrough = passthrough
        self._pools = _AsyncPools()
        self._mirror_tasks: set[Any] = set()

    @property
    def runtime(self) -> MeshRuntime:
        return self._core.runtime

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = self._core
        url = request.url
        mt = core.resolver.lookup(url.host, core.port_of(url))
        found = mt.current()
        if found is None:
            verdict = mt.verdict()
            # Bounded wait for the first answer, without blocking the event loop (a poll:
            # it happens only for a host's first requests).
            while verdict is Verdict.UNKNOWN and time.monotonic() < mt.wait_until:
                await _sleep(0.005)
                verdict = mt.verdict()
            found = mt.current()
            if found is None:
                local = core.not_mesh(request, mt, verdict)
                return local if local is not None else await self._pass(request)
        target, snapshot = found
        if core.removed:
            await self._pools.drain(core.removed)
        body = await request.aread()
        app_timeouts, extensions = _split_extensions(request.extensions)

        async def send(action: Send) -> AttemptResult:
            try:
                link = core.link(action)
            except ConfigError as exc:
                return core.tls_failure(action, exc)
            timeouts = _Timeouts(action, app_timeouts)
            req = core.upstream_request(
                action, body, {**extensions, "timeout": timeouts.value}, origin, link, tcall
            )
            try:
                resp = await self._pools.get(action, link).handle_async_request(req)
            except httpcore.TimeoutException as exc:
                return core.failure(exc, timeouts)
            except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
                return core.failure(exc, timeouts)
            return AttemptResult(core.outcome_of(resp), resp)

        info, origin = core.request_info(request)
        tcall = _telemetry.http_client_call(info)  # telemetry: call timed
        if tcall is not None:
            info = tcall.info  # telemetry's own headers go per attempt (bytes)
        flow = call_flow(core.runtime, snapshot, info, clock=core.clock)
        result = await drive_async(
            flow,
            send=send,
            sleep=_sleep,
            mirror=lambda m: self._mirror(m, body, tcall),
            discard=_discard_async,
        )
        if result.local_reply is not None:
            if tcall is not None:
                _telemetry.finish_local(tcall, result, len(body))
            return core.local_response(result, request, target)
        resp = result.response
        assert isinstance(resp, httpcore.Response)
        if tcall is None:
            raw, stream, release = resp.headers, resp.stream, result.release
        else:  # counted and recorded; the server's exchange headers read, not shown
            raw, stream, release = tcall.response(
                result, resp.status, resp.headers, resp.stream, len(body)
            )
        return httpx.Response(
            resp.status,
            headers=core.response_headers(raw, result),
            stream=_AsyncStream(stream, release),
            extensions={**resp.extensions, RESULT_EXTENSION: result},
        )

    async def _pass(self, request: httpx.Request) -> httpx.Response:
        if self._passthrough is None:
            self._passthrough = httpx.AsyncHTTPTransport()
        return await self._passthrough.handle_async_request(request)

    def _mirror(
        self, action: Mirror, body: bytes, tcall: _telemetry.ClientCall | None = None
    ) -> None:
        import sniffio

        if len(self._mirror_tasks) >= _MAX_MIRRORS_IN_FLIGHT:
            return
        if sniffio.current_async_library() != "asyncio":
            return  # fire-and-forget needs a task spawner; trio has no global one
        import asyncio

        timeout = action.timeout
        try:
            link = self._core.link(action)
        except ConfigError:
            return
        req = self._core.upstream_request(
            action,
            body,
            {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
            None,
            link,
            tcall,
        )
        pool = self._pools.get(action, link)

        async def run() -> None:
            try:
                resp = await pool.handle_async_request(req)
                try:
                    await resp.aread()
                finally:
                    await resp.aclose()
            except Exception as exc:
                _log.debug("mirror to %s failed: %r", action.host.key, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._mirror_tasks):
            task.cancel()
        await self._pools.aclose()
        if self._passthrough is not None:
            await self._passthrough.aclose()
        self._core.close()
