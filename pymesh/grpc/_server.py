"""xDS-managed gRPC servers (gRFC A36): ``pymesh.grpc.server(...)``, grpcio's API.

:class:`XdsServer` wraps a ``grpc.Server``. When it starts, it watches its inbound listener
(``server_listener_resource_name_template`` of the bootstrap with the bound ``IP:PORT``;
Istio: ``xds.istio.io/grpc/lds/inbound/IP:PORT``) through the shared xDS client, and an
interceptor placed first applies the listener's filter chain (``_inbound.decide``) to every
RPC, reading the current snapshot once per RPC (one attribute read, no lock).

Theory of operation — serving state (:class:`ServingCore`):

=====================  ===========================  =========================================
state                  event                        next state / action
=====================  ===========================  =========================================
NOT_SERVING (start)    listener snapshot            SERVING (callback, health SERVING)
NOT_SERVING            listener error (not ambient) NOT_SERVING, message updated (callback)
SERVING                listener snapshot            SERVING, new config for *new* RPCs only
SERVING                ambient error (xDS down,     SERVING with the last good listener
                       NACKed update)
SERVING                listener removed / invalid   NOT_SERVING (callback, health NOT_SERVING)
any                    snapshot whose chains all    NOT_SERVING: no certificate provider for
                       demand TLS, plaintext port   the listener's mTLS (callback)
=====================  ===========================  =========================================

While NOT_SERVING, every RPC fails UNAVAILABLE with the reason (A36 closes connections;
grpcio gives Python no hook for that, so RPCs are refused instead). RPCs already running are
never interrupted: a listener update applies to RPCs that start after it. The health service
(``grpc.health.v1``) and reflection bypass the NOT_SERVING gate so that probes can read the
state; while SERVING they go through the filter chain like any RPC, as behind a sidecar.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from pymesh.core.rbac import PeerInfo
from pymesh.core.types import Headers, RequestInfo
from pymesh.errors import PymeshError
from pymesh.grpc import _inbound
from pymesh.model.snapshot import ServerError, ServerSnapshot
from pymesh.telemetry._grpc import grpc_server_details, grpc_server_handler
from pymesh.xds.client import XdsClient
from pymesh.xds.watch import ServerHandle, watch_server

__all__ = [
    "ServingCore",
    "ServingStatus",
    "XdsServer",
    "mesh_channel_credentials",
    "mesh_server_credentials",
    "server",
]

_log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
_UNGATED_PREFIXES = tuple(f"/{s}/" for s in (HEALTH_SERVICE, *REFLECTION_SERVICES))
_WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}


@dataclass(frozen=True, slots=True)
class ServingStatus:
    """What ``xds_serving_callback`` receives on every change of serving mode (and of the
    reason while not serving): the listening ``address`` (``IP:PORT``), whether it serves,
    and why not (``message``)."""

    address: str
    serving: bool
    message: str = ""


@dataclass(frozen=True, slots=True)
class _View:
    """The one object an RPC reads: swapped whole on every change."""

    snapshot: ServerSnapshot | None
    serving: bool
    message: str


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` / ``:PORT`` into (host without brackets, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise PymeshError(f"server address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def listener_host(host: str) -> str:
    """The IP an xDS server names its listener with: the bound IP; a wildcard bind
    (``""``, ``[::]``, ``0.0.0.0``) as grpcio's xDS server names it (``[::]`` for the
    IPv6/dual-stack wildcard and ``""``, ``0.0.0.0`` for the IPv4 one); ``localhost`` as
    ``127.0.0.1``."""
    if host in ("", "::", "*"):
        return "::"
    if host == "localhost":
        return "127.0.0.1"
    return host


def parse_peer(peer: str) -> str | None:
    """The IP of a grpcio peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    return parse_peer_address(peer)[0]


