"""SPIFFE identities as Istio uses them: ``spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT``."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from pymesh.errors import ConfigError

__all__ = ["SPIFFE_DNS_SUFFIX", "SpiffeId", "spiffe_dns_name"]

SPIFFE_DNS_SUFFIX = "spiffe.pymesh.internal"
"""The DNS zone of the names :func:`spiffe_dns_name` derives (never resolved, never public)."""


def spiffe_dns_name(uri: str) -> str:
    """The DNS name the pymesh CA puts beside the URI SAN ``uri`` in a workload certificate:
    ``<base32(sha256(uri)[:20])>.spiffe.pymesh.internal`` (a 32-character lowercase label).

    A pure function of the SPIFFE ID, so a gRPC client can check the identity with grpcio's
    own host-name check (``grpc.ssl_target_name_override``): see docs/mtls.md."""
    digest = hashlib.sha256(uri.encode("utf-8")).digest()[:20]
    label = base64.b32encode(digest).decode("ascii").lower()  # 160 bits: 32 chars, no '='
    return f"{label}.{SPIFFE_DNS_SUFFIX}"


# Trust domain: SPIFFE ID spec (lowercase letters, digits, '.', '-', '_'); names: Kubernetes
# DNS-1123 labels for namespaces, DNS-1123 subdomains for service accounts.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_ACCOUNT = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """One workload identity. ``str(id)`` is the URI; :meth:`parse` reads one back."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise ConfigError(f"invalid SPIFFE trust domain {self.trust_domain!r}")
        if not _NAMESPACE.fullmatch(self.namespace):
            raise ConfigError(f"invalid namespace {self.namespace!r}")
        if not _ACCOUNT.fullmatch(self.service_account):
            raise ConfigError(f"invalid service account {self.service_account!r}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def dns_name(self) -> str:
        """:func:`spiffe_dns_name` of this identity."""
        return spiffe_dns_name(self.uri)

    @property
    def k8s_subject(self) -> str:
        """The Kubernetes token subject: ``system:serviceaccount:NS:SA``."""
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://TD/ns/NS/sa/SA``; raises :class:`ConfigError` for anything else."""
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise ConfigError(f"not a SPIFFE URI: {uri!r}")
        parts = uri[len(prefix) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise ConfigError(f"not an Istio SPIFFE identity (spiffe://TD/ns/NS/sa/SA): {uri!r}")
        return cls(parts[0], parts[2], parts[4])

    @classmethod
    def from_k8s_subject(cls, trust_domain: str, subject: str) -> SpiffeId:
        """From ``system:serviceaccount:NS:SA``."""
        parts = subject.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise ConfigError(f"not a service-account subject: {subject!r}")
        return cls(trust_domain, parts[2], parts[3])
