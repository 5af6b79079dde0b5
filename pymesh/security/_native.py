"""gRPC clients on grpcio's own TLS for pymesh-issued server certificates (the fast path).

grpcio checks the server certificate's chain against the roots it is given and a DNS SAN
against the target name (``grpc.ssl_target_name_override``), never a URI SAN. The pymesh CA
puts into every workload certificate, beside the SPIFFE ID, one DNS SAN that is a pure
function of it (:func:`~pymesh.security._spiffe.spiffe_dns_name`). So where the expected
identity is one exact SPIFFE ID (``ISTIO_MUTUAL``), overriding the target name with the DNS
name of that ID makes grpcio's handshake prove what the tunnel's URI SAN check proves, with
the caveat of docs/mtls.md (every CA in the trust bundle must be one that never signs a
``*.spiffe.pymesh.internal`` name for another identity).

Whether an endpoint's certificate carries that name is learned by a probe: one TLS handshake
with Python's ``ssl`` and the full SPIFFE checks, reading the server certificate's DNS SANs.
Endpoints whose certificate lacks it (istiod, cert-manager, files) keep the tunnel.

An :class:`EndpointChannel` is the ``grpc.Channel`` the mesh channel gets for such an
endpoint: its multicallables pick the current inner grpcio channel per call, so after the
client certificate rotates (or a late probe succeeds) new calls go to a new inner channel on
new credentials, while calls in flight finish on the old one (it is dropped, not closed:
grpcio keeps a channel alive while calls on it are).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
from cryptography import x509

from pymesh.security._providers import CertificateBundle, CertificateProvider

__all__ = ["AioEndpointChannel", "EndpointChannel", "ProbeResult", "native_channel", "probe"]

_log = logging.getLogger("pymesh.security")

FALLBACK_PROBE_INTERVAL = 5.0
"""Seconds between probes of a native endpoint that fails to connect."""
PROBE_TIMEOUT = 1.0
"""Seconds one probe handshake may take (it runs when the endpoint's subchannel opens)."""
REPROBE_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
"""Delays of the background re-probes of an endpoint that was unreachable at first."""


class ProbeResult:
    NATIVE = "native"  # verified, and the certificate carries the derived DNS name
    NO_DNS_SAN = "no_dns_san"  # verified, but no derived name: the tunnel is needed
    REFUSED = "refused"  # TLS verification failed (the tunnel refuses it as well)
    UNREACHABLE = "unreachable"  # no connection (try again later)


def _dns_sans(der: bytes) -> tuple[str, ...]:
    cert = x509.load_der_x509_certificate(der)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(ext.value.get_values_for_type(x509.DNSName))


def probe(key: str, context: ssl.SSLContext, dns_name: str, timeout: float) -> str:
    """Handshake with endpoint ``key`` (``HOST:PORT``) using ``context`` (a client
    ``MeshSSLContext``: chain and URI SAN checked) and tell whether its certificate carries
    ``dns_name`` (a :class:`ProbeResult` value)."""
    host, _, port = key.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError:
        return ProbeResult.UNREACHABLE
    try:
        try:
            with context.wrap_socket(sock) as tls:
                der = tls.getpeercert(binary_form=True)
        except ssl.SSLCertVerificationError:
            return ProbeResult.REFUSED
        except (ssl.SSLError, ValueError):
            return ProbeResult.REFUSED
        except OSError:
            return ProbeResult.UNREACHABLE
    finally:
        sock.close()
    if der is None:
        return ProbeResult.REFUSED
    return ProbeResult.NATIVE if dns_name in _dns_sans(der) else ProbeResult.NO_DNS_SAN


def native_channel(
    key: str,
    bundle: CertificateBundle,
    dns_name: str,
    options: Sequence[tuple[str, Any]],
    compression: Any,
) -> grpc.Channel:
    """A grpcio TLS channel to ``key`` trusting only ``bundle``'s roots, presenting its
    certificate, and requiring the server certificate to carry ``dns_name``. Its calls'
    ``:authority`` is ``key`` (``grpc.default_authority`` is dropped, see below)."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=bundle.roots_pem,
        private_key=bundle.key_pem if bundle.has_identity else None,
        certificate_chain=bundle.chain_pem if bundle.has_identity else None,
    )
    return grpc.secure_channel(key, creds, native_options(options, dns_name), compression)


def native_options(options: Sequence[tuple[str, Any]], dns_name: str) -> list[tuple[str, Any]]:
    """``options`` with the target name overridden by ``dns_name`` and without
    ``grpc.default_authority``: grpcio checks every call's ``:authority`` against the server
    certificate too unless it is the target's own (``HOST:PORT``), so the mesh's authority
    cannot be kept on this path (docs/mtls.md)."""
    drop = ("grpc.ssl_target_name_override", "grpc.default_authority")
    opts = [(k, v) for k, v in options if k not in drop]
    opts.append(("grpc.ssl_target_name_override", dns_name))
    return opts


class _Multi:
    """A multicallable that calls through the endpoint channel's current inner channel."""

    __slots__ = ("_args", "_ch", "_gen", "_kind", "_mc")

    def __init__(self, ch: _Swapping, kind: str, args: tuple[Any, ...]) -> None:
        self._ch = ch
        self._kind = kind
        self._args = args
        self._gen = -1
        self._mc: Any = None

    def _get(self) -> Any:
        ch = self._ch
        if ch.stale:
            ch.refresh()
        gen, inner = ch.state
        if gen != self._gen:
            method, ser, deser, registered = self._args
            self._mc = getattr(inner, self._kind)(method, ser, deser, _registered_method=registered)
            self._gen = gen
        return self._mc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get()(*args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._get().with_call(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._get().future(*args, **kwargs)


class _Swapping(abc.ABC):
    """What the sync and aio endpoint channels share: the current inner channel
    (``state``: generation, channel) and its replacement on a new certificate or a switch
    from the tunnel to grpcio's TLS."""

    def __init__(
        self,
        key: str,
        provider: CertificateProvider,
        dns_name: str,
        *,
        native: bool,
        open_tunnel: Callable[[], Any],
        stats: Any,
    ) -> None:
        self.key = key
        self._provider = provider
        self._dns = dns_name
        self._open_tunnel = open_tunnel
        self._stats = stats
        self._lock = threading.Lock()
        self._closed = False
        self.native = native
        self.stale = False
        self.version = -1
        self.state: tuple[int, Any] = (0, self._build())
        self._unsubscribe = provider.subscribe(self._on_bundle)

    @abc.abstractmethod
    def _open_native(self, bundle: CertificateBundle) -> Any:
        """A grpcio channel to the endpoint on grpcio's own TLS with ``bundle``."""

    @abc.abstractmethod
    def _retire(self, old: Any, new: Any) -> None:
        """The old inner channel was replaced by ``new`` (calls in flight finish on it)."""

    def _build(self) -> Any:
        if not self.native:
            return self._open_tunnel()
        bundle = self._provider.current()
        self.version = bundle.version
        self._stats["native_channels"] += 1
        return self._open_native(bundle)

    def _on_bundle(self, bundle: CertificateBundle) -> None:
        if self.native and bundle.version != self.version:
            self.stale = True  # the next call builds a channel on the new certificate

    @property
    def closed(self) -> bool:
        return self._closed

    def switch_to_native(self) -> None:
        """A late probe found the derived name: new calls go over grpcio's TLS."""
        with self._lock:
            if self.native or self._closed:
                return
            self.native = True
            self.stale = True
        self._stats["native_switches"] += 1

    def refresh(self) -> None:
        """Build the inner channel anew (new certificate, or tunnel -> native)."""
        with self._lock:
            if not self.stale or self._closed:
                return
            self.stale = False
            gen, old = self.state
            inner = self._build()
            self.state = (gen + 1, inner)
        self._retire(old, inner)

    def _multi(self, kind: str, method: str, ser: Any, deser: Any, registered: Any) -> _Multi:
        return _Multi(self, kind, (method, ser, deser, registered))

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = False,
    ) -> Any:
        return self._multi(
            "unary_unary", method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = False,
    ) -> Any:
        return self._multi(
            "unary_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = False,
    ) -> Any:
        return self._multi(
            "stream_unary", method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = False,
    ) -> Any:
        return self._multi(
            "stream_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def _mark_closed(self) -> Any:
        """Mark closed, stop following the provider; the inner channel to close (or None)."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            inner = self.state[1]
        self._unsubscribe()
        return inner


class EndpointChannel(_Swapping, grpc.Channel):  # type: ignore[misc]
    """One endpoint's sync channel: grpcio's own TLS when native, else the tunnel (module
    doc). An old inner channel is dropped, not closed: grpcio keeps it while calls on it
    run. ``stats`` (shared with the credentials) counts ``native_channels`` (inner channels
    built on new credentials) and ``native_switches`` (tunnel -> native after a probe)."""

    def __init__(
        self,
        key: str,
        provider: CertificateProvider,
        dns_name: str,
        options: Sequence[tuple[str, Any]],
        compression: Any,
        *,
        native: bool,
        open_tunnel: Callable[[], grpc.Channel],
        stats: Any,
        reprobe: Callable[[], str] | None = None,
    ) -> None:
        self._options = list(options)
        self._compression = compression
        self._callbacks: list[tuple[Callable[[grpc.ChannelConnectivity], None], bool]] = []
        self._reprobe = reprobe
        self._probing = False
        self._last_probe = -FALLBACK_PROBE_INTERVAL
        _Swapping.__init__(
            self, key, provider, dns_name, native=native, open_tunnel=open_tunnel, stats=stats
        )
        if reprobe is not None:
            self.subscribe(self._on_state)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        """Native and failing to connect: probe (at most every few seconds, one at a time);
        a server certificate without the derived name now moves the endpoint to the tunnel."""
        if state is not grpc.ChannelConnectivity.TRANSIENT_FAILURE or self._reprobe is None:
            return
        now = time.monotonic()
        with self._lock:
            if not self.native or self._closed or self._probing:
                return
            if now - self._last_probe < FALLBACK_PROBE_INTERVAL:
                return
            self._probing, self._last_probe = True, now
        reprobe = self._reprobe

        def run() -> None:
            try:
                if reprobe() == ProbeResult.NO_DNS_SAN:
                    self.switch_to_tunnel()
            finally:
                self._probing = False

        threading.Thread(target=run, name=f"pymesh-grpc-probe-{self.key}", daemon=True).start()

    def switch_to_tunnel(self) -> None:
        """The server's certificate no longer carries the derived name (e.g. now from
        istiod): new calls go through the tunnel."""
        with self._lock:
            if not self.native or self._closed:
                return
            self.native = False
            self.stale = True
        self._stats["native_fallbacks"] += 1
        _log.info(
            "gRPC endpoint %s: certificate without the derived name, using the tunnel", self.key
        )

    def _open_native(self, bundle: CertificateBundle) -> Any:
        return native_channel(self.key, bundle, self._dns, self._options, self._compression)

    def _retire(self, old: Any, new: Any) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback, try_to_connect in callbacks:
            try:
                old.unsubscribe(callback)
                new.subscribe(callback, try_to_connect=try_to_connect)
            except Exception:  # connectivity reports are best effort
                pass

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        with self._lock:
            self._callbacks.append((callback, try_to_connect))
            inner = self.state[1]
        inner.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            self._callbacks = [(c, t) for c, t in self._callbacks if c is not callback]
            inner = self.state[1]
        inner.unsubscribe(callback)

    def close(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
            self._callbacks.clear()
        inner = self._mark_closed()
        if inner is None:
            return
        for callback, _ in callbacks:
            try:
                inner.unsubscribe(callback)
            except Exception:
                pass
        inner.close()

    def __enter__(self) -> EndpointChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RETIRE_GRACE = 30.0
"""Seconds an aio endpoint's replaced inner channel lets calls in flight finish
(``grpc.aio.Channel.close(grace)``) before cancelling them."""


class AioEndpointChannel(_Swapping, grpc.aio.Channel):  # type: ignore[misc]
    """The ``grpc.aio`` twin of :class:`EndpointChannel`; a replaced inner channel is closed
    with a grace period of :data:`RETIRE_GRACE` (calls in flight finish first)."""

    def __init__(
        self,
        key: str,
        provider: CertificateProvider,
        dns_name: str,
        options: Sequence[tuple[str, Any]],
        compression: Any,
        *,
        interceptors: Any,
        native: bool,
        open_tunnel: Callable[[], grpc.aio.Channel],
        stats: Any,
    ) -> None:
        self._options = list(options)
        self._compression = compression
        self._interceptors = interceptors
        self._closing: set[Any] = set()
        _Swapping.__init__(
            self, key, provider, dns_name, native=native, open_tunnel=open_tunnel, stats=stats
        )

    def _open_native(self, bundle: CertificateBundle) -> Any:
        creds = grpc.ssl_channel_credentials(
            root_certificates=bundle.roots_pem,
            private_key=bundle.key_pem if bundle.has_identity else None,
            certificate_chain=bundle.chain_pem if bundle.has_identity else None,
        )
        return grpc.aio.secure_channel(
            self.key,
            creds,
            native_options(self._options, self._dns),
            self._compression,
            self._interceptors,
        )

    def _retire(self, old: Any, new: Any) -> None:
        task = asyncio.get_running_loop().create_task(old.close(RETIRE_GRACE))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.state[1].get_state(try_to_connect)  # type: ignore[no-any-return]

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.state[1].wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.state[1].channel_ready()

    async def close(self, grace: float | None = None) -> None:
        inner = self._mark_closed()
        if inner is not None:
            await inner.close(grace)

    async def __aenter__(self) -> AioEndpointChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)


def reprobe_later(
    channel: _Swapping,
    attempt: Callable[[], str],
    delays: Sequence[float] = REPROBE_DELAYS,
) -> threading.Thread:
    """Probe again in the background (bounded attempts) and switch ``channel`` to native
    when the derived name is found; stops at the first definite answer."""
    stop = threading.Event()

    def run() -> None:
        for delay in delays:
            if stop.wait(delay) or channel.closed:
                return
            result = attempt()
            if result == ProbeResult.NATIVE:
                channel.switch_to_native()
                return
            if result != ProbeResult.UNREACHABLE:
                return

    thread = threading.Thread(target=run, name=f"pymesh-grpc-probe-{channel.key}", daemon=True)
    thread.start()
    return thread
