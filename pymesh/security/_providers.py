"""Certificate providers: where a workload's certificate, key and trust bundle come from.

Every provider holds one immutable :class:`CertificateBundle` and swaps it atomically on
change, then notifies subscribers (TLS contexts rebuild from it; connections already open
keep the certificate they were made with). Providers:

- :class:`StaticProvider` -- a bundle given in code (tests, or a cert managed elsewhere);
- :class:`FileWatcherProvider` -- the bootstrap ``file_watcher`` plugin (gRFC A29): files
  written by Istio's agent or cert-manager, re-read when their stat changes (a cheap poll);
- :class:`CaClientProvider` -- key + CSR, ``CreateCertificate`` over gRPC with a token, renewed
  at a fraction of the lifetime with jitter, failures retried with backoff
  (:mod:`pymesh.security._rotation` decides the times; this module only acts).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from pymesh.bootstrap import FileWatcherConfig
from pymesh.errors import ConfigError, PymeshError
from pymesh.security._pki import (
    PrivateKey,
    build_csr,
    cert_pem,
    certs_from_pem,
    generate_key,
    key_from_pem,
    key_pem,
    same_public_key,
    uri_sans,
)
from pymesh.security._rotation import renewal_time, retry_delay
from pymesh.security._spiffe import SpiffeId

__all__ = [
    "CaClientProvider",
    "CertificateBundle",
    "CertificateProvider",
    "FileWatcherProvider",
    "StaticProvider",
]

log = logging.getLogger("pymesh.security")

Listener = Callable[["CertificateBundle"], None]


@dataclass(frozen=True, slots=True)
class CertificateBundle:
    """One consistent (chain, key, trust bundle) triple, PEM encoded.

    ``chain_pem``/``key_pem`` are empty for a trust-only bundle (a client with no identity).
    ``version`` increases with every swap of a provider.
    """

    chain_pem: bytes
    key_pem: bytes = field(repr=False)  # never in a repr: logs, tracebacks, assertion text
    roots_pem: bytes
    identity: str | None = None
    not_before: float = 0.0
    not_after: float = float("inf")
    version: int = 0

    @property
    def has_identity(self) -> bool:
        return bool(self.chain_pem)

    @classmethod
    def from_pem(
        cls,
        chain_pem: bytes,
        key_pem_bytes: bytes,
        roots_pem: bytes,
        *,
        version: int = 0,
        source: str | None = None,
    ) -> CertificateBundle:
        """Validate and wrap PEM data; raises :class:`ConfigError` (key/cert mismatch...)."""
        try:
            roots = certs_from_pem(roots_pem)
        except ValueError as exc:
            raise ConfigError(f"bad trust bundle: {exc}", source=source) from exc
        if not roots:
            raise ConfigError("empty trust bundle", source=source)
        if not chain_pem:
            return cls(b"", b"", roots_pem, version=version)
        try:
            chain = certs_from_pem(chain_pem)
            key = key_from_pem(key_pem_bytes)
        except ValueError as exc:
            raise ConfigError(f"bad certificate or key: {exc}", source=source) from exc
        if not chain:
            raise ConfigError("empty certificate chain", source=source)
        leaf = chain[0]
        try:  # a damaged leaf parses lazily: unknown key type, malformed extensions
            matches = same_public_key(leaf.public_key(), key.public_key())
            sans = uri_sans(leaf)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"bad certificate: {exc}", source=source) from exc
        if not matches:
            raise ConfigError("private key does not match the certificate", source=source)
        return cls(
            chain_pem,
            key_pem_bytes,
            roots_pem,
            identity=sans[0] if sans else None,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            version=version,
        )


class CertificateProvider:
    """Base: the current bundle (read without a lock), subscribers, readiness."""

    def __init__(self) -> None:
        self._bundle: CertificateBundle | None = None
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._version = 0

    def current(self) -> CertificateBundle:
        """The current bundle; raises :class:`PymeshError` if none was loaded yet."""
        bundle = self._bundle
        if bundle is None:
            raise PymeshError(f"{type(self).__name__}: no certificate yet")
        return bundle

    def wait_ready(self, timeout: float) -> CertificateBundle:
        if not self._ready.wait(timeout):
            raise PymeshError(f"{type(self).__name__}: no certificate after {timeout}s")
        return self.current()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(bundle)`` after every swap; returns an unsubscribe function."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _publish(self, bundle: CertificateBundle) -> CertificateBundle:
        with self._lock:
            self._version += 1
            bundle = CertificateBundle(
                bundle.chain_pem,
                bundle.key_pem,
                bundle.roots_pem,
                bundle.identity,
                bundle.not_before,
                bundle.not_after,
                self._version,
            )
            self._bundle = bundle
            listeners = tuple(self._listeners)
        self._ready.set()
        for listener in listeners:
            try:
                listener(bundle)
            except Exception:
                log.exception("certificate listener failed")
        return bundle

    def close(self) -> None:
        """Stop background work (if any). Idempotent."""


class StaticProvider(CertificateProvider):
    """A bundle given in code; :meth:`update` swaps it."""

    def __init__(self, bundle: CertificateBundle | None = None) -> None:
        super().__init__()
        if bundle is not None:
            self._publish(bundle)

    def update(self, bundle: CertificateBundle) -> CertificateBundle:
        return self._publish(bundle)


class _Poller:
    """A daemon thread calling ``step()`` until closed; ``step`` returns seconds to wait."""

    def __init__(self, name: str, step: Callable[[], float]) -> None:
        self._stop = threading.Event()
        self._step = step
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._step()
            except Exception:
                log.exception("certificate provider step failed")
                wait = 1.0
            self._stop.wait(max(0.01, wait))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class FileWatcherProvider(CertificateProvider):
    """The ``file_watcher`` plugin: PEM files re-read when they change.

    Each poll costs three ``stat`` calls; files are read only when a stat changes. A
    half-written update (key not matching the certificate yet) is skipped and tried again
    at the next poll, keeping the last good bundle. ``start=False`` leaves polling to the
    caller (:meth:`poll`).
    """

    def __init__(
        self,
        *,
        certificate_file: str | None,
        private_key_file: str | None,
        ca_certificate_file: str,
        refresh_interval: float = 1.0,
        start: bool = True,
    ) -> None:
        super().__init__()
        if (certificate_file is None) != (private_key_file is None):
            raise ConfigError("file_watcher: certificate_file and private_key_file go together")
        self._files = (certificate_file, private_key_file, ca_certificate_file)
        self.refresh_interval = refresh_interval
        self._seen: tuple[tuple[int, int, int] | None, ...] | None = None
        self.reloads = 0
        self.poll()
        self._poller = _Poller("pymesh-cert-file-watcher", self._step) if start else None

    @classmethod
    def from_config(cls, config: FileWatcherConfig, *, start: bool = True) -> FileWatcherProvider:
        """From the bootstrap's ``certificate_providers`` ``file_watcher`` config."""
        if config.ca_certificate_file is None:
            raise ConfigError("file_watcher: ca_certificate_file is required for mTLS")
        return cls(
            certificate_file=config.certificate_file,
            private_key_file=config.private_key_file,
            ca_certificate_file=config.ca_certificate_file,
            refresh_interval=config.refresh_interval,
            start=start,
        )

    def _step(self) -> float:
        self.poll()
        return self.refresh_interval

    def poll(self) -> bool:
        """Reload if any file changed; True if a new bundle was published."""
        seen = tuple(_stat_key(p) if p else None for p in self._files)
        if seen == self._seen:
            return False
        cert_file, key_file, ca_file = self._files
        try:
            chain = Path(cert_file).read_bytes() if cert_file else b""
            key = Path(key_file).read_bytes() if key_file else b""
            roots = Path(ca_file).read_bytes()
            bundle = CertificateBundle.from_pem(chain, key, roots, source=cert_file or ca_file)
        except (OSError, ConfigError) as exc:
            log.warning("file_watcher: keeping the last certificate: %s", exc)
            return False
        self._seen = seen
        self.reloads += 1
        self._publish(bundle)
        return True

    def close(self) -> None:
        if self._poller is not None:
            self._poller.close()


