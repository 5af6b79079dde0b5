"""TLS contexts from a certificate provider, with SPIFFE peer checks (stdlib ``ssl``).

Theory of operation. Python's ``ssl`` verifies the peer's chain against the trust bundle but
has no hook for URI SAN checks (Envoy's ``match_subject_alt_names``), and an ``SSLContext``
cannot drop roots or certificates once loaded. So:

- a :class:`MeshSSLContext` is the object handed to httpx / asyncio / ``socket`` users. It
  delegates ``wrap_socket`` and ``wrap_bio`` to an *inner* context built from the provider's
  current bundle. On rotation a new inner context is built and one reference swapped: new
  connections use the new certificate, connections already open keep theirs.
- inner contexts create sockets/objects of our subclasses whose ``do_handshake`` checks the
  peer's URI SAN (and trust domain) right after the TLS handshake completes and raises
  :class:`ssl.SSLCertVerificationError` on a mismatch: no application byte has been sent yet,
  since every user (httpcore, anyio, asyncio's ``sslproto``, blocking sockets) completes the
  handshake before writing.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from pymesh.model.matcher import StringMatcher
from pymesh.security._pki import uri_sans
from pymesh.security._providers import CertificateBundle, CertificateProvider

__all__ = [
    "MeshSSLContext",
    "PeerVerifier",
    "client_ssl_context",
    "peer_identity",
    "server_ssl_context",
]

DEFAULT_ALPN = ("h2", "http/1.1")


@dataclass(frozen=True, slots=True)
class PeerVerifier:
    """Post-handshake checks of the peer certificate.

    ``expected_sans``: the peer must have a URI SAN matching one of them (empty = no SAN
    check, as Envoy without ``match_subject_alt_names``). ``trust_domains``: when set, the
    peer's SPIFFE ID must be in one of them. ``require_peer``: a missing peer certificate
    fails (clients always; servers only with ``require_client_cert``).
    """

    expected_sans: tuple[StringMatcher, ...] = ()
    trust_domains: frozenset[str] | None = None
    require_peer: bool = True

    def check(self, der: bytes | None) -> str | None:
        """The peer's SPIFFE ID (or first URI SAN), or raise ``SSLCertVerificationError``."""
        if der is None:
            if self.require_peer:
                raise ssl.SSLCertVerificationError("peer presented no certificate")
            return None
        cert = x509.load_der_x509_certificate(der)
        sans = uri_sans(cert)
        if self.expected_sans and not any(
            m.matches(san) for san in sans for m in self.expected_sans
        ):
            raise ssl.SSLCertVerificationError(
                f"peer URI SANs {list(sans)} match none of the expected subject alt names"
            )
        if self.trust_domains is not None:
            domains = {_trust_domain(s) for s in sans}
            if not domains & self.trust_domains:
                raise ssl.SSLCertVerificationError(
                    f"peer identity {list(sans)} is not in trust domain(s) "
                    f"{sorted(self.trust_domains)}"
                )
        return sans[0] if sans else None


def _trust_domain(uri: str) -> str | None:
    if not uri.startswith("spiffe://"):
        return None
    return uri[len("spiffe://") :].split("/", 1)[0]


def _verify_after_handshake(obj: ssl.SSLSocket | ssl.SSLObject) -> None:
    verifier: PeerVerifier | None = getattr(obj.context, "_pymesh_verifier", None)
    if verifier is None:
        return
    identity = verifier.check(obj.getpeercert(binary_form=True))
    obj.pymesh_peer_identity = identity  # type: ignore[union-attr]


class _VerifyingSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        try:
            _verify_after_handshake(self)
        except ssl.SSLError:
            self.close()
            raise


class _VerifyingObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _verify_after_handshake(self)


def peer_identity(obj: Any) -> str | None:
    """The verified peer identity of an ``SSLSocket``/``SSLObject`` made by our contexts.

    Falls back to the first URI SAN of the peer certificate for other TLS objects
    (httpx's ``network_stream.get_extra_info("ssl_object")``, asyncio transports' ...).
    """
    ident = getattr(obj, "pymesh_peer_identity", None)
    if ident is not None:
        return str(ident)
    try:
        der = obj.getpeercert(True)  # positional: httpcore hands out the C-level _SSLSocket
    except (AttributeError, ValueError):
        return None
    if not der:
        return None
    sans = uri_sans(x509.load_der_x509_certificate(der))
    return sans[0] if sans else None


