"""Workload identity: SPIFFE IDs, certificates, providers, TLS contexts, tokens.

The pieces the adapters use for mTLS (DESIGN.md decision 7). The CA itself (the server
side) lives in :mod:`pymesh.controlplane.ca`.
"""

from pymesh.security._ca_client import CaClient, CaError
from pymesh.security._grpc_creds import (
    MeshChannelCredentials,
    channel_credentials,
    mesh_channel_credentials,
    server_credentials,
)
from pymesh.security._pki import build_csr, generate_key, uri_sans
from pymesh.security._providers import (
    CaClientProvider,
    CertificateBundle,
    CertificateProvider,
    FileWatcherProvider,
    StaticProvider,
    split_chain,
)
from pymesh.security._rotation import renewal_time, retry_delay
from pymesh.security._spiffe import SpiffeId
from pymesh.security._tls import (
    MeshSSLContext,
    PeerVerifier,
    client_ssl_context,
    peer_identity,
    server_ssl_context,
)
from pymesh.security._token import TokenError, TokenIdentity, issue_token, verify_token

__all__ = [
    "CaClient",
    "CaClientProvider",
    "CaError",
    "CertificateBundle",
    "CertificateProvider",
    "FileWatcherProvider",
    "MeshChannelCredentials",
    "MeshSSLContext",
    "PeerVerifier",
    "SpiffeId",
    "StaticProvider",
    "TokenError",
    "TokenIdentity",
    "build_csr",
    "channel_credentials",
    "client_ssl_context",
    "generate_key",
    "issue_token",
    "mesh_channel_credentials",
    "peer_identity",
    "renewal_time",
    "retry_delay",
    "server_credentials",
    "server_ssl_context",
    "split_chain",
    "uri_sans",
    "verify_token",
]
