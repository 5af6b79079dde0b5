"""X.509 building blocks (``cryptography``): keys, CSRs, SVIDs, roots, PEM helpers.

Workload certificates are X.509-SVIDs: one URI SAN (the SPIFFE ID), no CN requirement,
``digitalSignature | keyEncipherment``, server and client auth, ``CA:false``. Keys are
ECDSA P-256 unless asked otherwise.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pymesh.security._spiffe import SpiffeId

__all__ = [
    "PrivateKey",
    "build_csr",
    "cert_pem",
    "certs_from_pem",
    "generate_key",
    "issue_cert",
    "key_from_pem",
    "key_pem",
    "make_root",
    "same_public_key",
    "uri_sans",
    "write_private",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_BACKDATE = datetime.timedelta(minutes=1)  # tolerate small clock skew between peers


def generate_key(kind: str = "ec-p256") -> PrivateKey:
    """A new private key: ``ec-p256`` (default), ``ec-p384`` or ``rsa-2048``."""
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key kind {kind!r}")


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes) -> PrivateKey:
    """Raises ``ValueError`` for anything but an unencrypted EC or RSA key (cryptography's
    ``UnsupportedAlgorithm`` and encrypted-key ``TypeError`` included: damaged files)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (UnsupportedAlgorithm, TypeError) as exc:
        raise ValueError(f"unusable private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("unsupported private key type (EC or RSA expected)")
    return key


def cert_pem(certs: x509.Certificate | Sequence[x509.Certificate]) -> bytes:
    if isinstance(certs, x509.Certificate):
        certs = [certs]
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def certs_from_pem(data: bytes) -> tuple[x509.Certificate, ...]:
    """Raises ``ValueError`` for unparsable PEM (cryptography's ``InvalidVersion`` included)."""
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except x509.InvalidVersion as exc:
        raise ValueError(f"bad certificate: {exc}") from exc


def uri_sans(cert: x509.Certificate) -> tuple[str, ...]:
    """The certificate's URI SANs (empty when it has no SAN extension)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def same_public_key(a: object, b: object) -> bool:
    """True if two public keys are the same key (compared as SubjectPublicKeyInfo DER)."""

    def der(k: object) -> bytes:
        data: bytes = k.public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return data

    return der(a) == der(b)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the start (atomic rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def build_csr(key: PrivateKey, identity: SpiffeId | str) -> bytes:
    """A PEM CSR asking for one URI SAN, the SPIFFE ID (empty subject, as Istio's agent)."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
    )
    csr = builder.sign(key, _sign_hash(key))
    return csr.public_bytes(serialization.Encoding.PEM)


def make_root(
    key: PrivateKey,
    *,
    org: str,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
    issuer_key: PrivateKey | None = None,
    issuer: x509.Certificate | None = None,
    path_length: int | None = None,
) -> x509.Certificate:
    """A CA certificate: self-signed root, or an intermediate when ``issuer`` is given."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{org} CA {now:%Y%m%d%H%M%S}"),
        ]
    )
    signer = issuer_key if issuer_key is not None else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            False,
        )
    return builder.sign(signer, _sign_hash(signer))


def issue_cert(
    public_key: object,
    identity: str,
    *,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    """An X.509-SVID for ``identity`` (URI SAN, then ``dns_names`` as DNS SANs), signed by
    ``issuer``."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(identity),
                    *(x509.DNSName(name) for name in dns_names),
                ]
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            False,
        )
    )
    return builder.sign(issuer_key, _sign_hash(issuer_key))
