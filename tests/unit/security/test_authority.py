"""The embedded CA: signing, every refusal (counted), persistence, rotation, plugged-in."""

from __future__ import annotations

import datetime
import logging
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pymesh.controlplane.ca import CaRefused, CertificateAuthority
from pymesh.security import SpiffeId, build_csr, generate_key, split_chain
from pymesh.security._pki import cert_pem, certs_from_pem, key_pem, make_root, uri_sans
from tests.unit.security.pki_helpers import ca_bundle, spiffe


def _csr(uri: str, *, ca: bool = False, extra_dns: str | None = None, key=None) -> str:  # type: ignore[no-untyped-def]
    key = key or generate_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    if extra_dns:
        names.append(x509.DNSName(extra_dns))
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _bearer(ca: CertificateAuthority, ns: str = "default", sa: str = "reviews") -> dict[str, str]:
    return {"authorization": f"Bearer {ca.create_token(ns, sa)}"}


def test_issues_svid(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    key = generate_key()
    csr = build_csr(key, SpiffeId("cluster.local", "default", "reviews")).decode()
    pems = ca.create_certificate(csr, 600, _bearer(ca))
    chain, roots = split_chain(pems)
    leaf = chain[0]
    assert uri_sans(leaf) == ("spiffe://cluster.local/ns/default/sa/reviews",)
    assert leaf.subject == x509.Name([])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(seconds=600) <= life <= datetime.timedelta(seconds=661)
    assert roots == [ca.roots[0]]
    leaf.verify_directly_issued_by(roots[0])
    assert ca.stats["issued"] == 1


def test_default_ttl_is_one_hour(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    chain, _ = split_chain(
        ca.create_certificate(_csr(spiffe("default", "reviews")), 0, _bearer(ca))
    )
    life = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert datetime.timedelta(hours=1) <= life <= datetime.timedelta(hours=1, minutes=1)


ATTACKS = {
    "csr for someone else's identity": (
        lambda ca: _csr(spiffe("default", "ratings")),
        "wrong_identity",
    ),
    "csr for another trust domain": (
        lambda ca: _csr(spiffe("default", "reviews", "evil.org")),
        "wrong_identity",
    ),
    "csr requesting CA:true": (
        lambda ca: _csr(spiffe("default", "reviews"), ca=True),
        "ca_requested",
    ),
    "csr with an extra DNS SAN": (
        lambda ca: _csr(spiffe("default", "reviews"), extra_dns="evil.example"),
        "extra_sans",
    ),
    "csr with a bad signature": (
        lambda ca: _corrupt(_csr(spiffe("default", "reviews"))),
        "bad_csr",
    ),
    "not a csr": (lambda ca: "hello", "bad_csr"),
    "non-spiffe URI": (lambda ca: _csr("https://reviews.default"), "bad_identity"),
}


def _corrupt(pem: str) -> str:
    csr = x509.load_pem_x509_csr(pem.encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x55  # flip bits inside the signature
    import base64

    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_csr_attacks_refused(tmp_path: Path, name: str) -> None:
    ca = CertificateAuthority(tmp_path)
    make, reason = ATTACKS[name]
    with pytest.raises(CaRefused) as err:
        ca.create_certificate(make(ca), 600, _bearer(ca))
    assert err.value.reason == reason
    assert ca.stats["issued"] == 0
    assert ca.stats[f"refused_{reason}"] == 1


def test_token_attacks_refused_and_counted(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    ca = CertificateAuthority(tmp_path, clock=lambda: now[0])
    other = CertificateAuthority(tmp_path / "other", clock=lambda: now[0])
    csr = _csr(spiffe("default", "reviews"))
    expired = ca.create_token("default", "reviews", ttl=60)
    cases = {
        "no token": {},
        "not bearer": {"authorization": "Basic abc"},
        "forged token (other CA's key)": _bearer(other),
        "garbage token": {"authorization": "Bearer x.y.z"},
    }
    refused = 0
    for metadata in cases.values():
        with pytest.raises(CaRefused) as err:
            ca.create_certificate(csr, 600, metadata)
        assert err.value.code == "UNAUTHENTICATED"
        refused += 1
    now[0] += 3600
    with pytest.raises(CaRefused, match="expired"):
        ca.create_certificate(csr, 600, {"authorization": f"Bearer {expired}"})
    refused += 1
    assert refused == 5
    assert ca.stats["refused_no_token"] + ca.stats["refused_bad_token"] == 5
    assert ca.stats["issued"] == 0


def test_ttl_above_max_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, max_ttl=7200)
    with pytest.raises(CaRefused, match="exceeds"):
        ca.create_certificate(_csr(spiffe("default", "reviews")), 7201, _bearer(ca))


def test_insecure_mode_is_off_by_default_and_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csr = _csr(spiffe("default", "reviews"))
    with pytest.raises(CaRefused):
        CertificateAuthority(tmp_path / "a").create_certificate(csr, 600, {})
    caplog.set_level(logging.WARNING, "pymesh.ca")
    dev = CertificateAuthority(tmp_path / "b", insecure_skip_token=True)
    assert any("INSECURE" in r.message for r in caplog.records)
    caplog.clear()
    assert dev.create_certificate(csr, 600, {})
    assert any("INSECURE" in r.message for r in caplog.records)
    # dev mode still refuses another trust domain and CA:true
    with pytest.raises(CaRefused):
        dev.create_certificate(_csr(spiffe("default", "x", "evil.org")), 600, {})
    with pytest.raises(CaRefused):
        dev.create_certificate(_csr(spiffe("default", "x"), ca=True), 600, {})


def test_root_persisted_private_and_reloaded(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    for name in ("root-key.pem", "token-key.pem"):
        assert stat.S_IMODE((tmp_path / "ca" / name).stat().st_mode) == 0o600
    again = CertificateAuthority(tmp_path / "ca")
    assert again.roots[0] == ca.roots[0]
    # tokens from the first instance verify in the second (same token key)
    token = ca.create_token("default", "reviews")
    assert again.authenticate({"authorization": f"Bearer {token}"}) == SpiffeId(
        "cluster.local", "default", "reviews"
    )


def test_root_rotation_overlap(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    old_root = ca.roots[0]
    old = ca_bundle(ca, "default", "reviews")
    ca.rotate_root()
    new_root = ca.roots[0]
    assert new_root != old_root and ca.roots == (new_root, old_root)
    pems = ca.create_certificate(_csr(spiffe("default", "reviews")), 600, _bearer(ca))
    chain, roots = split_chain(pems)
    chain[0].verify_directly_issued_by(new_root)
    assert roots == [new_root, old_root]  # both trusted during the overlap
    certs_from_pem(old.chain_pem)[0].verify_directly_issued_by(old_root)
    # persisted: a restart keeps the overlap
    assert CertificateAuthority(tmp_path).roots == (new_root, old_root)
    ca.retire_previous_roots()
    assert ca.roots == (new_root,)
    assert CertificateAuthority(tmp_path).roots == (new_root,)


def test_plugged_in_intermediate(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    root_key = generate_key()
    root = make_root(root_key, org="corp", now=now, lifetime=datetime.timedelta(days=30))
    inter_key = generate_key()
    inter = make_root(
        inter_key,
        org="mesh",
        now=now,
        lifetime=datetime.timedelta(days=10),
        issuer=root,
        issuer_key=root_key,
        path_length=0,
    )
    d = tmp_path / "cacerts"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(cert_pem(inter))
    (d / "ca-key.pem").write_bytes(key_pem(inter_key))
    (d / "root-cert.pem").write_bytes(cert_pem(root))
    (d / "cert-chain.pem").write_bytes(cert_pem([inter, root]))
    ca = CertificateAuthority(d)
    assert ca.plugged_in and ca.roots == (root,)
    pems = ca.create_certificate(_csr(spiffe("default", "reviews")), 600, _bearer(ca))
    chain, roots = split_chain(pems)
    assert [c.subject for c in chain[1:]] == [inter.subject]
    assert roots == [root]
    chain[0].verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(root)
    assert sorted(p.name for p in d.iterdir()) == [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
        "token-key.pem",
    ]
    with pytest.raises(Exception, match="plugged-in"):
        ca.rotate_root()


def test_plugged_in_key_mismatch(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    k = generate_key()
    root = make_root(k, org="corp", now=now, lifetime=datetime.timedelta(days=1))
    (tmp_path / "ca-cert.pem").write_bytes(cert_pem(root))
    (tmp_path / "ca-key.pem").write_bytes(key_pem(generate_key()))
    (tmp_path / "root-cert.pem").write_bytes(cert_pem(root))
    with pytest.raises(Exception, match="does not match"):
        CertificateAuthority(tmp_path)


def test_two_phase_root_rotation(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    old_root = ca.roots[0]
    nxt = ca.add_next_root()
    assert ca.roots == (old_root, nxt)
    chain, roots = split_chain(
        ca.create_certificate(_csr(spiffe("default", "a")), 600, _bearer(ca, sa="a"))
    )
    chain[0].verify_directly_issued_by(old_root)  # phase 1: still signed by the old root
    assert roots == [old_root, nxt]  # ... but the next root is already trusted
    assert CertificateAuthority(tmp_path).roots == (old_root, nxt)  # persisted
    ca.activate_next_root()
    assert ca.roots == (nxt, old_root)
    chain, roots = split_chain(
        ca.create_certificate(_csr(spiffe("default", "a")), 600, _bearer(ca, sa="a"))
    )
    chain[0].verify_directly_issued_by(nxt)
    assert roots == [nxt, old_root]
    assert CertificateAuthority(tmp_path).roots == (nxt, old_root)
    ca.retire_previous_roots()
    assert ca.roots == (nxt,)
