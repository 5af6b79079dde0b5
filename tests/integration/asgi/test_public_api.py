"""The public surface of ``pymesh.asgi`` (pinned), ``pymesh.serve``, and what the app sees of
its caller: ``peer(scope)``, ``peer(request)``, the ASGI ``tls`` extension."""

from __future__ import annotations

import json
from typing import Any

import httpx

import pymesh
import pymesh.asgi
from pymesh.asgi._peer import Connection, Peer
from tests.integration.asgi.conftest import SERVER_ID, Mesh


def test_pinned_surface() -> None:
    assert sorted(pymesh.asgi.__all__) == ["MeshMiddleware", "MeshServer", "Peer", "peer", "serve"]
    for name in pymesh.asgi.__all__:
        assert getattr(pymesh.asgi, name) is not None
    assert pymesh.serve is pymesh.asgi.serve


def test_peer_parts_and_lookup() -> None:
    p = Peer(True, "spiffe://cluster.local/ns/shop/sa/cart", "10.0.0.1", 5000)
    assert (p.principal, p.namespace, p.service_account, p.trust_domain) == (
        "cluster.local/ns/shop/sa/cart",
        "shop",
        "cart",
        "cluster.local",
    )
    plain = Peer(False)
    assert (plain.principal, plain.namespace, plain.trust_domain) == (None, None, None)

    class Request:  # what Starlette / FastAPI requests look like to peer()
        scope = {"pymesh.peer": p}

    assert pymesh.asgi.peer(Request()) is p
    assert pymesh.asgi.peer({"pymesh.peer": p}) is p
    assert pymesh.asgi.peer({}) is None
    assert Connection.from_pem(None).tls


async def tls_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    tls = scope["extensions"].get("tls")
    p = pymesh.asgi.peer(scope)
    body = json.dumps(
        {
            "tls": tls and {k: tls[k] for k in ("client_cert_name", "tls_version")},
            "chain": len(tls["client_cert_chain"]) if tls else None,
            "pem": tls["client_cert_chain"][0].startswith("-----BEGIN") if tls else None,
            "same": scope["extensions"]["pymesh"] is p,
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_tls_extension_in_the_scope(mesh: Mesh) -> None:
    server = mesh.serve(tls_echo)
    ctx = mesh.client_context(mesh.identity("default", "client"), (SERVER_ID,))
    with httpx.Client(verify=ctx, timeout=5) as c:
        body = c.get(f"https://127.0.0.1:{server.port}/").json()
    assert body["chain"] == 1 and body["pem"] is True and body["same"] is True
    assert body["tls"]["tls_version"] in (0x0303, 0x0304)
    with httpx.Client(timeout=5) as c:
        body = c.get(f"http://127.0.0.1:{server.port}/").json()
    assert body == {"tls": None, "chain": None, "pem": None, "same": True}
