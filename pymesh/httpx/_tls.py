"""mTLS to mesh endpoints: client SSL contexts for a cluster's ``UpstreamTlsContext``.

Istio gives proxyless clients ``ISTIO_MUTUAL`` as certificate-provider instances (gRFC A29):
the bootstrap's ``default`` ``file_watcher`` for both our certificate and the roots, and the
peer's SPIFFE IDs as ``match_subject_alt_names``. :class:`UpstreamTls` turns each distinct
context into one :class:`~pymesh.security.MeshSSLContext` (cached: the pools of every
endpoint of every cluster with the same TLS settings share it), which follows certificate
rotation by itself: new connections use the new certificate, open ones keep theirs.

Which context an endpoint gets is Envoy's rule (``Cluster.tls_for``): the first
``transport_socket_matches`` entry matching the endpoint's ``envoy.transport_socket_match``
metadata, else the cluster's own transport socket (``None``: plaintext).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pymesh.bootstrap import Bootstrap
from pymesh.core.types import Host
from pymesh.errors import ConfigError
from pymesh.model.cluster import Cluster
from pymesh.model.tls import CertificateProviderInstance, UpstreamTlsContext

if TYPE_CHECKING:  # pymesh.security (cryptography, CA protos) is imported when TLS is used
    from pymesh.security import CertificateProvider, MeshSSLContext

__all__ = ["UpstreamTls", "endpoint_tls"]

_log = logging.getLogger("pymesh.httpx")
_EMPTY: Mapping[str, Any] = {}
_MATCH_KEY = "envoy.transport_socket_match"
_MAX_BY_ID = 1024


def endpoint_tls(cluster: Cluster, host: Host) -> UpstreamTlsContext | None:
    """The TLS settings for ``host`` of ``cluster`` (``None``: plaintext)."""
    if not cluster.transport_socket_matches:
        return cluster.tls
    metadata = host.metadata if isinstance(host.metadata, Mapping) else _EMPTY
    match = metadata.get(_MATCH_KEY, _EMPTY)
    return cluster.tls_for(match if isinstance(match, Mapping) else _EMPTY)


class UpstreamTls:
    """SSL contexts for upstream TLS settings, from the bootstrap's certificate providers."""

    def __init__(self, bootstrap: Bootstrap | None) -> None:
        self._bootstrap = bootstrap
        self._lock = threading.Lock()
        self._providers: dict[str, CertificateProvider] = {}
        self._contexts: dict[UpstreamTlsContext, MeshSSLContext] = {}
        # By the identity of the settings object a cluster holds (the same object for every
        # request until the next CDS update): hashing the nested settings costs ~3 us a
        # request. The entry keeps its key object alive, so an id is never reused under it.
        self._by_id: dict[int, tuple[UpstreamTlsContext, MeshSSLContext]] = {}

    def context(self, tls: UpstreamTlsContext) -> MeshSSLContext:
        """The SSL context for ``tls``; raises :class:`ConfigError` when it cannot be built
        (an SDS secret, an unknown provider instance, two different instances)."""
        hit = self._by_id.get(id(tls))
        if hit is not None and hit[0] is tls:
            return hit[1]
        with self._lock:
            found = self._contexts.get(tls)
            if found is None:
                found = self._build(tls)
                self._contexts[tls] = found
            if len(self._by_id) >= _MAX_BY_ID:  # settings objects of past CDS updates
                self._by_id.clear()
            self._by_id[id(tls)] = (tls, found)
            return found

    def _build(self, tls: UpstreamTlsContext) -> MeshSSLContext:
        common = tls.common
        validation = common.validation
        sources = [s for s in (common.identity, validation.ca if validation else None) if s]
        names = set()
        for source in sources:
            if not isinstance(source, CertificateProviderInstance):
                raise ConfigError(
                    f"upstream TLS from an SDS secret ({source!r}) is not supported by the "
                    "httpx adapter: use certificate providers (Istio's proxyless config)"
                )
            names.add(source.instance_name)
        if len(names) != 1:
            raise ConfigError(
                "upstream TLS needs one certificate-provider instance for both the "
                f"certificate and the roots, got {sorted(names) or 'none'}"
            )
        provider = self._provider(names.pop())
        sans = tuple(m.matcher for m in validation.subject_alt_names) if validation else ()
        alpn = common.alpn_protocols or ("h2", "http/1.1")
        from pymesh.security import client_ssl_context

        return client_ssl_context(provider, sans, alpn)

    def _provider(self, name: str) -> CertificateProvider:
        found = self._providers.get(name)
        if found is not None:
            return found
        instances = self._bootstrap.certificate_providers if self._bootstrap else {}
        instance = instances.get(name)
        if instance is None or instance.file_watcher is None:
            raise ConfigError(
                f"certificate provider instance {name!r} is not a file_watcher provider of "
                "the bootstrap",
                source="bootstrap",
                field=f"certificate_providers.{name}",
            )
        from pymesh.security import FileWatcherProvider

        provider = FileWatcherProvider.from_config(instance.file_watcher)
        self._providers[name] = provider
        return provider

    def close(self) -> None:
        with self._lock:
            contexts = list(self._contexts.values())
            providers = list(self._providers.values())
            self._contexts.clear()
            self._by_id.clear()
            self._providers.clear()
        for ctx in contexts:
            ctx.close()
        for provider in providers:
            provider.close()
