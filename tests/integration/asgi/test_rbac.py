"""AuthorizationPolicy on a ``pymesh.serve`` app: ALLOW/DENY by principals, namespaces,
paths and methods, answered as Envoy does (403 ``RBAC: access denied``); NOT_SERVING
before the listener arrives; the middleware alone under a plain uvicorn."""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
import threading
import time
from typing import Any

import httpx
import uvicorn

import pymesh.asgi
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.xds.client import XdsClient
from tests.integration.asgi.conftest import SERVER_ID, Mesh, get, whoami

POLICIES = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-admin, namespace: default}
    spec:
      selector: {matchLabels: {app: web}}
      action: DENY
      rules:
      - to: [{operation: {paths: ["/admin/*"]}}]
        from: [{source: {notNamespaces: [ops]}}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-readers, namespace: default}
    spec:
      selector: {matchLabels: {app: web}}
      action: ALLOW
      rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/productpage]}}]
        to: [{operation: {methods: [GET], paths: ["/books*", "/admin/*"]}}]
      - from: [{source: {namespaces: [ops]}}]
      - to: [{operation: {paths: [/health]}}]
    """
)


def _status(r: httpx.Response | Exception) -> int | str:
    return r.status_code if isinstance(r, httpx.Response) else type(r).__name__


def test_rbac_principals_namespaces_paths_methods(mesh: Mesh) -> None:
    mesh.write("authz.yaml", POLICIES)
    server = mesh.serve()
    base = f"https://127.0.0.1:{server.port}"
    productpage = mesh.client_context(mesh.identity("default", "productpage"), (SERVER_ID,))
    reviews = mesh.client_context(mesh.identity("default", "reviews"), (SERVER_ID,))
    ops = mesh.client_context(mesh.identity("ops", "admin"), (SERVER_ID,))

    def call(ctx: Any, path: str, method: str = "GET", plain: bool = False) -> int | str:
        url = f"http://127.0.0.1:{server.port}{path}" if plain else f"{base}{path}"
        try:
            with httpx.Client(verify=ctx if ctx else False, timeout=5) as c:
                return c.request(method, url).status_code
        except httpx.TransportError as exc:
            return type(exc).__name__

    # The policies can take a moment to reach the node after the listener first arrives.
    deadline = time.monotonic() + 15
    while call(reviews, "/books") != 403:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    table = {
        ("productpage", "GET /books/1"): call(productpage, "/books/1"),
        ("productpage", "POST /books/1"): call(productpage, "/books/1", "POST"),
        ("productpage", "GET /admin/x"): call(productpage, "/admin/x"),
        ("productpage", "GET /other"): call(productpage, "/other"),
        ("reviews", "GET /books/1"): call(reviews, "/books/1"),
        ("reviews", "GET /health"): call(reviews, "/health"),
        ("ops", "DELETE /anything"): call(ops, "/anything", "DELETE"),
        ("ops", "GET /admin/x"): call(ops, "/admin/x"),
        ("plaintext", "GET /books/1"): call(None, "/books/1", plain=True),
        ("plaintext", "GET /health"): call(None, "/health", plain=True),
    }
    assert table == {
        ("productpage", "GET /books/1"): 200,
        ("productpage", "POST /books/1"): 403,
        ("productpage", "GET /admin/x"): 403,  # DENY: not from namespace ops
        ("productpage", "GET /other"): 403,
        ("reviews", "GET /books/1"): 403,
        ("reviews", "GET /health"): 200,
        ("ops", "DELETE /anything"): 200,
        ("ops", "GET /admin/x"): 200,
        ("plaintext", "GET /books/1"): 403,  # no principal without mTLS
        ("plaintext", "GET /health"): 200,
    }
    with httpx.Client(verify=reviews, timeout=5) as c:
        r = c.get(f"{base}/books/1")
    assert r.status_code == 403
    assert r.text == "RBAC: access denied"
    assert r.headers["content-type"] == "text/plain"


def test_not_serving_until_the_listener_arrives(mesh: Mesh, tmp_path: Any) -> None:
    # The control plane is not up yet: the app answers 503 with the reason.
    free = socket.create_server(("127.0.0.1", 0))
    cp_port = free.getsockname()[1]
    free.close()
    data = generate_bootstrap(
        xds_address=f"127.0.0.1:{cp_port}", labels={"app": "web"}, service_account="web"
    )
    client = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
    mesh.clients.append(client)
    app = pymesh.asgi.MeshMiddleware(whoami, xds_client=client, host="127.0.0.1")
    server = pymesh.asgi.MeshServer(app, host="127.0.0.1", port=0, xds_client=client).start()
    mesh.servers.append(server)
    r = get(f"http://127.0.0.1:{server.port}/")
    assert isinstance(r, httpx.Response) and r.status_code == 503
    assert r.text.startswith("pymesh: not serving")
    assert not app.serving
    # Once stopped watching (as if the listener were removed): 503 again.
    ok = mesh.xds_client(labels={"app": "web"}, service_account="web", ip="127.0.0.1")
    app2 = pymesh.asgi.MeshMiddleware(whoami, xds_client=ok, host="127.0.0.1")
    server2 = pymesh.asgi.MeshServer(app2, host="127.0.0.1", port=0, xds_client=ok).start()
    mesh.servers.append(server2)
    assert app2.wait_for_serving(15), app2.message
    r = get(f"http://127.0.0.1:{server2.port}/")
    assert isinstance(r, httpx.Response) and r.status_code == 200
    app2.close()
    r = get(f"http://127.0.0.1:{server2.port}/")
    assert isinstance(r, httpx.Response) and r.status_code == 503
    assert r.text == "pymesh: not serving: server stopped"


def test_middleware_alone_under_plain_uvicorn(mesh: Mesh) -> None:
    """Without pymesh.serve (plaintext uvicorn): the middleware still routes and enforces
    RBAC; an mTLS-only listener leaves it NOT_SERVING (it cannot terminate TLS)."""
    mesh.write(
        "deny.yaml",
        textwrap.dedent(
            """\
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: deny-secret, namespace: default}
            spec:
              selector: {matchLabels: {app: web}}
              action: DENY
              rules: [{to: [{operation: {paths: [/secret]}}]}]
            """
        ),
    )
    client = mesh.xds_client(labels={"app": "web"}, service_account="web", ip="127.0.0.1")
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = pymesh.asgi.MeshMiddleware(whoami, xds_client=client, host="127.0.0.1", port=port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while _status(get(f"http://127.0.0.1:{port}/secret")) != 403:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = get(f"http://127.0.0.1:{port}/open")
        assert isinstance(r, httpx.Response) and r.status_code == 200
        assert json.loads(r.text)["tls"] is False
        # Envoy's request header limits (100 headers, 60 KiB): 431 beyond, as a sidecar
        many = {f"x-h{i}": "v" for i in range(95)}  # + host, accept, ... from httpx
        assert _status(get(f"http://127.0.0.1:{port}/open", headers=many)) == 200
        many.update({f"x-more{i}": "v" for i in range(10)})
        assert _status(get(f"http://127.0.0.1:{port}/open", headers=many)) == 431
        big = {"x-big": "a" * (61 * 1024)}
        assert _status(get(f"http://127.0.0.1:{port}/open", headers=big)) == 431
        assert app.listener_name == f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{port}"
        mesh.write(
            "pa.yaml",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
            "metadata: {name: strict, namespace: default}\nspec: {mtls: {mode: STRICT}}\n",
        )
        deadline = time.monotonic() + 15
        while _status(get(f"http://127.0.0.1:{port}/open")) != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "requires TLS" in app.message
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        app.close()