def _build_inner(
    bundle: CertificateBundle,
    *,
    server: bool,
    verifier: PeerVerifier,
    require_client_cert: bool,
    alpn: Sequence[str],
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not server:
        ctx.check_hostname = False  # SPIFFE certs have URI SANs only: checked by the verifier
    ctx.verify_mode = (
        ssl.CERT_REQUIRED if (not server or require_client_cert) else ssl.CERT_OPTIONAL
    )
    ctx.load_verify_locations(cadata=bundle.roots_pem.decode("ascii"))
    if bundle.has_identity:
        tmp = tempfile.mkdtemp(prefix="pymesh-tls-")  # mode 0700
        try:
            cert_path = os.path.join(tmp, "cert.pem")
            key_path = os.path.join(tmp, "key.pem")
            for path, data in ((cert_path, bundle.chain_pem), (key_path, bundle.key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            ctx.load_cert_chain(cert_path, key_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    ctx.sslsocket_class = _VerifyingSocket
    ctx.sslobject_class = _VerifyingObject
    ctx._pymesh_verifier = verifier  # type: ignore[attr-defined]
    return ctx


class MeshSSLContext(ssl.SSLContext):
    """An ``SSLContext`` that follows a certificate provider (see the module doc).

    Use it wherever an ``SSLContext`` goes: ``httpx.Client(verify=ctx)``,
    ``asyncio.start_server(ssl=ctx)``, ``ctx.wrap_socket(sock)``. ``swaps`` counts inner
    rebuilds; :meth:`close` stops following the provider.
    """

    _inner: ssl.SSLContext

    def __new__(cls, protocol: int, *args: Any, **kwargs: Any) -> MeshSSLContext:
        return super().__new__(cls, protocol)  # type: ignore[no-any-return]

    def __init__(
        self,
        protocol: int,
        provider: CertificateProvider,
        *,
        server: bool,
        verifier: PeerVerifier,
        require_client_cert: bool = True,
        alpn: Iterable[str] = DEFAULT_ALPN,
    ) -> None:
        self._provider = provider
        self._server = server
        self._verifier = verifier
        self._require_client_cert = require_client_cert
        self._alpn = tuple(alpn)
        self._swap_lock = threading.Lock()
        self.swaps = 0
        self.version_in_use = -1
        if not server:
            self.check_hostname = False
        self.verify_mode = ssl.CERT_REQUIRED
        self._rebuild(provider.current())
        self._unsubscribe = provider.subscribe(self._rebuild)

    def _rebuild(self, bundle: CertificateBundle) -> None:
        inner = _build_inner(
            bundle,
            server=self._server,
            verifier=self._verifier,
            require_client_cert=self._require_client_cert,
            alpn=self._alpn,
        )
        with self._swap_lock:
            if bundle.version < self.version_in_use:
                return  # a late notification of an older bundle
            self._inner = inner
            self.version_in_use = bundle.version
            self.swaps += 1

    @property
    def verifier(self) -> PeerVerifier:
        """The peer checks of this context."""
        return self._verifier

    @property
    def provider(self) -> CertificateProvider:
        """The certificate provider this context follows."""
        return self._provider

    @property
    def inner(self) -> ssl.SSLContext:
        """The context new connections use now."""
        return self._inner

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        protocols = tuple(alpn_protocols)
        if protocols != self._alpn:
            self._alpn = protocols
            self._inner.set_alpn_protocols(list(protocols))

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        return self._inner.wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:  # type: ignore[override]
        return self._inner.wrap_bio(*args, **kwargs)

    def close(self) -> None:
        self._unsubscribe()


def client_ssl_context(
    provider: CertificateProvider,
    expected_sans: Sequence[StringMatcher] = (),
    alpn: Iterable[str] = DEFAULT_ALPN,
    *,
    trust_domains: Iterable[str] | None = None,
) -> MeshSSLContext:
    """A client context: present the workload certificate (if the bundle has one), verify the
    server's chain against the trust bundle and its URI SAN against ``expected_sans``
    (Envoy's ``match_subject_alt_names``) and optionally its trust domain."""
    verifier = PeerVerifier(
        tuple(expected_sans),
        frozenset(trust_domains) if trust_domains is not None else None,
        True,
    )
    return MeshSSLContext(
        ssl.PROTOCOL_TLS_CLIENT, provider, server=False, verifier=verifier, alpn=alpn
    )


def server_ssl_context(
    provider: CertificateProvider,
    require_client_cert: bool = True,
    *,
    alpn: Iterable[str] = DEFAULT_ALPN,
    trust_domains: Iterable[str] | None = None,
    expected_sans: Sequence[StringMatcher] = (),
) -> MeshSSLContext:
    """A server context presenting the workload certificate; with ``require_client_cert``
    (mTLS STRICT) a client without a certificate chaining to the trust bundle is refused in
    the handshake. The client's identity is then :func:`peer_identity` of the connection."""
    verifier = PeerVerifier(
        tuple(expected_sans),
        frozenset(trust_domains) if trust_domains is not None else None,
        require_client_cert,
    )
    return MeshSSLContext(
        ssl.PROTOCOL_TLS_SERVER,
        provider,
        server=True,
        verifier=verifier,
        require_client_cert=require_client_cert,
        alpn=alpn,
    )
