"""grpcio credentials from a certificate provider.

Servers: ``grpc.dynamic_ssl_server_credentials`` with a fetcher that grpc calls at each new
handshake; it returns a new certificate configuration only when the provider's bundle
changed, so a rotated certificate is served without restarting the server and connections
already open are untouched.

Channels: grpcio's ``ssl_channel_credentials`` are a fixed snapshot and check the target
name against DNS SANs (or the CN), never URI SANs, so they cannot even connect to a
SPIFFE-only server, and Python has no hook to replace the check. :func:`channel_credentials`
returns that snapshot (for DNS-named servers such as istiod's CA port).

:class:`MeshChannelCredentials` is what mesh channels use: per endpoint, the cluster's CDS
``UpstreamTlsContext`` decides plaintext or TLS; for TLS, grpcio speaks plaintext into a
private :class:`~pymesh.security._forward.TlsTunnel` whose TLS connection verifies the
server's chain against the trust bundle and its URI SAN against ``match_subject_alt_names``
(a :class:`~pymesh.security.MeshSSLContext`, following rotation). For servers whose
certificate the pymesh CA issued, sync channels use grpcio's own TLS instead
(:mod:`pymesh.security._native`: a DNS SAN derived from the SPIFFE ID, checked with
``grpc.ssl_target_name_override``). docs/mtls.md weighs the alternatives and gives the cost.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from pymesh.errors import PymeshError
from pymesh.model.matcher import MatchKind, StringMatcher
from pymesh.model.tls import CertificateProviderInstance, SanType, UpstreamTlsContext
from pymesh.security._forward import TlsTunnel
from pymesh.security._native import (
    PROBE_TIMEOUT,
    AioEndpointChannel,
    EndpointChannel,
    ProbeResult,
    probe,
    reprobe_later,
)
from pymesh.security._providers import (
    CertificateBundle,
    CertificateProvider,
    FileWatcherProvider,
)
from pymesh.security._spiffe import spiffe_dns_name
from pymesh.security._tls import MeshSSLContext, client_ssl_context

_log = logging.getLogger("pymesh.security")

__all__ = [
    "MeshChannelCredentials",
    "channel_credentials",
    "mesh_channel_credentials",
    "server_credentials",
]


def _config(bundle: CertificateBundle, with_roots: bool) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(bundle.key_pem, bundle.chain_pem)],
        root_certificates=bundle.roots_pem if with_roots else None,
    )


class _Fetcher:
    def __init__(self, provider: CertificateProvider, with_roots: bool) -> None:
        self._provider = provider
        self._with_roots = with_roots
        self._lock = threading.Lock()
        self.served_version = provider.current().version
        self.fetches = 0

    def initial(self) -> Any:
        return _config(self._provider.current(), self._with_roots)

    def __call__(self) -> Any:
        bundle = self._provider.current()
        with self._lock:
            self.fetches += 1
            if bundle.version == self.served_version:
                return None  # keep the configuration in use
            self.served_version = bundle.version
        return _config(bundle, self._with_roots)


def server_credentials(
    provider: CertificateProvider, require_client_cert: bool = True
) -> grpc.ServerCredentials:
    """TLS (mTLS with ``require_client_cert``) server credentials following ``provider``."""
    fetcher = _Fetcher(provider, with_roots=True)
    creds = grpc.dynamic_ssl_server_credentials(
        fetcher.initial(), fetcher, require_client_authentication=require_client_cert
    )
    creds._pymesh_fetcher = fetcher  # type: ignore[attr-defined]
    return creds


def channel_credentials(provider: CertificateProvider) -> grpc.ChannelCredentials:
    """A snapshot of the current bundle as ``ssl_channel_credentials`` (see the module doc)."""
    bundle = provider.current()
    if bundle.has_identity:
        return grpc.ssl_channel_credentials(
            root_certificates=bundle.roots_pem,
            private_key=bundle.key_pem,
            certificate_chain=bundle.chain_pem,
        )
    return grpc.ssl_channel_credentials(root_certificates=bundle.roots_pem)


# --------------------------------------------------------------------------- mesh client


def _tls_for_endpoint(mesh: Any, key: str) -> tuple[bool, UpstreamTlsContext | None]:
    """(found, TLS settings) of endpoint ``key`` among the clusters of the mesh channel's
    target (``mesh``: its ``MeshTarget``, with ``runtime`` and ``handle``). Per cluster,
    Envoy's rule: the first ``transport_socket_matches`` entry matching the endpoint's
    ``envoy.transport_socket_match`` metadata, else the cluster's transport socket. An
    endpoint in several of the target's clusters with different settings gets TLS if any
    of them demands it (never a downgrade)."""
    if mesh is None:
        return False, None
    snapshot = mesh.handle.current()
    names = set(snapshot.clusters) if snapshot is not None else None
    found = False
    for name, cluster_rt in list(mesh.runtime.clusters().items()):
        if names is not None and name not in names:
            continue
        host = cluster_rt.hosts.get(key)
        if host is None:
            continue
        found = True
        cluster = cluster_rt.config.cluster
        tls = cluster.tls
        if cluster.transport_socket_matches:
            metadata = host.metadata if isinstance(host.metadata, Mapping) else {}
            match = metadata.get("envoy.transport_socket_match", {})
            tls = cluster.tls_for(match if isinstance(match, Mapping) else {})
        if tls is not None:
            return True, tls
    return found, None


class MeshChannelCredentials(grpc.ChannelCredentials):
    """Channel credentials for ``pymesh.grpc.secure_channel`` / ``pymesh.grpc.aio.
    secure_channel`` that verify SPIFFE-only servers (gRFC A29 semantics, by pymesh).

    Per endpoint (subchannel) the cluster's CDS ``UpstreamTlsContext`` decides: none =>
    plaintext (as grpcio's xDS credentials with insecure fallback); TLS => grpcio speaks
    plaintext HTTP/2 into a private :class:`~pymesh.security._forward.TlsTunnel` whose TLS
    connection to the endpoint presents the workload certificate and verifies the server's
    chain against the trust bundle and its URI SAN against the context's
    ``match_subject_alt_names`` (a :class:`~pymesh.security.MeshSSLContext`: new connections
    follow certificate rotation). See docs/mtls.md for exactly what is verified.

    ``provider``: where the certificate and trust bundle come from (default: the bootstrap's
    certificate-provider instance the context names, a ``file_watcher``). ``expected_sans``
    overrides the CDS matchers; ``always_tls`` uses TLS even where CDS says plaintext (for
    endpoints outside xDS, e.g. tests and benchmarks); ``trust_domains`` additionally limits
    the server's SPIFFE trust domain. Call :meth:`close` when done (stops the tunnels).

    ``native``: ``"auto"`` (default) uses grpcio's own TLS instead of the tunnel on sync
    channels for an endpoint whose expected identity is one exact SPIFFE ID and whose
    certificate (seen by a probe handshake when the endpoint's channel opens) carries the
    DNS name the pymesh CA derives from that ID (docs/mtls.md); ``grpc.aio`` channels keep
    the tunnel (measured faster there). ``"off"``: always the tunnel; ``"always"``: grpcio's
    TLS without a probe, sync and aio, wherever the identity is one exact ID (a server
    certificate without the derived name then fails every handshake). ``stats`` counts
    ``native_endpoints``, ``tunnel_endpoints``, ``probe_<result>``, ``native_channels``
    (grpcio channels built, one more per client-certificate rotation), ``native_switches``
    (tunnel -> native after a late probe) and ``native_fallbacks`` (native -> tunnel: the
    server's certificate lost the derived name).
    """

    def __init__(
        self,
        provider: CertificateProvider | None = None,
        *,
        expected_sans: Sequence[StringMatcher] | None = None,
        trust_domains: Iterable[str] | None = None,
        bootstrap: Any = None,
        always_tls: bool = False,
        native: str = "auto",
    ) -> None:
        if native not in ("auto", "off", "always"):
            raise ValueError(f"native must be 'auto', 'off' or 'always', not {native!r}")
        # Used only if these credentials reach plain grpcio (grpc.secure_channel): TLS with
        # the system roots and a host name check, which fails closed for mesh certificates.
        super().__init__(grpc.ssl_channel_credentials()._credentials)  # type: ignore[call-arg,attr-defined]
        self._provider = provider
        self._expected = None if expected_sans is None else tuple(expected_sans)
        self._domains = None if trust_domains is None else tuple(trust_domains)
        self._bootstrap = bootstrap
        self._always_tls = always_tls
        self._native = native
        self.stats: Counter[str] = Counter()
        self._endpoint_channels: list[EndpointChannel | AioEndpointChannel] = []
        self._lock = threading.Lock()
        self._contexts: dict[Any, MeshSSLContext] = {}
        self._providers: dict[str, CertificateProvider] = {}
        self._tunnels: list[TlsTunnel] = []
        self._by_endpoint: dict[tuple[str, UpstreamTlsContext | None], TlsTunnel] = {}

    # -- what the mesh channels call (once per endpoint) ---------------------------------

    def open_subchannel(
        self, key: str, options: Sequence[tuple[str, Any]], compression: Any, mesh: Any
    ) -> grpc.Channel:
        """The grpcio channel for endpoint ``key`` (``HOST:PORT``) of a sync mesh channel
        (``mesh``: its target state; ``None``: not from xDS, use the explicit settings).

        grpcio's own TLS where the endpoint qualifies (``native``), else the tunnel."""
        found, tls = _tls_for_endpoint(mesh, key)
        if tls is None and found and not self._always_tls:
            return grpc.insecure_channel(key, options, compression)  # CDS: plaintext
        plan = self._native_plan(tls) if self._native != "off" else None
        if plan is None:
            self.stats["tunnel_endpoints"] += 1
            return grpc.insecure_channel(self._target_for(key, mesh), options, compression)
        provider, ctx, dns_name = plan

        def open_tunnel() -> grpc.Channel:
            return grpc.insecure_channel(self.tunnel_for(key, tls).target, options, compression)

        def attempt() -> str:
            result = probe(key, ctx, dns_name, PROBE_TIMEOUT)
            self.stats[f"probe_{result}"] += 1
            return result

        result = ProbeResult.NATIVE if self._native == "always" else attempt()
        if result in (ProbeResult.NO_DNS_SAN, ProbeResult.REFUSED):
            self.stats["tunnel_endpoints"] += 1
            return open_tunnel()  # the tunnel checks (and refuses) every connection itself
        channel = EndpointChannel(
            key,
            provider,
            dns_name,
            options,
            compression,
            native=result == ProbeResult.NATIVE,
            open_tunnel=open_tunnel,
            stats=self.stats,
            reprobe=attempt if self._native == "auto" else None,
        )
        with self._lock:
            self._endpoint_channels.append(channel)
        if result == ProbeResult.NATIVE:
            self.stats["native_endpoints"] += 1
        else:  # unreachable now: the tunnel until a later probe finds the name
            self.stats["tunnel_endpoints"] += 1
            reprobe_later(channel, attempt)
        return channel

    def _native_plan(
        self, tls: UpstreamTlsContext | None
    ) -> tuple[CertificateProvider, MeshSSLContext, str] | None:
        """(provider, probe context, DNS name) when grpcio's own TLS can check the expected
        identity: exactly one exact, case-sensitive URI matcher (the ISTIO_MUTUAL shape),
        inside ``trust_domains`` if those are set; else ``None`` (the tunnel)."""
        try:
            ctx = self._context(tls)
        except PymeshError:
            return None
        sans = ctx.verifier.expected_sans
        if len(sans) != 1 or sans[0].kind is not MatchKind.EXACT or sans[0].ignore_case:
            return None
        uri = sans[0].pattern
        if self._domains is not None and not any(
            uri.startswith(f"spiffe://{d}/") for d in self._domains
        ):
            return None
        return ctx.provider, ctx, spiffe_dns_name(uri)

    def open_aio_subchannel(
        self,
        key: str,
        options: Sequence[tuple[str, Any]],
        compression: Any,
        interceptors: Any,
        mesh: Any,
    ) -> grpc.aio.Channel:
        """As :meth:`open_subchannel` for ``grpc.aio``, except that ``native="auto"`` keeps
        the tunnel here: measured with 16 calls in flight the tunnel was faster than
        grpcio's own TLS on ``grpc.aio`` in every run, and no slower one call at a time
        (docs/mtls.md, Costs). ``native="always"`` uses grpcio's TLS (no probe)."""
        found, tls = _tls_for_endpoint(mesh, key)
        if tls is None and found and not self._always_tls:
            return grpc.aio.insecure_channel(key, options, compression, interceptors)
        plan = self._native_plan(tls) if self._native == "always" else None

        def open_tunnel() -> grpc.aio.Channel:
            target = self._target_for(key, mesh)
            return grpc.aio.insecure_channel(target, options, compression, interceptors)

        if plan is None:
            self.stats["tunnel_endpoints"] += 1
            return open_tunnel()
        provider, _, dns_name = plan
        channel = AioEndpointChannel(
            key,
            provider,
            dns_name,
            options,
            compression,
            interceptors=interceptors,
            native=True,
            open_tunnel=open_tunnel,
            stats=self.stats,
        )
        with self._lock:
            self._endpoint_channels.append(channel)
        self.stats["native_endpoints"] += 1
        return channel

    def tunnel_for(self, key: str, tls: UpstreamTlsContext | None = None) -> TlsTunnel:
        """The tunnel to endpoint ``key`` with the settings of ``tls`` (``None``: the
        explicit provider and matchers); one per (endpoint, settings), reused when a
        subchannel to the same endpoint is opened again."""
        with self._lock:
            found = self._by_endpoint.get((key, tls))
        if found is not None:
            return found
        try:
            ctx = self._context(tls)

            def context() -> ssl.SSLContext:
                return ctx
        except PymeshError as exc:  # settings we cannot honour: every connection refused
            reason = str(exc)
            _log.warning("gRPC upstream TLS for %s: %s", key, reason)

            def context() -> ssl.SSLContext:
                raise ValueError(reason)

        host, _, port = key.rpartition(":")
        tunnel = TlsTunnel(
            host.strip("[]"),
            int(port),
            context,
            server_hostname=(tls.sni or None) if tls is not None else None,
        )
        with self._lock:
            found = self._by_endpoint.setdefault((key, tls), tunnel)
            if found is tunnel:
                self._tunnels.append(tunnel)
        if found is not tunnel:
            tunnel.close()
        return found

    def _target_for(self, key: str, mesh: Any) -> str:
        found, tls = _tls_for_endpoint(mesh, key)
        if tls is None and found and not self._always_tls:
            return key  # CDS says plaintext for this endpoint (grpcio dials it directly)
        if tls is None and self._provider is None:
            raise PymeshError(
                f"endpoint {key} has no TLS settings in CDS and the mesh channel credentials "
                "have no certificate provider"
            )
        return self.tunnel_for(key, tls).target

    @property
    def endpoint_channels(self) -> tuple[EndpointChannel | AioEndpointChannel, ...]:
        """The channels opened on grpcio's own TLS (or waiting for a late probe)."""
        return tuple(self._endpoint_channels)

    @property
    def tunnels(self) -> tuple[TlsTunnel, ...]:
        return tuple(self._tunnels)

    def refused(self) -> int:
        """Connections refused so far (failed TLS verification or connect) over all tunnels."""
        return sum(t.stats.refused for t in self._tunnels)

    # -- contexts -----------------------------------------------------------------------

    def _context(self, tls: UpstreamTlsContext | None) -> MeshSSLContext:
        with self._lock:
            found = self._contexts.get(tls)
            if found is None:
                found = self._contexts[tls] = self._build(tls)
            return found

    def _build(self, tls: UpstreamTlsContext | None) -> MeshSSLContext:
        sans: tuple[StringMatcher, ...] = ()
        alpn: tuple[str, ...] = ("h2",)
        provider = self._provider
        if tls is not None:
            validation = tls.common.validation
            if validation is not None:
                sans = tuple(
                    m.matcher
                    for m in validation.subject_alt_names
                    if m.san_type in (SanType.ANY, SanType.URI)
                )
                if validation.subject_alt_names and not sans and self._expected is None:
                    # only DNS / IP / email matchers: not checked here, so fail closed
                    raise PymeshError(
                        "match_subject_alt_names has only DNS/IP/email SAN matchers; the "
                        "gRPC tunnel checks URI SANs only: refusing to connect"
                    )
            if provider is None:
                provider = self._provider_for(tls)
        if self._expected is not None:
            sans = self._expected
        if provider is None:
            raise PymeshError("mesh channel credentials need a certificate provider")
        return client_ssl_context(provider, sans, alpn, trust_domains=self._domains)

    def _provider_for(self, tls: UpstreamTlsContext) -> CertificateProvider:
        common = tls.common
        sources = [s for s in (common.identity, common.validation and common.validation.ca) if s]
        names = {s.instance_name for s in sources if isinstance(s, CertificateProviderInstance)}
        if len(names) != 1 or not all(isinstance(s, CertificateProviderInstance) for s in sources):
            raise PymeshError(
                "gRPC upstream TLS needs one certificate-provider instance for the certificate "
                f"and the roots (SDS secrets are not supported), got {sources!r}"
            )
        name = names.pop()
        found = self._providers.get(name)
        if found is not None:
            return found
        bootstrap = self._bootstrap
        if bootstrap is None:
            from pymesh.xds.client import XdsClient

            bootstrap = XdsClient.shared().bootstrap
        entry = bootstrap.certificate_providers.get(name)
        if entry is None or entry.file_watcher is None:
            raise PymeshError(
                f"certificate provider instance {name!r} is not a file_watcher provider of "
                "the bootstrap"
            )
        provider = FileWatcherProvider.from_config(entry.file_watcher)
        self._providers[name] = provider
        return provider

    def close(self) -> None:
        """Close every tunnel and the contexts/providers these credentials created."""
        with self._lock:
            tunnels, self._tunnels = self._tunnels, []
            self._by_endpoint.clear()
            self._endpoint_channels.clear()
            contexts = list(self._contexts.values())
            providers = list(self._providers.values())
            self._contexts.clear()
            self._providers.clear()
        for tunnel in tunnels:
            tunnel.close()
        for ctx in contexts:
            ctx.close()
        for provider in providers:
            provider.close()


def mesh_channel_credentials(
    provider: CertificateProvider | None = None,
    *,
    expected_sans: Sequence[StringMatcher] | None = None,
    trust_domains: Iterable[str] | None = None,
    always_tls: bool = False,
    native: str = "auto",
) -> MeshChannelCredentials:
    """:class:`MeshChannelCredentials` (see there)."""
    return MeshChannelCredentials(
        provider,
        expected_sans=expected_sans,
        trust_domains=trust_domains,
        always_tls=always_tls,
        native=native,
    )
