"""Istio's "Authorization for HTTP traffic" task on Bookinfo, reproduced with small stand-in
ASGI services served by ``pymesh.asgi.MeshServer`` and calling each other with
``pymesh.httpx.AsyncClient`` (ISTIO_MUTUAL, each with its own service account certificate):

1. no policy: everything works;
2. ``allow-nothing`` in the namespace: productpage answers 403 ``RBAC: access denied``;
3. ``productpage-viewer`` (GET from anyone): the page loads, details and reviews are denied;
4. ``details-viewer`` and ``reviews-viewer`` (GET from principal
   ``cluster.local/ns/default/sa/bookinfo-productpage``): both load, ratings is denied to
   reviews;
5. ``ratings-viewer`` (GET from ``bookinfo-reviews``): everything works again.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable
from typing import Any

import httpx

import pymesh.asgi
import pymesh.httpx
from pymesh.xds.client import XdsClient
from tests.integration.asgi.conftest import Mesh, write_bundle

SERVICES = ("productpage", "details", "reviews", "ratings")
CALLS = {"productpage": ("details", "reviews"), "reviews": ("ratings",)}


def _url(service: str) -> str:
    return f"http://{service}.default.svc.cluster.local:9080/{service}/0"


def stand_in(name: str, client: XdsClient) -> Any:
    """A Bookinfo service: answers its name, the caller it saw, and the status of each
    service it calls (with what that one answered)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        caller = pymesh.asgi.peer(scope)
        body: dict[str, Any] = {"service": name, "caller": caller.principal if caller else None}
        if CALLS.get(name):
            async with pymesh.httpx.AsyncClient(xds_client=client, mesh_wait=10) as http:
                for callee in CALLS[name]:
                    r = await http.get(_url(callee))
                    body[callee] = r.status_code
                    if r.status_code == 200:
                        body.update({k: v for k, v in r.json().items() if k in SERVICES})
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": data})

    return app


def mesh_yaml(ports: dict[str, int]) -> str:
    docs = []
    for svc, port in ports.items():
        docs.append(
            textwrap.dedent(
                f"""\
                apiVersion: networking.istio.io/v1
                kind: ServiceEntry
                metadata: {{name: {svc}, namespace: default}}
                spec:
                  hosts: [{svc}.default.svc.cluster.local]
                  location: MESH_INTERNAL
                  resolution: STATIC
                  ports: [{{number: 9080, name: http, protocol: HTTP}}]
                  endpoints:
                  - {{address: 127.0.0.1, ports: {{http: {port}}}, serviceAccount: bookinfo-{svc}}}
                ---
                apiVersion: networking.istio.io/v1
                kind: DestinationRule
                metadata: {{name: {svc}, namespace: default}}
                spec:
                  host: {svc}.default.svc.cluster.local
                  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
                """
            )
        )
    return "---\n".join(docs)


def viewer(app: str, principal: str | None = None) -> str:
    """``APP-viewer``: ALLOW GET to ``app`` from anyone, or from ``principal`` only."""
    rule = "{to: [{operation: {methods: [GET]}}]}"
    if principal:
        rule = f"{{from: [{{source: {{principals: [{principal}]}}}}], " + rule[1:]
    return textwrap.dedent(
        f"""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: {app}-viewer, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: {app}}}}}
          action: ALLOW
          rules: [{rule}]
        """
    )


ALLOW_NOTHING = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-nothing, namespace: default}
    spec: {}
    """
)


def test_bookinfo_authorization_task(mesh: Mesh) -> None:
    ports: dict[str, int] = {}
    for svc in SERVICES:
        sa = f"bookinfo-{svc}"
        certs = write_bundle(mesh.identity("default", sa), mesh.tmp / sa)
        client = mesh.xds_client(
            labels={"app": svc}, service_account=sa, ip="127.0.0.1", cert_dir=str(certs)
        )
        server = pymesh.asgi.MeshServer(
            stand_in(svc, client), host="127.0.0.1", port=0, xds_client=client
        ).start()
        mesh.servers.append(server)
        ports[svc] = server.port
    mesh.write("bookinfo.yaml", mesh_yaml(ports))
    for server in mesh.servers:
        assert server.wait_for_serving(15)
    page = f"http://127.0.0.1:{ports['productpage']}/productpage"

    def view() -> tuple[int, Any]:
        r = httpx.get(page, timeout=20)
        return r.status_code, (r.json() if r.status_code == 200 else r.text)

    def until(check: Callable[[int, Any], bool]) -> tuple[int, Any]:
        deadline = time.monotonic() + 20
        while True:
            status, body = view()
            if check(status, body):
                return status, body
            assert time.monotonic() < deadline, (status, body)
            time.sleep(0.1)

    everything = {
        "service": "productpage",
        "caller": None,  # the user's request is plaintext (PERMISSIVE), no principal
        "details": 200,
        "reviews": 200,
        "ratings": 200,
    }
    # 1. no policy
    assert until(lambda s, b: b == everything) == (200, everything)
    # 2. allow-nothing
    mesh.write("allow-nothing.yaml", ALLOW_NOTHING)
    assert until(lambda s, b: s == 403) == (403, "RBAC: access denied")
    # 3. productpage-viewer: the page, but details and reviews are denied
    mesh.write("productpage-viewer.yaml", viewer("productpage"))
    step3 = {"service": "productpage", "caller": None, "details": 403, "reviews": 403}
    assert until(lambda s, b: s == 200)[1] == step3
    # 4. details and reviews viewers by principal: ratings is still denied to reviews
    productpage = "cluster.local/ns/default/sa/bookinfo-productpage"
    mesh.write("details-viewer.yaml", viewer("details", productpage))
    mesh.write("reviews-viewer.yaml", viewer("reviews", productpage))
    step4 = {**step3, "details": 200, "reviews": 200, "ratings": 403}
    assert until(lambda s, b: b == step4) == (200, step4)
    # 5. ratings-viewer for reviews
    mesh.write(
        "ratings-viewer.yaml", viewer("ratings", "cluster.local/ns/default/sa/bookinfo-reviews")
    )
    assert until(lambda s, b: b == everything) == (200, everything)
    # The identities the services saw are the callers' SPIFFE principals.
    with httpx.Client(
        verify=mesh.client_context(mesh.identity("default", "bookinfo-productpage")), timeout=10
    ) as c:
        r = c.get(f"https://127.0.0.1:{ports['details']}/details/0")
    assert r.json()["caller"] == productpage
