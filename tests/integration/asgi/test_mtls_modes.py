"""``pymesh.asgi.MeshServer`` under PeerAuthentication STRICT / PERMISSIVE / DISABLE, with the
embedded control plane and certificates from the embedded CA (file_watcher layout)."""

from __future__ import annotations

import time

import httpx

from tests.integration.asgi.conftest import SERVER_ID, Mesh, expired, get, peer_authentication
from tests.unit.security.pki_helpers import new_root, raw_bundle, spiffe


def _until(fn: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_permissive_serves_mtls_and_plaintext_on_one_port(mesh: Mesh) -> None:
    server = mesh.serve()
    assert server.middleware.listener_name == (
        f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{server.port}"
    )
    plain = get(f"http://127.0.0.1:{server.port}/hello")
    assert isinstance(plain, httpx.Response) and plain.status_code == 200, plain
    assert plain.json() == {
        "path": "/hello",
        "raw_path": "/hello",
        "method": "GET",
        "tls": False,
        "spiffe_id": None,
        "principal": None,
        "namespace": None,
    }
    ctx = mesh.client_context(mesh.identity("shop", "productpage"), (SERVER_ID,))
    tls = get(f"https://127.0.0.1:{server.port}/hello", ctx)
    assert isinstance(tls, httpx.Response) and tls.status_code == 200, tls
    body = tls.json()
    assert body["tls"] is True
    assert body["spiffe_id"] == spiffe("shop", "productpage")
    assert body["principal"] == "cluster.local/ns/shop/sa/productpage"
    assert body["namespace"] == "shop"


def test_strict_refuses_plaintext_and_every_attack(mesh: Mesh) -> None:
    mesh.write("pa.yaml", peer_authentication("STRICT"))
    server = mesh.serve()
    url = f"https://127.0.0.1:{server.port}/"
    good = mesh.client_context(mesh.identity("default", "client"), (SERVER_ID,))
    ok = get(url, good)
    assert isinstance(ok, httpx.Response) and ok.status_code == 200, ok
    assert ok.json()["spiffe_id"] == spiffe("default", "client")

    other_root, other_key = new_root("evil")
    attacks = {
        "plaintext": (f"http://127.0.0.1:{server.port}/", None),
        "no client certificate": (url, mesh.client_context(None, (SERVER_ID,))),
        "wrong trust domain": (
            url,
            mesh.client_context(mesh.forged("spiffe://evil.org/ns/default/sa/client")),
        ),
        "expired certificate": (
            url,
            mesh.client_context(mesh.forged(spiffe("default", "client"), **expired())),
        ),
        "certificate from another CA": (
            url,
            mesh.client_context(
                raw_bundle(
                    other_root,
                    other_key,
                    spiffe("default", "client"),
                    trust=mesh.ca.trust_bundle_pem(),
                )
            ),
        ),
        "server SAN mismatch (client expects another identity)": (
            url,
            mesh.client_context(
                mesh.identity("default", "client"), (spiffe("default", "not-web"),)
            ),
        ),
    }
    passed = {}
    for name, (target, ctx) in attacks.items():
        result = get(target, ctx)
        if isinstance(result, httpx.Response):
            passed[name] = result.status_code
    assert passed == {}, f"attacks that got through: {passed}"
    assert len(attacks) == 6
    # plaintext closed by filter chain; the others failed their handshakes (server or client).
    assert server.refused >= 1
    assert server.handshake_failures >= 4
    # the legitimate client still works afterwards
    again = get(url, good)
    assert isinstance(again, httpx.Response) and again.status_code == 200


def test_disable_is_plaintext_only_and_modes_follow_the_yaml(mesh: Mesh) -> None:
    mesh.write("pa.yaml", peer_authentication("DISABLE"))
    server = mesh.serve()
    plain_url = f"http://127.0.0.1:{server.port}/"
    tls_url = f"https://127.0.0.1:{server.port}/"
    ctx = mesh.client_context(mesh.identity("default", "client"), (SERVER_ID,))
    r = get(plain_url)
    assert isinstance(r, httpx.Response) and r.status_code == 200
    assert not isinstance(get(tls_url, ctx), httpx.Response)
    kept = httpx.Client(timeout=5)  # a plaintext keep-alive connection opened under DISABLE
    try:
        assert kept.get(plain_url).status_code == 200
        # STRICT now: the same running server refuses plaintext and serves mTLS.
        mesh.write("pa.yaml", peer_authentication("STRICT"))
        _until(lambda: not isinstance(get(plain_url), httpx.Response))
        # The open connection is not closed, but its requests are checked against the
        # current listener: the chain demands TLS.
        r = kept.get(plain_url)
        assert r.status_code == 503
        assert "requires TLS" in r.text
    finally:
        kept.close()
    r = get(tls_url, ctx)
    assert isinstance(r, httpx.Response) and r.status_code == 200
    # PERMISSIVE (no PeerAuthentication): both.
    mesh.remove("pa.yaml")
    _until(lambda: isinstance(get(plain_url), httpx.Response))
    r = get(tls_url, ctx)
    assert isinstance(r, httpx.Response) and r.status_code == 200


def test_keep_alive_requests_are_not_delayed(mesh: Mesh) -> None:
    """Accepted sockets get TCP_NODELAY (asyncio would not set it on them): 30 requests on
    one connection, each with a chunked response, take far less than 30 delayed ACKs."""
    server = mesh.serve()
    with httpx.Client(timeout=5) as c:
        c.get(f"http://127.0.0.1:{server.port}/")
        started = time.monotonic()
        for _ in range(30):
            assert c.get(f"http://127.0.0.1:{server.port}/").status_code == 200
        elapsed = time.monotonic() - started
    assert elapsed < 0.9, f"{elapsed:.2f}s for 30 keep-alive requests (~40 ms each: Nagle)"
