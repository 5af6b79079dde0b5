"""The embedded CA: roots, intermediates, token checks and CSR signing (no I/O but files).

State directory (created on first start; private keys mode 0600)::

    root-cert.pem   root-key.pem      the self-signed root (generated mode)
    next-root-cert.pem next-root-key.pem   a root trusted but not signing yet (rotation phase 1)
    previous-roots.pem                roots still trusted during a root rotation overlap
    token-key.pem                     P-256 key signing and verifying workload tokens
    revoked-tokens                    ids (``jti``) of revoked workload tokens, one a line

Every workload certificate carries the SPIFFE ID as its URI SAN and, as its only DNS SAN,
:func:`~pymesh.security._spiffe.spiffe_dns_name` of that same ID (computed here from the
identity the token proved, never taken from the CSR, which may carry no DNS SAN): gRPC
clients check it natively (docs/mtls.md).

Plugged-in mode, Istio's ``cacerts`` layout: when ``ca-cert.pem`` exists in the directory the
CA signs with ``ca-cert.pem``/``ca-key.pem`` (an intermediate), returns
``cert-chain.pem`` after the leaf and trusts ``root-cert.pem``; it never writes those files.

The chain a caller gets is ``[leaf, intermediates..., root]`` (as istiod's), followed by any
previous roots still in the trust bundle during a rotation overlap: a client takes the
certificates up to the first self-signed one as its chain and every self-signed one as a
trust anchor.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pymesh.errors import ConfigError, PymeshError
from pymesh.security._pki import (
    PrivateKey,
    cert_pem,
    certs_from_pem,
    generate_key,
    issue_cert,
    key_from_pem,
    key_pem,
    make_root,
    same_public_key,
    write_private,
)
from pymesh.security._spiffe import SpiffeId, spiffe_dns_name
from pymesh.security._token import TokenError, issue_token, verify_token

__all__ = ["CaRefused", "CertificateAuthority"]

log = logging.getLogger("pymesh.ca")

DEFAULT_CERT_TTL = 3600.0
MIN_CERT_TTL = 30.0
MAX_CERT_TTL = 90 * 86400.0
ROOT_TTL = 10 * 365 * 86400.0
TOKEN_ISSUER = "pymesh-ca"


class CaRefused(PymeshError):
    """The CA refused a request. ``reason`` is a short counter key, ``code`` a gRPC code name."""

    def __init__(self, message: str, *, reason: str, code: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


@dataclass(frozen=True, slots=True)
class _Signer:
    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # ``cert``, the intermediates above it, the root
    roots: tuple[x509.Certificate, ...]  # the trust bundle (current root first)


def _dt(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)


class CertificateAuthority:
    """Issues X.509-SVIDs to workloads that prove their identity with a token.

    ``insecure_skip_token=True`` (dev mode) signs any CSR for an identity in the trust domain
    without a token; it is off by default and logs a warning on every use.
    ``clock`` returns the current time in seconds (injected for tests).
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        trust_domain: str = "cluster.local",
        default_ttl: float = DEFAULT_CERT_TTL,
        max_ttl: float = MAX_CERT_TTL,
        insecure_skip_token: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        SpiffeId(trust_domain, "default", "default")  # validates the trust domain
        self.trust_domain = trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.insecure_skip_token = insecure_skip_token
        self._clock = clock
        self._dir = Path(state_dir)
        self._lock = threading.Lock()
        self._next: tuple[x509.Certificate, PrivateKey] | None = None
        self.stats: Counter[str] = Counter()
        self.plugged_in = (self._dir / "ca-cert.pem").exists()
        if not self.plugged_in:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._signer = self._load_plugged() if self.plugged_in else self._load_or_create_root()
        self._token_key = self._load_or_create_token_key()
        self._revoked: frozenset[str] = frozenset()
        self._revoked_stamp: tuple[int, int] | None = None
        if insecure_skip_token:
            log.warning(
                "INSECURE: the CA signs certificates WITHOUT checking workload tokens "
                "(dev mode); never use this outside a development machine"
            )

    # -- state ---------------------------------------------------------------------------

    def _load_plugged(self) -> _Signer:
        d = self._dir
        try:
            cert = certs_from_pem((d / "ca-cert.pem").read_bytes())[0]
            key = key_from_pem((d / "ca-key.pem").read_bytes())
            roots = certs_from_pem((d / "root-cert.pem").read_bytes())
            chain_path = d / "cert-chain.pem"
            chain = certs_from_pem(chain_path.read_bytes()) if chain_path.exists() else (cert,)
        except (OSError, ValueError, IndexError) as exc:
            raise ConfigError(f"cannot load the CA certificates: {exc}", source=str(d)) from exc
        if not same_public_key(cert.public_key(), key.public_key()):
            raise ConfigError("ca-key.pem does not match ca-cert.pem", source=str(d))
        # cert-chain.pem starts with ca-cert.pem (Istio's layout); keep what is above it.
        above = tuple(c for c in chain if c != cert and c not in roots)
        return _Signer(cert, key, (cert, *above, roots[0]), roots)

    def _load_or_create_root(self) -> _Signer:
        d = self._dir
        cert_path, key_path = d / "root-cert.pem", d / "root-key.pem"
        if cert_path.exists() and key_path.exists():
            cert = certs_from_pem(cert_path.read_bytes())[0]
            key = key_from_pem(key_path.read_bytes())
        else:
            cert, key = self._new_root()
            write_private(key_path, key_pem(key))
            cert_path.write_bytes(cert_pem(cert))
            log.info("created CA root for trust domain %s in %s", self.trust_domain, d)
        self._next = None
        next_cert, next_key = d / "next-root-cert.pem", d / "next-root-key.pem"
        if next_cert.exists() and next_key.exists():
            self._next = (
                certs_from_pem(next_cert.read_bytes())[0],
                key_from_pem(next_key.read_bytes()),
            )
        previous: tuple[x509.Certificate, ...] = ()
        if self._next is not None:
            previous = (self._next[0],)
        prev_path = d / "previous-roots.pem"
        if prev_path.exists():
            now = _dt(self._clock())
            previous += tuple(
                c for c in certs_from_pem(prev_path.read_bytes()) if c.not_valid_after_utc > now
            )
        return _Signer(cert, key, (cert,), (cert, *previous))

    def _new_root(self) -> tuple[x509.Certificate, PrivateKey]:
        key = generate_key()
        cert = make_root(
            key,
            org=self.trust_domain,
            now=_dt(self._clock()),
            lifetime=datetime.timedelta(seconds=ROOT_TTL),
        )
        return cert, key

    def _load_or_create_token_key(self) -> ec.EllipticCurvePrivateKey:
        path = self._dir / "token-key.pem"
        if path.exists():
            key = key_from_pem(path.read_bytes())
        else:
            key = generate_key()
            write_private(path, key_pem(key))
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("token-key.pem must be an EC P-256 key", source=str(path))
        return key

    # -- trust ---------------------------------------------------------------------------

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """The trust bundle: the current root first, then roots kept during an overlap."""
        return self._signer.roots

    def trust_bundle_pem(self) -> bytes:
        return cert_pem(self._signer.roots)

    def add_next_root(self) -> x509.Certificate:
        """Root rotation, phase 1: create the next root and trust it (it does not sign yet).

        Every answer now carries it in the trust bundle; once all workloads renewed (one
        certificate lifetime), :meth:`activate_next_root` makes it the signer.
        """
        self._check_rotatable()
        with self._lock:
            if self._next is None:
                cert, key = self._new_root()
                write_private(self._dir / "next-root-key.pem", key_pem(key))
                (self._dir / "next-root-cert.pem").write_bytes(cert_pem(cert))
                self._next = (cert, key)
                s = self._signer
                self._signer = _Signer(s.cert, s.key, s.chain, (s.roots[0], cert, *s.roots[1:]))
            log.info("CA next root added to the trust bundle")
            return self._next[0]

    def activate_next_root(self) -> None:
        """Root rotation, phase 2: sign with the next root; the old one stays trusted until
        :meth:`retire_previous_roots` (after one more certificate lifetime)."""
        self._check_rotatable()
        if self._next is None:
            self.add_next_root()
        with self._lock:
            assert self._next is not None
            cert, key = self._next
            old = self._signer
            previous = tuple(r for r in old.roots if r != cert)
            write_private(self._dir / "root-key.pem", key_pem(key))
            (self._dir / "root-cert.pem").write_bytes(cert_pem(cert))
            (self._dir / "previous-roots.pem").write_bytes(cert_pem(previous))
            (self._dir / "next-root-cert.pem").unlink(missing_ok=True)
            (self._dir / "next-root-key.pem").unlink(missing_ok=True)
            self._next = None
            self._signer = _Signer(cert, key, (cert,), (cert, *previous))
        log.info("CA root rotated; %d previous root(s) still trusted", len(previous))

    def rotate_root(self) -> None:
        """Both phases at once (a workload that has not renewed yet will not trust peers
        signed by the new root; prefer :meth:`add_next_root` then
        :meth:`activate_next_root` a certificate lifetime later)."""
        self.add_next_root()
        self.activate_next_root()

    def _check_rotatable(self) -> None:
        if self.plugged_in:
            raise PymeshError("a plugged-in CA (cacerts) is rotated by replacing its files")

    def retire_previous_roots(self) -> None:
        """End the overlap: only the current (and a pending next) root stay trusted."""
        with self._lock:
            s = self._signer
            keep = (s.roots[0],) + ((self._next[0],) if self._next is not None else ())
            self._signer = _Signer(s.cert, s.key, s.chain, keep)
            (self._dir / "previous-roots.pem").unlink(missing_ok=True)

    # -- tokens --------------------------------------------------------------------------

    def create_token(self, namespace: str, service_account: str, *, ttl: float = 86400.0) -> str:
        """A workload token for ``NS/SA`` (what ``pymesh token create`` prints)."""
        SpiffeId(self.trust_domain, namespace, service_account)
        return issue_token(
            self._token_key,
            namespace=namespace,
            service_account=service_account,
            issuer=TOKEN_ISSUER,
            now=self._clock(),
            ttl=ttl,
        )

    def revoke_token(self, token_id: str) -> None:
        """Refuse the token with this ``jti`` from now on (``revoked-tokens`` in the state
        directory, one id per line; a running CA re-reads the file when it changes, so
        ``pymesh token revoke`` in another process takes effect)."""
        token_id = token_id.strip()
        if not token_id or any(c.isspace() for c in token_id):
            raise PymeshError(f"not a token id: {token_id!r}")
        with self._lock:
            path = self._dir / "revoked-tokens"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, (token_id + "\n").encode("ascii", "replace"))
            finally:
                os.close(fd)
            self._revoked_stamp = None

    def revoked_tokens(self) -> frozenset[str]:
        """The revoked token ids (re-read when ``revoked-tokens`` changed; one ``stat``)."""
        path = self._dir / "revoked-tokens"
        try:
            st = path.stat()
        except FileNotFoundError:
            self._revoked, self._revoked_stamp = frozenset(), None
            return self._revoked
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._revoked_stamp:
            lines = path.read_text("ascii", "replace").split()
            self._revoked, self._revoked_stamp = frozenset(lines), stamp
        return self._revoked

    def authenticate(self, metadata: Mapping[str, str]) -> SpiffeId | None:
        """The caller's identity from ``authorization: Bearer <jwt>``.

        ``None`` only in insecure dev mode without a token. Raises :class:`CaRefused`.
        """
        header = metadata.get("authorization", "")
        if not header:
            if self.insecure_skip_token:
                log.warning("INSECURE: signing without a workload token (dev mode)")
                return None
            raise self._refuse("no bearer token in 'authorization'", "no_token", "UNAUTHENTICATED")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise self._refuse(
                "authorization is not 'Bearer <token>'", "bad_token", "UNAUTHENTICATED"
            )
        try:
            ident = verify_token(
                token.strip(),
                (self._token_key.public_key(),),
                issuer=TOKEN_ISSUER,
                now=self._clock(),
            )
        except TokenError as exc:
            raise self._refuse(str(exc), "bad_token", "UNAUTHENTICATED") from exc
        if ident.token_id is not None and ident.token_id in self.revoked_tokens():
            raise self._refuse(
                f"token {ident.token_id} is revoked", "revoked_token", "UNAUTHENTICATED"
            )
        try:
            return SpiffeId(self.trust_domain, ident.namespace, ident.service_account)
        except ConfigError as exc:
            raise self._refuse(str(exc), "bad_token", "UNAUTHENTICATED") from exc

    # -- signing -------------------------------------------------------------------------

    def _refuse(self, message: str, reason: str, code: str) -> CaRefused:
        self.stats[f"refused_{reason}"] += 1
        log.warning("CA refused a request: %s", message)
        return CaRefused(message, reason=reason, code=code)

    def sign(self, csr_pem: str, validity: float, caller: SpiffeId | None) -> tuple[str, ...]:
        """Sign ``csr_pem`` for ``caller`` and return the PEM chain (see the module doc).

        Refused (:class:`CaRefused`): unparsable CSR or bad signature, anything but exactly
        one URI SAN, a SPIFFE ID other than the caller's (or outside the trust domain in dev
        mode), CA:true, a weak key, a validity above ``max_ttl``.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise self._refuse(f"unparsable CSR: {exc}", "bad_csr", "INVALID_ARGUMENT") from exc
        try:
            ok = csr.is_signature_valid
        except (ValueError, InvalidSignature, UnsupportedAlgorithm):
            ok = False
        if not ok:
            raise self._refuse("CSR signature does not verify", "bad_csr", "INVALID_ARGUMENT")
        try:  # parsed lazily: an unknown curve or a malformed extension fails here
            public = csr.public_key()
            extensions = csr.extensions
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise self._refuse(f"unparsable CSR: {exc}", "bad_csr", "INVALID_ARGUMENT") from exc
        if isinstance(public, ec.EllipticCurvePublicKey):
            if public.curve.name not in ("secp256r1", "secp384r1"):
                raise self._refuse("CSR key curve not allowed", "bad_csr", "INVALID_ARGUMENT")
        elif isinstance(public, rsa.RSAPublicKey):
            if public.key_size < 2048:
                raise self._refuse("CSR RSA key below 2048 bits", "bad_csr", "INVALID_ARGUMENT")
        else:
            raise self._refuse("CSR key type not allowed", "bad_csr", "INVALID_ARGUMENT")
        try:
            bc = extensions.get_extension_for_class(x509.BasicConstraints)
            if bc.value.ca:
                raise self._refuse("CSR asks for CA:true", "ca_requested", "PERMISSION_DENIED")
        except x509.ExtensionNotFound:
            pass
        try:
            san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise self._refuse("CSR has no SAN", "bad_csr", "INVALID_ARGUMENT") from None
        if len(san) != 1 or not isinstance(san[0], x509.UniformResourceIdentifier):
            raise self._refuse(
                "CSR must carry exactly one URI SAN (the SPIFFE ID), nothing else",
                "extra_sans",
                "PERMISSION_DENIED",
            )
        uri = san[0].value
        try:
            requested = SpiffeId.parse(uri)
        except ConfigError as exc:
            raise self._refuse(str(exc), "bad_identity", "PERMISSION_DENIED") from exc
        if requested.trust_domain != self.trust_domain:
            raise self._refuse(
                f"CSR trust domain {requested.trust_domain!r} is not {self.trust_domain!r}",
                "wrong_identity",
                "PERMISSION_DENIED",
            )
        if caller is not None and requested != caller:
            raise self._refuse(
                f"CSR asks for {uri} but the token proves {caller.uri}",
                "wrong_identity",
                "PERMISSION_DENIED",
            )
        ttl = float(validity) if validity > 0 else self.default_ttl
        if ttl > self.max_ttl:
            raise self._refuse(
                f"requested validity {ttl:.0f}s exceeds the maximum {self.max_ttl:.0f}s",
                "bad_ttl",
                "INVALID_ARGUMENT",
            )
        ttl = max(ttl, MIN_CERT_TTL)
        signer = self._signer
        now = self._clock()
        not_after = min(_dt(now + ttl), signer.cert.not_valid_after_utc)
        leaf = issue_cert(
            public,
            uri,
            issuer=signer.cert,
            issuer_key=signer.key,
            not_before=_dt(now - 60.0),
            not_after=not_after,
            # derived from the checked identity (never from the CSR): docs/mtls.md, gRPC
            dns_names=(spiffe_dns_name(requested.uri),),
        )
        self.stats["issued"] += 1
        extra_roots = tuple(r for r in signer.roots if r not in signer.chain)
        return tuple(cert_pem(c).decode("ascii") for c in (leaf, *signer.chain, *extra_roots))

    def create_certificate(
        self, csr_pem: str, validity: float, metadata: Mapping[str, str]
    ) -> tuple[str, ...]:
        """Authenticate from gRPC ``metadata`` then :meth:`sign`."""
        caller = self.authenticate(metadata)
        return self.sign(csr_pem, validity, caller)
