"""Secrets hygiene: private keys are never logged (every log record at DEBUG, captured during
CA, provider, mTLS and rotation work), never served by an admin endpoint (the workload's
and the control plane's), never in a ``repr``; key files are 0600."""

from __future__ import annotations

import base64
import itertools
import logging
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pymesh.admin import ENDPOINTS, AdminServer
from pymesh.controlplane import ControlPlane
from pymesh.controlplane.ca import CertificateAuthority
from pymesh.security import CaClientProvider, FileWatcherProvider, SpiffeId
from pymesh.security._pki import key_from_pem
from tests.integration.asgi.conftest import SERVER_ID, Mesh, write_bundle
from tests.resilience.test_security_cases import _raw_request
from tests.unit.security.pki_helpers import ca_bundle

MARKERS = (b"PRIVATE KEY", b"-----BEGIN EC", b"-----BEGIN RSA")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))  # message, args and traceback


@pytest.fixture
def logs() -> Iterator[Capture]:
    handler = Capture()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def key_fragments(pems: list[bytes]) -> list[bytes]:
    """What identifies each private key in any dump: the base64 (as in its PEM) and the hex
    of its private scalar (not its public half, which certificates rightly show)."""
    out = []
    for pem in pems:
        key = key_from_pem(pem)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        secret = key.private_numbers().private_value.to_bytes(32, "big")
        body = b"".join(line for line in pem.splitlines() if b"-----" not in line)
        der = base64.b64decode(body)
        off = der.find(secret)
        assert off > 0
        first, last = -(-off // 3) * 4, (off + len(secret)) // 3 * 4
        # the PEM wraps at 64 characters: pieces on either side of a line break
        cuts = sorted({first, last, *range(64 * (first // 64 + 1), last, 64)})
        out += [body[a:b] for a, b in itertools.pairwise(cuts) if b - a >= 12]
        out += [secret.hex().encode(), secret.hex().upper().encode()]
    return out


def leaks(text: bytes, pems: list[bytes]) -> list[bytes]:
    return [m for m in MARKERS if m in text] + [f for f in key_fragments(pems) if f in text]


def test_keys_never_logged_served_or_in_repr(logs: Capture, tmp_path: Path, record: Any) -> None:
    keys: list[bytes] = []
    # CA work: a fresh CA (root, signer and token keys), tokens, signing
    ca = CertificateAuthority(tmp_path / "ca")
    keys += [p.read_bytes() for p in (tmp_path / "ca").rglob("*key*.pem")]
    cp = ControlPlane([tmp_path / "cfg"], xds_address="127.0.0.1:0", admin_port=0, ca=ca)
    (tmp_path / "cfg").mkdir()
    cp.start()
    me = SpiffeId("cluster.local", "default", "reviews")
    provider = CaClientProvider(
        cp.address, me, token=ca.create_token("default", "reviews"), ttl=600, start=False
    )
    file_provider = None
    try:
        provider.step(time.time())
        provider.step(time.time() + 10_000)  # a renewal: a second key
        bundle = provider.current()
        keys.append(bundle.key_pem)
        assert bundle.has_identity
        # file_watcher: Istio's agent layout, then a rotation
        cert_dir = write_bundle(ca_bundle(ca, "default", "web"), tmp_path / "certs")
        file_provider = FileWatcherProvider(
            certificate_file=str(cert_dir / "cert-chain.pem"),
            private_key_file=str(cert_dir / "key.pem"),
            ca_certificate_file=str(cert_dir / "root-cert.pem"),
            refresh_interval=0.05,
        )
        keys.append((cert_dir / "key.pem").read_bytes())
        rotated = ca_bundle(ca, "default", "web")
        write_bundle(rotated, cert_dir)
        keys.append(rotated.key_pem)
        deadline = time.monotonic() + 10
        while file_provider.current().key_pem != rotated.key_pem:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # a damaged key file: the error reported must not quote it
        (cert_dir / "key.pem").write_bytes(
            rotated.key_pem[:-40] + b"garbage\n-----END PRIVATE KEY-----\n"
        )
        time.sleep(0.3)
        reprs = " ".join(
            repr(x) for x in (bundle, file_provider.current(), provider, file_provider)
        )
        # the control plane's admin endpoints
        served = b""
        for path in ("/ready", "/debug/syncz", "/debug/configz", "/metrics"):
            with urllib.request.urlopen(f"http://127.0.0.1:{cp.admin_port}{path}", timeout=10) as r:
                served += r.read()
    finally:
        provider.close()
        if file_provider is not None:
            file_provider.close()
        cp.stop()
    logged = "\n".join(logs.text).encode()
    found = {
        "logs": leaks(logged, keys),
        "repr": leaks(reprs.encode(), keys),
        "cp admin": leaks(served, keys),
    }
    record(
        "private keys in logs (DEBUG), reprs, control-plane admin",
        cases=len(keys),
        requests=4,
        failed=sum(bool(v) for v in found.values()),
        note=f"{len(logs.text)} log records checked",
    )
    assert all(len(leaks(k, [k])) >= 2 for k in keys)  # the detector sees a key dump
    assert found == {"logs": [], "repr": [], "cp admin": []}
    assert len(logs.text) > 5  # the capture did see the work


def test_workload_admin_and_mtls_traffic(logs: Capture, tmp_path: Path, record: Any) -> None:
    """A MeshServer with file_watcher certificates serving mTLS requests; the workload admin
    endpoint (config_dump, certs, ...) for its xDS client."""
    mesh = Mesh(tmp_path)
    try:
        mesh.write("x.yaml", "")
        server = mesh.serve()
        keys = [(mesh.cert_dir / "key.pem").read_bytes()]
        client_bundle = mesh.identity("default", "client")
        keys.append(client_bundle.key_pem)
        ctx = mesh.client_context(client_bundle, (SERVER_ID,))
        for _ in range(5):
            assert _raw_request(server.port, ctx, "/x", [])[0] == 200
        admin = AdminServer(mesh.clients[0], port=0).start()
        served = b""
        try:
            for path in ENDPOINTS:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{admin.port}{path}", timeout=10
                    ) as r:
                        served += r.read()
                except urllib.error.HTTPError as exc:  # /ready may be 503: its body counts
                    served += exc.read()
        finally:
            admin.stop()
    finally:
        mesh.stop()
    logged = "\n".join(logs.text).encode()
    found = {"logs": leaks(logged, keys), "workload admin": leaks(served, keys)}
    record(
        "private keys in workload admin endpoints and mTLS serving logs",
        cases=len(keys),
        requests=5 + len(ENDPOINTS),
        failed=sum(bool(v) for v in found.values()),
    )
    assert found == {"logs": [], "workload admin": []}
    assert b"spiffe://cluster.local/ns/default/sa/web" in served  # the certs view was served


def test_key_files_are_0600(tmp_path: Path, record: Any) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    ca.add_next_root()
    ca.rotate_root()
    files = [p for p in (tmp_path / "ca").rglob("*") if p.is_file()]
    with_keys = [p for p in files if any(m in p.read_bytes() for m in MARKERS)]
    bad = {
        str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in with_keys
        if stat.S_IMODE(p.stat().st_mode) & 0o077
    }
    record(
        "key files readable by others",
        cases=len(with_keys),
        failed=len(bad),
        note=", ".join(sorted(p.name for p in with_keys)),
    )
    assert with_keys, files
    assert bad == {}