TokenSource = str | Path | Callable[[], str] | None


def _read_token(source: TokenSource) -> str | None:
    if source is None:
        return None
    if isinstance(source, Path):
        return source.read_text().strip()
    if isinstance(source, str):
        return source
    return source()


class CaClientProvider(CertificateProvider):
    """Certificates from a CA speaking Istio's ``CreateCertificate`` (pymesh's or istiod).

    A new key and CSR for ``identity`` at every renewal; ``token`` (a string, a file re-read
    each time like Istio's ``istio-token``, or a callable) goes in
    ``authorization: Bearer``. Renewal at ``fraction`` of the lifetime minus up to
    ``jitter`` of it; failures retried with capped exponential backoff. ``ttl`` is the
    requested lifetime (1 hour by default). ``trust_bundle`` (PEM) overrides the roots taken
    from the CA's answer. ``clock``/``rng`` are injected; ``start=False`` leaves the
    scheduling to the caller (:meth:`step`).
    """

    def __init__(
        self,
        address: str,
        identity: SpiffeId | str,
        *,
        token: TokenSource = None,
        channel_credentials: object | None = None,
        ttl: float = 3600.0,
        fraction: float = 0.5,
        jitter: float = 0.1,
        retry_base: float = 1.0,
        retry_cap: float = 30.0,
        key_kind: str = "ec-p256",
        trust_bundle: bytes | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        start: bool = True,
    ) -> None:
        super().__init__()
        from pymesh.security._ca_client import CaClient

        self.identity = str(identity)
        self._client = CaClient(address, channel_credentials=channel_credentials, timeout=timeout)
        self._token = token
        self.ttl = ttl
        self.fraction = fraction
        self.jitter = jitter
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._key_kind = key_kind
        self._trust_override = trust_bundle
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.next_renewal = 0.0
        self.failures = 0
        self.renewals = 0
        self.last_error: str | None = None
        self._poller = _Poller("pymesh-ca-client", self._tick) if start else None

    def _tick(self) -> float:
        now = self._clock()
        return max(0.0, self.step(now) - now)

    def step(self, now: float) -> float:
        """Renew if due at ``now``; returns the time of the next step."""
        if now < self.next_renewal:
            return self.next_renewal
        try:
            bundle = self.fetch()
        except PymeshError as exc:
            self.failures += 1
            self.last_error = str(exc)
            bundle_now = self._bundle
            delay = retry_delay(
                self.failures,
                base=self.retry_base,
                cap=self.retry_cap,
                u=self._rng.random(),
                now=now,
                not_after=bundle_now.not_after if bundle_now else None,
            )
            log.warning("CA renewal failed (%d): %s; retry in %.1fs", self.failures, exc, delay)
            self.next_renewal = now + delay
            return self.next_renewal
        self.failures = 0
        self.last_error = None
        self.renewals += 1
        self._publish(bundle)
        # The lifetime counts from when we got the certificate: CAs backdate not_before
        # (clock skew), which would otherwise make the renewal come too early.
        self.next_renewal = renewal_time(
            max(bundle.not_before, now),
            bundle.not_after,
            fraction=self.fraction,
            jitter=self.jitter,
            u=self._rng.random(),
        )
        return self.next_renewal

    def fetch(self) -> CertificateBundle:
        """One ``CreateCertificate`` round trip; raises :class:`PymeshError`."""
        key: PrivateKey = generate_key(self._key_kind)
        csr = build_csr(key, self.identity).decode("ascii")
        try:
            token = _read_token(self._token)
        except OSError as exc:  # e.g. the token file is not mounted yet: retried
            raise PymeshError(f"cannot read the workload token: {exc}") from exc
        pems = self._client.create_certificate(csr, int(self.ttl), token)
        try:
            chain, roots = split_chain(pems)
        except ValueError as exc:
            raise PymeshError(f"CA returned unparsable certificates: {exc}") from exc
        roots_pem = self._trust_override or cert_pem(roots)
        bundle = CertificateBundle.from_pem(cert_pem(chain), key_pem(key), roots_pem)
        if bundle.identity != self.identity:
            raise PymeshError(
                f"CA returned a certificate for {bundle.identity}, not {self.identity}"
            )
        return bundle

    def close(self) -> None:
        if self._poller is not None:
            self._poller.close()
        self._client.close()


def split_chain(pems: tuple[str, ...]) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """Split a CA answer into (chain to present, trust anchors).

    The chain runs up to (not including) the first self-signed certificate; every
    self-signed certificate is a trust anchor (istiod's answer ends with its root; pymesh's
    CA appends roots still trusted during a root rotation).
    """
    certs: list[x509.Certificate] = []
    for pem in pems:
        certs.extend(certs_from_pem(pem.encode("ascii")))
    if not certs:
        raise PymeshError("CA returned an empty certificate chain")
    chain: list[x509.Certificate] = []
    roots: list[x509.Certificate] = []
    for cert in certs:
        if cert.issuer == cert.subject:
            roots.append(cert)
        elif not roots:
            chain.append(cert)
    if not chain or not roots:
        raise PymeshError("CA answer lacks a leaf or a root certificate")
    return chain, roots
