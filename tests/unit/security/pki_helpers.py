"""Test helpers: CAs, bundles and odd certificates for the identity tests."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pymesh.controlplane.ca import CertificateAuthority
from pymesh.security import CertificateBundle, SpiffeId, build_csr, generate_key, split_chain
from pymesh.security._pki import PrivateKey, cert_pem, key_pem, make_root

TD = "cluster.local"


def spiffe(ns: str, sa: str, td: str = TD) -> str:
    return SpiffeId(td, ns, sa).uri


def ca_bundle(
    ca: CertificateAuthority, ns: str, sa: str, *, ttl: float = 3600
) -> CertificateBundle:
    """A bundle for NS/SA obtained through the CA's token-checked path."""
    key = generate_key()
    csr = build_csr(key, SpiffeId(ca.trust_domain, ns, sa)).decode()
    token = ca.create_token(ns, sa)
    pems = ca.create_certificate(csr, ttl, {"authorization": f"Bearer {token}"})
    chain, roots = split_chain(pems)
    return CertificateBundle.from_pem(cert_pem(chain), key_pem(key), cert_pem(roots))


def raw_bundle(
    root: x509.Certificate,
    root_key: PrivateKey,
    uri: str | None,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    common_name: str | None = None,
    trust: bytes | None = None,
) -> CertificateBundle:
    """A leaf signed directly (no CA checks): expired certs, CN-bearing certs for grpc..."""
    now = datetime.datetime.now(datetime.UTC)
    key = generate_key()
    name = x509.Name(
        [x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)] if common_name else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=1))
        .not_valid_after(not_after or now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if uri:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    leaf = builder.sign(root_key, hashes.SHA256())  # type: ignore[arg-type]
    return CertificateBundle.from_pem(cert_pem(leaf), key_pem(key), trust or cert_pem(root))


def new_root(org: str = "other") -> tuple[x509.Certificate, PrivateKey]:
    key = generate_key()
    now = datetime.datetime.now(datetime.UTC)
    return make_root(key, org=org, now=now, lifetime=datetime.timedelta(days=1)), key


def make_ca(path: Path, **kwargs: object) -> CertificateAuthority:
    return CertificateAuthority(path, **kwargs)  # type: ignore[arg-type]
