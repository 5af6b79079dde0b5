"""Security cases, each counted: every attack must be refused (zero may pass).

- TLS: plaintext into STRICT, expired / not-yet-valid certificates, another CA, another
  trust domain, a server SAN the client does not expect (stdlib sockets with pymesh's TLS
  contexts, as tests/integration/security does);
- the CA: a CSR for another identity, a token replayed for another service account (or
  namespace), a token from another CA, an expired token, a CSR asking for CA:true;
- identity headers: forged ``x-forwarded-client-cert`` / ``end-user`` / SPIFFE headers
  against AuthorizationPolicy principals on a ``pymesh.asgi.MeshServer`` (identity comes only
  from the verified certificate);
- oversized request headers.

Path-normalization tricks are in test_path_normalization.py (compared with real Envoy).
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pymesh.controlplane.ca import CertificateAuthority
from pymesh.model.matcher import StringMatcher
from pymesh.security import (
    CertificateBundle,
    StaticProvider,
    build_csr,
    client_ssl_context,
    generate_key,
    server_ssl_context,
)
from pymesh.security._pki import cert_pem, key_from_pem
from pymesh.security._spiffe import SpiffeId
from tests.integration.asgi.conftest import SERVER_ID, Mesh, peer_authentication
from tests.integration.security.tls_servers import EchoServer
from tests.unit.security.pki_helpers import ca_bundle, new_root, raw_bundle, spiffe

SERVER = spiffe("default", "server")
CLIENT = spiffe("default", "client")


def _exchange(ctx: ssl.SSLContext | None, port: int) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if ctx is None:
        with raw:
            raw.sendall(b"ping\n")
            data = raw.recv(100)
            if not data.startswith(b"PING"):
                raise ConnectionError(f"plaintext refused: {data!r}")
            return data
    with ctx.wrap_socket(raw) as tls:
        tls.sendall(b"ping\n")
        data = tls.recv(100)
        if not data:
            raise ConnectionError("closed by peer")
        return data


@pytest.fixture
def servers() -> Iterator[list[EchoServer]]:
    made: list[EchoServer] = []
    yield made
    for s in made:
        s.close()


def test_tls_attacks(tmp_path: Path, servers: list[EchoServer], record: Any) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    root, root_key = ca.roots[0], key_from_pem((tmp_path / "ca" / "root-key.pem").read_bytes())
    trust = cert_pem(root)
    other_root, other_key = new_root("evil")
    now = datetime.datetime.now(datetime.UTC)
    past = {
        "not_before": now - datetime.timedelta(days=2),
        "not_after": now - datetime.timedelta(days=1),
    }
    future = {
        "not_before": now + datetime.timedelta(days=1),
        "not_after": now + datetime.timedelta(days=2),
    }
    good_client = ca_bundle(ca, "default", "client")

    def serve(bundle: CertificateBundle) -> int:
        s = EchoServer(server_ssl_context(StaticProvider(bundle), trust_domains=["cluster.local"]))
        servers.append(s)
        return s.port

    strict = serve(ca_bundle(ca, "default", "server"))

    def client(bundle: CertificateBundle, expect: str = SERVER) -> ssl.SSLContext:
        return client_ssl_context(
            StaticProvider(bundle), [StringMatcher.exact(expect)], trust_domains=["cluster.local"]
        )

    assert _exchange(client(good_client), strict) == b"PING\n"  # the honest exchange works
    attacks: dict[str, Callable[[], bytes]] = {
        "plaintext into STRICT": lambda: _exchange(None, strict),
        "client certificate expired": lambda: _exchange(
            client(raw_bundle(root, root_key, CLIENT, **past)), strict
        ),
        "client certificate not yet valid": lambda: _exchange(
            client(raw_bundle(root, root_key, CLIENT, **future)), strict
        ),
        "client certificate from another CA": lambda: _exchange(
            client(raw_bundle(other_root, other_key, CLIENT, trust=trust)), strict
        ),
        "client in another trust domain": lambda: _exchange(
            client(raw_bundle(root, root_key, spiffe("default", "client", "evil.org"))), strict
        ),
        "client without a certificate": lambda: _exchange(
            client(CertificateBundle.from_pem(b"", b"", trust)), strict
        ),
        "server certificate expired": lambda: _exchange(
            client(good_client), serve(raw_bundle(root, root_key, SERVER, **past))
        ),
        "server certificate not yet valid": lambda: _exchange(
            client(good_client), serve(raw_bundle(root, root_key, SERVER, **future))
        ),
        "server certificate from another CA": lambda: _exchange(
            client(good_client), serve(raw_bundle(other_root, other_key, SERVER, trust=trust))
        ),
        "server SAN mismatch (not the expected identity)": lambda: _exchange(
            client(good_client, spiffe("default", "ratings")), strict
        ),
    }
    for name, attack in attacks.items():
        try:
            attack()
        except (ssl.SSLError, OSError):
            passed = 0
        else:
            passed = 1
        record(f"TLS: {name}", cases=1, requests=1, failed=passed)
        assert passed == 0, name
    # no application byte reached a server in any attack
    for s in servers:
        s.close()
    assert all(rec.received in (b"", b"ping\n") for s in servers for rec in s.records)
    assert sum(rec.received == b"ping\n" for s in servers for rec in s.records) == 1


def test_ca_attacks(tmp_path: Path, record: Any) -> None:
    from pymesh.controlplane import ControlPlane
    from pymesh.security import CaClient, CaError

    ca = CertificateAuthority(tmp_path / "ca")
    other = CertificateAuthority(tmp_path / "other-ca")
    cp = ControlPlane([tmp_path], xds_address="127.0.0.1:0", admin_port=None, ca=ca).start()
    client = CaClient(cp.address)
    me = SpiffeId("cluster.local", "default", "reviews")

    def csr(ident: SpiffeId) -> str:
        return build_csr(generate_key(), ident).decode()

    reviews_token = ca.create_token("default", "reviews")
    try:
        cases = {
            "CSR for another identity": (
                csr(SpiffeId("cluster.local", "default", "ratings")),
                reviews_token,
            ),
            "token replayed for another service account": (
                csr(SpiffeId("cluster.local", "default", "productpage")),
                reviews_token,
            ),
            "token replayed for another namespace": (
                csr(SpiffeId("cluster.local", "ops", "reviews")),
                reviews_token,
            ),
            "CSR in another trust domain": (
                csr(SpiffeId("evil.org", "default", "reviews")),
                reviews_token,
            ),
            "token from another CA": (csr(me), other.create_token("default", "reviews")),
            "expired token": (csr(me), ca.create_token("default", "reviews", ttl=-60)),
            "no token": (csr(me), None),
            "token with a forged signature": (
                csr(me),
                reviews_token[:-6]
                + ("AAAAAA" if not reviews_token.endswith("AAAAAA") else "BBBBBB"),
            ),
        }
        for name, (request, token) in cases.items():
            try:
                client.create_certificate(request, 600, token)
            except CaError:
                passed = 0
            else:
                passed = 1
            record(f"CA: {name}", cases=1, requests=1, failed=passed)
            assert passed == 0, name
        assert ca.stats["issued"] == 0
        assert len(client.create_certificate(csr(me), 600, reviews_token)) == 2  # honest works
    finally:
        client.close()
        cp.stop()


ADMIN_ONLY = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: admin-only, namespace: default}
    spec:
      selector: {matchLabels: {app: web}}
      action: ALLOW
      rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/admin]}}]
      - to: [{operation: {paths: [/health]}}]
    """
)

