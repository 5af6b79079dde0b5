"""What an ASGI request knows of its connection: transport, peer certificate, identity.

:class:`Connection` is computed once per connection by :mod:`pymesh.asgi._serve` (from the
``ssl_object`` of the asyncio transport) and put in the scope's extensions; a server that
implements the ASGI ``tls`` extension instead (``client_cert_chain``) is read from that.
:class:`Peer` is the application-facing view: ``pymesh.asgi.peer(scope)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["CONNECTION_KEY", "PEER_KEY", "Connection", "Peer", "connection_of", "peer"]

CONNECTION_KEY = "pymesh.connection"
"""Key of the :class:`Connection` in ``scope["extensions"]`` (set by ``pymesh.serve``)."""
PEER_KEY = "pymesh.peer"
"""Key of the :class:`Peer` in the scope (and in ``scope["extensions"]["pymesh"]``)."""


@dataclass(frozen=True, slots=True)
class Connection:
    """One accepted connection: ``transport`` is ``"tls"`` or ``"raw_buffer"`` (Envoy's
    names); the client certificate's URI SANs, DNS SANs, subject and PEM (empty: none);
    ``server_name`` is the SNI (not read by ``pymesh.serve``: always empty there)."""

    transport: str = "raw_buffer"
    uri_sans: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    subject: str = ""
    server_name: str = ""
    client_cert_pem: str = ""
    tls_version: int | None = None

    @property
    def tls(self) -> bool:
        return self.transport == "tls"

    @classmethod
    def from_der(cls, der: bytes | None, *, server_name: str = "") -> Connection:
        """A TLS connection whose client presented ``der`` (``None``: no certificate)."""
        if not der:
            return cls("tls", server_name=server_name)
        return cls._from_cert(x509.load_der_x509_certificate(der), server_name)

    def tls_extension(self) -> dict[str, Any]:
        """The ASGI ``tls`` scope extension of this (TLS) connection."""
        return {
            "server_cert": None,
            "client_cert_chain": [self.client_cert_pem] if self.client_cert_pem else [],
            "client_cert_name": self.subject or None,
            "client_cert_error": None,
            "tls_version": self.tls_version,
            "cipher_suite": None,
        }

    @classmethod
    def from_pem(cls, pem: str | None, *, server_name: str = "") -> Connection:
        if not pem:
            return cls("tls", server_name=server_name)
        return cls._from_cert(x509.load_pem_x509_certificate(pem.encode()), server_name)

    @classmethod
    def _from_cert(cls, cert: x509.Certificate, server_name: str) -> Connection:
        uri: tuple[str, ...] = ()
        dns: tuple[str, ...] = ()
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uri = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
            dns = tuple(san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            pass
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return cls("tls", uri, dns, cert.subject.rfc4514_string(), server_name, pem)

    @classmethod
    def from_ssl_object(cls, obj: Any) -> Connection:
        """From an ``ssl.SSLObject``/``SSLSocket`` after the handshake (``None``: plaintext)."""
        if obj is None:
            return PLAINTEXT
        try:
            der = obj.getpeercert(True)
        except ValueError:
            der = None
        conn = cls.from_der(der)
        version = _TLS_VERSIONS.get(obj.version() or "")
        return conn if version is None else replace(conn, tls_version=version)


PLAINTEXT = Connection()
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


@dataclass(frozen=True, slots=True)
class Peer:
    """The caller of a request, as Istio's authorization sees it.

    ``spiffe_id`` is the client certificate's SPIFFE URI SAN
    (``spiffe://cluster.local/ns/default/sa/productpage``); ``principal`` is Istio's
    ``source.principal`` (the same without ``spiffe://``); ``namespace`` /
    ``service_account`` / ``trust_domain`` are its parts. All ``None`` for a plaintext
    caller or one without a SPIFFE certificate. ``address`` / ``port``: the client socket.
    """

    tls: bool
    spiffe_id: str | None = None
    address: str | None = None
    port: int | None = None

    @property
    def principal(self) -> str | None:
        if self.spiffe_id is None:
            return None
        return self.spiffe_id[len("spiffe://") :]

    def _part(self, key: str) -> str | None:
        if self.spiffe_id is None:
            return None
        parts = self.spiffe_id[len("spiffe://") :].split("/")
        for i in range(1, len(parts) - 1, 2):
            if parts[i] == key:
                return parts[i + 1]
        return None

    @property
    def trust_domain(self) -> str | None:
        if self.spiffe_id is None:
            return None
        return self.spiffe_id[len("spiffe://") :].split("/", 1)[0]

    @property
    def namespace(self) -> str | None:
        return self._part("ns")

    @property
    def service_account(self) -> str | None:
        return self._part("sa")


def connection_of(scope: Mapping[str, Any]) -> Connection:
    """The scope's :class:`Connection`: set by ``pymesh.serve``, else from the ASGI ``tls``
    extension (its first ``client_cert_chain`` entry), else from the scheme."""
    ext = scope.get("extensions") or {}
    conn = ext.get(CONNECTION_KEY)
    if isinstance(conn, Connection):
        return conn
    tls = ext.get("tls")
    if isinstance(tls, Mapping):
        chain = tls.get("client_cert_chain") or ()
        return Connection.from_pem(chain[0] if chain else None)
    if scope.get("scheme") in ("https", "wss"):
        return Connection("tls")
    return PLAINTEXT


def make_peer(scope: Mapping[str, Any], conn: Connection) -> Peer:
    client = scope.get("client") or (None, None)
    spiffe = next((u for u in conn.uri_sans if u.startswith("spiffe://")), None)
    return Peer(conn.tls, spiffe, client[0], client[1])


def peer(scope_or_request: Any) -> Peer | None:
    """The :class:`Peer` of a request handled under :class:`~pymesh.asgi.MeshMiddleware`:
    pass the ASGI ``scope`` or a framework request object that has one (Starlette's
    ``request.scope``). ``None`` outside the middleware."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    if not isinstance(scope, Mapping):
        return None
    found = scope.get(PEER_KEY)
    return found if isinstance(found, Peer) else None
