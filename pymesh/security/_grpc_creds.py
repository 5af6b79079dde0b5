"""grpcio credentials from a certificate provider.

Servers: ``grpc.dynamic_ssl_server_credentials`` with a fetcher that grpc calls at each new
handshake; it returns a new certificate configuration only when the provider's bundle
changed, so a rotated certificate is served without restarting the server and connections
already open are untouched.

Channels: grpcio's ``ssl_channel_credentials`` are a fixed snapshot and check the target
name against DNS SANs, which SPIFFE certificates do not carry. :func:`channel_credentials`
returns the snapshot for the current bundle; callers rebuild their channel on rotation
(subscribe to the provider). For SPIFFE SAN checks by grpc itself, use grpcio's xDS
credentials (``grpc.xds_channel_credentials``) with a bootstrap ``file_watcher``.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc

from pymesh.security._providers import CertificateBundle, CertificateProvider

__all__ = ["channel_credentials", "server_credentials"]


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