def parse_peer_address(peer: str) -> tuple[str | None, int | None]:
    """(IP, port) of a grpcio peer string; ``(None, None)`` for other kinds (``unix:``)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None, None
    host, _, port = urllib.parse.unquote(rest).rpartition(":")
    return (host.strip("[]") or None), (int(port) if port.isdigit() else None)


@functools.lru_cache(maxsize=256)
def _cert_names(pem: bytes) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(URI SANs, DNS SANs, subject) of a peer certificate; cached per PEM, since every RPC
    on a connection presents the same one (parsing costs ~20 us a call)."""
    from cryptography import x509

    uri: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    try:
        cert = x509.load_pem_x509_certificate(pem)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uri = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
            dns = tuple(san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            pass
        return uri, dns, cert.subject.rfc4514_string()
    except ValueError:
        _log.warning("peer certificate could not be parsed for RBAC")
        return uri, dns, ""


def _auth_peer(auth: Mapping[str, Any] | None, peer: PeerInfo) -> PeerInfo:
    """Fill the TLS identity of ``peer`` from grpcio's ``auth_context()``."""
    if not auth:
        return peer
    security = b"".join(auth.get("transport_security_type", ()))
    if security != b"ssl":
        return peer
    pem = list(auth.get("x509_pem_cert", ()))
    uri: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    subject = ""
    if pem:
        uri, dns, subject = _cert_names(bytes(pem[0]))
    return PeerInfo(
        source_ip=peer.source_ip,
        source_port=peer.source_port,
        destination_ip=peer.destination_ip,
        destination_port=peer.destination_port,
        tls=True,
        uri_sans=uri,
        dns_sans=dns,
        subject=subject,
    )


class ServingCore:
    """The sync/async-neutral part of an xDS server: the listener watch, the serving state
    (module table), the health status it drives, and the per-RPC verdict."""

    def __init__(
        self,
        *,
        xds_client: XdsClient | None,
        xds_serving_callback: Callable[[ServingStatus], None] | None,
        set_health: Callable[[bool], None],
        rng: random.Random | None = None,
    ) -> None:
        self._client = xds_client
        self._callback = xds_serving_callback
        self._set_health = set_health
        self.inbound = _inbound.InboundState(rng)
        self._view = _View(None, False, "waiting for the xDS listener")
        self._handle: ServerHandle | None = None
        self._cancel: Callable[[], None] | None = None
        self._address: tuple[str, int] | None = None
        self._secure = False
        self._reported: tuple[bool, str] | None = None
        self._lock = threading.Lock()
        self._owned: list[Callable[[], None]] = []
        self._front: Any = None  # pymesh.security PermissiveFront of a PERMISSIVE port

    # -- setup --------------------------------------------------------------------------

    def check_no_port(self) -> None:
        """Raise before binding a second port (the listener is named after the one port)."""
        if self._address is not None:
            raise PymeshError(
                "a pymesh xDS server serves one port (its listener is named after it); "
                f"already bound to {self.address}"
            )

    def add_port(self, address: str, port: int, *, secure: bool) -> None:
        """Record the (only) port this server serves under xDS control."""
        self.check_no_port()
        host, _ = split_address(address)
        self._address = (listener_host(host), port)
        self._secure = secure

    def add_front(self, address: str, front: Any) -> None:
        """Record the PERMISSIVE port: ``front`` (a ``PermissiveFront``) accepts on it and
        hands TLS and plaintext connections to two internal grpcio ports."""
        self.add_port(address, front.port, secure=True)
        self._front = front
        self.own(front.stop_accepting)  # connections: closed by close_front after the grace

    def close_front(self, stopped: threading.Event | None = None) -> None:
        """Close the front's connections, at once or once ``stopped`` (grpcio's stop event:
        RPCs in flight finished within the grace period) is set."""
        front = self._front
        if front is None:
            return
        if stopped is None or stopped.is_set():
            front.close()
            return

        def wait() -> None:
            stopped.wait()
            front.close()

        threading.Thread(target=wait, name="pymesh-front-stop", daemon=True).start()

    @property
    def front_port(self) -> int:
        return 0 if self._front is None else int(self._front.port)

    @property
    def permissive(self) -> bool:
        """Whether the port takes TLS and plaintext (a PERMISSIVE front listener)."""
        return self._front is not None

    def admit_transport(
        self, transport: str, client: tuple[str, int], local: tuple[str, int]
    ) -> bool:
        """The front listener's question for a new connection: may a connection of this
        transport (``"tls"`` / ``"raw_buffer"``) be served by the current listener? (STRICT:
        plaintext no; DISABLE: TLS no; Envoy's filter chain match with the transport
        protocol.) While NOT_SERVING every connection is admitted: its RPCs get
        UNAVAILABLE with the reason."""
        snapshot = self._view.snapshot
        if snapshot is None:
            return True
        peer = PeerInfo(
            source_ip=client[0],
            source_port=client[1],
            destination_ip=local[0],
            destination_port=local[1],
        )
        chain = _inbound.select_filter_chain(snapshot.listener, peer, transport=transport)
        if chain is None:
            return False
        return (chain.tls is not None) == (transport == "tls")

    @property
    def address(self) -> str:
        if self._address is None:
            return ""
        host, port = self._address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def listener_name(self) -> str | None:
        return None if self._handle is None else self._handle.listener_name

    def start(self) -> None:
        """Start watching the listener (call after the port is bound)."""
        if self._address is None:
            raise PymeshError("add a port before starting an xDS server")
        client = self._client or XdsClient.shared()
        self._set_health(False)
        host, port = self._address
        self._handle = watch_server(client, host, port)
        self._cancel = self._handle.subscribe(self._on_update)

    def own(self, close: Callable[[], None] | None) -> None:
        """Call ``close`` when the server closes (a certificate provider it owns)."""
        if close is not None:
            self._owned.append(close)

    def close(self) -> None:
        for close in self._owned:
            close()
        self._owned.clear()
        if self._cancel is not None:
            self._cancel()
            self._cancel = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._view = _View(None, False, "server stopped")

    # -- state (xDS work thread) --------------------------------------------------------

    def _on_update(self, item: ServerSnapshot | ServerError) -> None:
        current = self._view
        if isinstance(item, ServerSnapshot):
            why = _inbound.tls_only_message(item.listener, secure=self._secure)
            if why is None:
                view = _View(item, True, "")
            else:
                view = _View(None, False, why)
        elif item.ambient and current.serving:
            _log.warning("xDS server %s keeps its last listener: %s", self.address, item)
            return
        else:
            view = _View(None, False, str(item))
        self._view = view
        self._report(view)

    def _report(self, view: _View) -> None:
        key = (view.serving, view.message)
        with self._lock:
            if key == self._reported:
                return
            changed_mode = self._reported is None or self._reported[0] != view.serving
            self._reported = key
        if changed_mode:
            self._set_health(view.serving)
        if view.serving:
            _log.info("xDS server %s: SERVING", self.address)
        else:
            _log.warning("xDS server %s: NOT_SERVING: %s", self.address, view.message)
        if self._callback is not None:
            try:
                self._callback(ServingStatus(self.address, view.serving, view.message))
            except Exception:
                _log.exception("xds_serving_callback raised")

    # -- per RPC (any thread, lock-free) ------------------------------------------------

    @property
    def serving(self) -> bool:
        return self._view.serving

    @property
    def secure(self) -> bool:
        """Whether the port is a TLS port (peer certificates matter to RBAC)."""
        return self._secure

    @property
    def status(self) -> ServingStatus:
        view = self._view
        return ServingStatus(self.address, view.serving, view.message)

    def request_info(
        self, method: str, metadata: Sequence[tuple[str, Any]] | None, authority: str | None
    ) -> RequestInfo:
        items = [(k, v) for k, v in (metadata or ()) if isinstance(v, str)]
        return RequestInfo(
            method="POST",
            authority=authority or self.address,
            path=method,
            headers=Headers([("content-type", "application/grpc"), *items]),
            scheme="https" if self._secure else "http",
            grpc=True,
        )

    def peer_info(self, peer: str, auth: Mapping[str, Any] | None) -> PeerInfo:
        host, port = self._address or ("", 0)
        source_ip, source_port = parse_peer_address(peer)
        front = self._front
        if front is not None and source_port is not None:
            origin = front.origin(source_port)  # the client behind the front listener
            if origin is not None:
                source_ip, source_port = origin[0], origin[1]
        base = PeerInfo(
            source_ip=source_ip,
            source_port=source_port,
            destination_ip=None if host in _WILDCARDS else host,
            destination_port=port,
        )
        return _auth_peer(auth, base) if self._secure else base

    def decide(self, method: str, request: RequestInfo, peer: PeerInfo) -> _inbound.InboundDecision:
        """The verdict for one RPC on the current view (read once)."""
        view = self._view
        if view.snapshot is None:
            if method.startswith(_UNGATED_PREFIXES):
                return _inbound.SERVE
            return _inbound.InboundDecision(
                code=_inbound.UNAVAILABLE, message=f"xDS server not serving: {view.message}"
            )
        if self._front is not None:  # PERMISSIVE port: the transport is per connection
            transport = "tls" if peer.tls else "raw_buffer"
            return _inbound.decide(
                view.snapshot, request, peer, self.inbound, secure=peer.tls, transport=transport
            )
        return _inbound.decide(view.snapshot, request, peer, self.inbound, secure=self._secure)


# --------------------------------------------------------------------------- sync


def _host_of(context: grpc.ServicerContext) -> str | None:
    # grpcio's sync server keeps the request's :authority in its private call details; the
    # public API has no accessor. Fall back to the listening address.
    try:
        host = context._rpc_event.call_details.host  # type: ignore[attr-defined]
    except AttributeError:
        return None
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return host if isinstance(host, str) and host else None


class _Interceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Applies the inbound filter chain before the application's handler runs."""

    def __init__(self, core: ServingCore) -> None:
        self._core = core

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        # the application's interceptors see the call without the metadata exchange
        handler = continuation(grpc_server_details(handler_call_details))
        if handler is None:
            return None
        core = self._core
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]

        def admit(context: grpc.ServicerContext) -> _inbound.InboundDecision:
            request = core.request_info(method, metadata, _host_of(context))
            peer = core.peer_info(context.peer(), context.auth_context() if core.secure else None)
            decision = core.decide(method, request, peer)
            if decision.delay:
                remaining = context.time_remaining()
                time.sleep(decision.delay if remaining is None else min(decision.delay, remaining))
            if decision.code is not None:
                if decision.fault is not None:
                    decision.fault.end()
                context.abort(status_code(decision.code), decision.message)
            return decision

        def wrap_unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
            def behavior(request: Any, context: grpc.ServicerContext) -> Any:
                decision = admit(context)
                try:
                    return fn(request, context)
                finally:
                    if decision.fault is not None:
                        decision.fault.end()

            return behavior

        def wrap_stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Any:
            def behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                decision = admit(context)
                try:
                    yield from fn(request, context)
                finally:
                    if decision.fault is not None:
                        decision.fault.end()

            return behavior

        return grpc_server_handler(  # telemetry: reports every RPC (the outermost layer)
            _rewrap(handler, wrap_unary, wrap_stream),
            method,
            metadata,
            authority=_host_of,
            default_authority=core.address,
            secure=core.secure,
        )


