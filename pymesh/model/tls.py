"""TLS contexts of clusters (upstream) and listeners (downstream), proto-free.

Certificates are never inline: they come from a *certificate provider instance* named in
the bootstrap (gRFC A29, what proxyless gRPC and Istio's agent use) or from an SDS secret by
name (what Istio sends to sidecars: ``default`` for the workload identity, ``ROOTCA`` for the
trust bundle). The TLS layer resolves either kind of :data:`CertificateSource` to PEM data.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pymesh.model.matcher import StringMatcher

__all__ = [
    "CertificateProviderInstance",
    "CertificateSource",
    "CommonTlsContext",
    "DownstreamTlsContext",
    "SanMatcher",
    "SanType",
    "SdsSecret",
    "UpstreamTlsContext",
    "ValidationContext",
]


@dataclass(frozen=True, slots=True)
class CertificateProviderInstance:
    """A bootstrap ``certificate_providers`` entry and the certificate name inside it."""

    instance_name: str
    certificate_name: str = ""


@dataclass(frozen=True, slots=True)
class SdsSecret:
    """A secret fetched by name over SDS (Istio sidecar style: ``default``, ``ROOTCA``)."""

    name: str


CertificateSource = CertificateProviderInstance | SdsSecret
"""Where an identity certificate or a trust bundle comes from."""


class SanType(enum.Enum):
    """Which subject alternative names a :class:`SanMatcher` looks at.

    ``ANY`` is the legacy ``match_subject_alt_names`` behaviour: DNS, URI, email and IP SANs.
    """

    ANY = "any"
    DNS = "dns"
    URI = "uri"
    EMAIL = "email"
    IP_ADDRESS = "ip_address"


@dataclass(frozen=True, slots=True)
class SanMatcher:
    """One acceptable SAN of the peer certificate (any matcher matching is enough)."""

    matcher: StringMatcher
    san_type: SanType = SanType.ANY


@dataclass(frozen=True, slots=True)
class ValidationContext:
    """How to verify the peer: trust roots and acceptable SANs.

    ``ca`` is ``None`` only when ``system_root_certs`` is set (gRFC A82).
    An empty ``subject_alt_names`` accepts any SAN (chain validation only).
    """

    ca: CertificateSource | None
    subject_alt_names: tuple[SanMatcher, ...] = ()
    system_root_certs: bool = False


@dataclass(frozen=True, slots=True)
class CommonTlsContext:
    """What client and server contexts share.

    ``identity`` is our own certificate and key (``None``: present none, allowed for a
    client); ``validation`` is ``None`` when the peer is not verified (allowed for a server
    that does not require client certificates).
    """

    identity: CertificateSource | None = None
    validation: ValidationContext | None = None
    alpn_protocols: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamTlsContext:
    """TLS towards a cluster's endpoints (Envoy ``UpstreamTlsContext``)."""

    common: CommonTlsContext
    sni: str = ""


@dataclass(frozen=True, slots=True)
class DownstreamTlsContext:
    """TLS for accepted connections (Envoy ``DownstreamTlsContext``)."""

    common: CommonTlsContext
    require_client_certificate: bool = False