FORGED_HEADERS: dict[str, list[tuple[str, str]]] = {
    "x-forwarded-client-cert with the admin URI": [
        ("x-forwarded-client-cert", f"By={SERVER_ID};URI={spiffe('default', 'admin')}")
    ],
    "end-user: admin": [("end-user", "admin")],
    "x-spiffe-id / x-istio-principal headers": [
        ("x-spiffe-id", spiffe("default", "admin")),
        ("x-istio-principal", "cluster.local/ns/default/sa/admin"),
        ("x-envoy-peer-metadata-id", "sidecar~1.2.3.4~admin.default~default.svc.cluster.local"),
    ],
    "x-forwarded-for from the mesh": [("x-forwarded-for", "127.0.0.1"), ("x-real-ip", "10.0.0.1")],
    "authorization: Bearer (a mesh token)": [("authorization", "Bearer x.y.z")],
}


def _raw_request(
    port: int, ctx: ssl.SSLContext | None, path: str, headers: list[tuple[str, str]]
) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (no client library normalizing it)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock: socket.socket = ctx.wrap_socket(raw) if ctx is not None else raw
    with sock:
        head = f"GET {path} HTTP/1.1\r\nhost: web\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers
        )
        sock.sendall(head.encode("latin-1") + b"connection: close\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    head_bytes, _, body = rest.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_bytes.lower():
        out = b""
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += body[:size]
            body = body[size + 2 :]
        body = out
    return status, body


@pytest.fixture
def asgi_mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.stop()


@pytest.mark.timeout(120)
def test_forged_identity_headers_and_oversized_headers(asgi_mesh: Mesh, record: Any) -> None:
    mesh = asgi_mesh
    mesh.write("authz.yaml", ADMIN_ONLY)
    mesh.write("pa.yaml", peer_authentication("PERMISSIVE"))
    server = mesh.serve()
    reviews = mesh.client_context(mesh.identity("default", "reviews"), (SERVER_ID,))
    admin = mesh.client_context(mesh.identity("default", "admin"), (SERVER_ID,))
    deadline = time.monotonic() + 15
    while _raw_request(server.port, reviews, "/x", [])[0] != 403:  # the policy arrived
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _raw_request(server.port, admin, "/x", [])[0] == 200  # the real admin passes
    for name, headers in FORGED_HEADERS.items():
        for who, ctx in (("mTLS as reviews", reviews), ("plaintext", None)):
            status, body = _raw_request(server.port, ctx, "/x", headers)
            passed = int(status != 403)
            record(f"forged identity header: {name} ({who})", cases=1, requests=1, failed=passed)
            assert status == 403, (name, who, status, body)
    # what the app is told about its caller comes from the certificate, not the headers
    status, body = _raw_request(
        server.port, admin, "/x", FORGED_HEADERS["x-spiffe-id / x-istio-principal headers"]
    )
    assert status == 200 and json.loads(body)["spiffe_id"] == spiffe("default", "admin")

    # oversized headers: refused with an HTTP error (431/400) or the connection closed, and
    # the server keeps serving
    oversized = {
        "one 1 MiB header": [("x-big", "a" * (1 << 20))],
        "10,000 headers": [(f"x-h{i}", "v") for i in range(10_000)],
        "1 MiB path": "/" + "a" * (1 << 20),
    }
    for name, what in oversized.items():
        path = what if isinstance(what, str) else "/health"
        headers = [] if isinstance(what, str) else what
        try:
            status, _ = _raw_request(server.port, admin, path, headers)
        except OSError:
            status = 0  # connection reset: refused
        passed = int(status == 200)
        record(
            f"oversized request: {name}",
            cases=1,
            requests=1,
            failed=passed,
            note=f"answer {status or 'connection closed'}",
        )
        assert status != 200, name
        assert _raw_request(server.port, admin, "/health", [])[0] == 200  # still serving