_STATUS_BY_CODE = {member.value[0]: member for member in grpc.StatusCode}


def status_code(code: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a numeric gRPC status."""
    return _STATUS_BY_CODE.get(code, grpc.StatusCode.UNKNOWN)


def _rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap_unary: Callable[[Any], Any],
    wrap_stream: Callable[[Any], Any],
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with its behaviour wrapped (unary or streaming response)."""
    h: Any = handler
    kwargs = {
        "request_deserializer": h.request_deserializer,
        "response_serializer": h.response_serializer,
    }
    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(h.unary_unary), **kwargs)
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(h.unary_stream), **kwargs)
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(h.stream_unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(h.stream_stream), **kwargs)


def service_names_of(handlers: Sequence[Any]) -> list[str]:
    names = []
    for h in handlers:
        service_name = getattr(h, "service_name", None)
        if callable(service_name):
            name = service_name()
            if isinstance(name, str):
                names.append(name)
    return names


class XdsServer(grpc.Server):
    """A ``grpc.Server`` whose RPCs pass the xDS inbound filter chain (see the module docs).

    Same API as grpcio's server; ``serving`` / ``serving_status`` tell the xDS state and
    ``listener_name`` the watched listener.
    """

    def __init__(
        self,
        inner: grpc.Server,
        core: ServingCore,
        health: Any,
        *,
        reflection: bool,
        services: list[str] | None = None,
    ) -> None:
        self._inner = inner
        self._core = core
        self._health = health
        self._reflection = reflection
        self._services: list[str] = services if services is not None else []
        self._started = False

    # -- grpc.Server --------------------------------------------------------------------

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[Any]) -> None:
        generic_rpc_handlers = list(generic_rpc_handlers)
        self._services.extend(service_names_of(generic_rpc_handlers))
        self._inner.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self._services.append(service_name)
        self._inner.add_registered_method_handlers(service_name, method_handlers)  # type: ignore[attr-defined]

    def add_insecure_port(self, address: str) -> int:
        self._core.check_no_port()
        port = self._inner.add_insecure_port(address)
        self._core.add_port(address, port, secure=False)
        return port

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        self._core.check_no_port()
        port = self._inner.add_secure_port(address, server_credentials)
        self._core.add_port(address, port, secure=True)
        self._core.own(close_owned_provider(server_credentials))
        return port

    def add_permissive_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        """One port for mTLS and plaintext clients (PeerAuthentication PERMISSIVE), which
        grpcio cannot do by itself: a pymesh front listener on ``address`` peeks at each
        connection's first byte and forwards it to an internal TLS grpcio port (these
        credentials) or an internal plaintext one, both on loopback. The xDS listener decides
        per connection what is allowed (STRICT refuses plaintext, DISABLE refuses TLS) and
        RBAC sees the client's address and, for TLS, its certificate. Returns the port."""
        self._core.check_no_port()
        self._core.add_front(
            address, bind_front(self._inner, address, server_credentials, self._core)
        )
        self._core.own(close_owned_provider(server_credentials))
        return self._core.front_port

    def start(self) -> None:
        if self._reflection:
            from grpc_reflection.v1alpha import reflection

            names = list(dict.fromkeys([*self._services, HEALTH_SERVICE, reflection.SERVICE_NAME]))
            reflection.enable_server_reflection(names, self._inner)
        self._core.start()
        self._inner.start()
        self._started = True

    def stop(self, grace: float | None = None) -> threading.Event:
        self._core.close()
        self._health.enter_graceful_shutdown()
        stopped = self._inner.stop(grace)
        self._core.close_front(stopped)  # a PERMISSIVE port's connections, after the grace
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._inner.wait_for_termination(timeout)

    # -- xDS ----------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Whether the server currently serves under a valid xDS listener."""
        return self._core.serving

    @property
    def serving_status(self) -> ServingStatus:
        return self._core.status

    @property
    def listener_name(self) -> str | None:
        return self._core.listener_name

    def wait_for_serving(self, timeout: float) -> bool:
        """Block until SERVING (True) or ``timeout`` seconds pass (False). For tests and
        start-up scripts; the callback is the event-driven way."""
        deadline = time.monotonic() + timeout
        while not self._core.serving:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


def _sync_health(services: list[str]) -> tuple[Any, Callable[[bool], None]]:
    """The health servicer and the setter the serving state drives: the overall status
    (``""``) and every service registered on the server follow it."""
    from grpc_health.v1 import health, health_pb2

    servicer = health.HealthServicer()

    def set_health(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in dict.fromkeys(["", *services]):
            servicer.set(name, status)

    return servicer, set_health


def server(  # noqa: PLR0917 - grpcio's positional signature
    thread_pool: futures.ThreadPoolExecutor | None = None,
    handlers: Sequence[grpc.GenericRpcHandler[Any, Any]] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
    *,
    xds_serving_callback: Callable[[ServingStatus], None] | None = None,
    xds_client: XdsClient | None = None,
    health: bool = True,
    reflection: bool = True,
    rng: random.Random | None = None,
) -> XdsServer:
    """An xDS-managed ``grpc.Server`` (grpcio's ``grpc.server`` signature, plus keywords).

    ``xds_serving_callback(ServingStatus)`` is called on the xDS thread on every change of
    serving mode; ``xds_client`` defaults to ``XdsClient.shared()`` (the bootstrap from
    ``GRPC_XDS_BOOTSTRAP``); ``health`` registers ``grpc.health.v1`` (overall status
    following the serving state), ``reflection`` the reflection service.
    """
    services: list[str] = []
    servicer, set_health = _sync_health(services)
    core = ServingCore(
        xds_client=xds_client,
        xds_serving_callback=xds_serving_callback,
        set_health=set_health if health else _no_health,
        rng=rng,
    )
    inner = grpc.server(
        thread_pool or futures.ThreadPoolExecutor(max_workers=16),
        handlers=None,
        interceptors=[_Interceptor(core), *(interceptors or ())],
        options=options,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        compression=compression,
    )
    wrapper = XdsServer(inner, core, servicer, reflection=reflection, services=services)
    if health:
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(servicer, wrapper)
    if handlers:
        wrapper.add_generic_rpc_handlers(handlers)
    return wrapper


def _no_health(serving: bool) -> None:
    return None


def mesh_server_credentials(
    *,
    xds_client: XdsClient | None = None,
    instance: str = "default",
    require_client_cert: bool = True,
) -> grpc.ServerCredentials:
    """mTLS server credentials from the bootstrap's ``file_watcher`` certificate provider
    ``instance`` (Istio's agent writes ``default``): the workload certificate, key and
    trust bundle, re-read when the files change (rotation without restart).

    For ``add_secure_port`` of an xDS server whose listener demands mTLS (STRICT). Raises
    :class:`~pymesh.errors.PymeshError` when the bootstrap has no such provider.
    """
    from pymesh.security import FileWatcherProvider, server_credentials

    bootstrap = (xds_client or XdsClient.shared()).bootstrap
    entry = bootstrap.certificate_providers.get(instance)
    if entry is None or entry.file_watcher is None:
        raise PymeshError(
            f"the bootstrap has no file_watcher certificate provider {instance!r}: "
            "no certificate for an mTLS server port"
        )
    provider = FileWatcherProvider.from_config(entry.file_watcher)
    creds = server_credentials(provider, require_client_cert=require_client_cert)
    # The server that binds these credentials closes the provider (its file poller) on stop.
    creds._pymesh_provider = provider  # type: ignore[attr-defined]
    return creds


def mesh_channel_credentials(
    *,
    xds_client: XdsClient | None = None,
    expected_sans: Sequence[Any] | None = None,
    trust_domains: Iterable[str] | None = None,
) -> grpc.ChannelCredentials:
    """Client credentials for ``pymesh.grpc.secure_channel("xds:///...", creds)`` that follow
    each cluster's CDS TLS settings (DestinationRule ``ISTIO_MUTUAL``): certificates from the
    bootstrap's certificate-provider instance, the server's SPIFFE URI SAN checked against
    ``match_subject_alt_names`` (grpcio's own TLS cannot: see
    :class:`pymesh.security.MeshChannelCredentials`). Close them with ``.close()``."""
    from pymesh.security import MeshChannelCredentials

    bootstrap = (xds_client or XdsClient.shared()).bootstrap
    return MeshChannelCredentials(
        bootstrap=bootstrap, expected_sans=expected_sans, trust_domains=trust_domains
    )


def bind_front(
    inner: Any, address: str, credentials: grpc.ServerCredentials, core: ServingCore
) -> Any:
    """Bind the two internal grpcio ports of a PERMISSIVE port and its front listener."""
    from pymesh.security._forward import PermissiveFront

    host, port = split_address(address)
    tls_port = inner.add_secure_port("127.0.0.1:0", credentials)
    plain_port = inner.add_insecure_port("127.0.0.1:0")
    if not tls_port or not plain_port:
        raise PymeshError(f"could not bind the internal ports of {address}")
    return PermissiveFront(
        "" if host in _WILDCARDS else host,
        port,
        tls_port=tls_port,
        plain_port=plain_port,
        admit=core.admit_transport,
    )


def close_owned_provider(creds: grpc.ServerCredentials) -> Callable[[], None] | None:
    """The ``close`` of the certificate provider :func:`mesh_server_credentials` attached."""
    provider = getattr(creds, "_pymesh_provider", None)
    close = getattr(provider, "close", None)
    return close if callable(close) else None
