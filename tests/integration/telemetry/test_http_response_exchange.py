"""The server's metadata exchange headers on an HTTP response are read by the client's
telemetry and removed before the application sees the response, as a client sidecar's
exchange filter removes them (sync and async clients)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import httpx
from google.protobuf import struct_pb2

import pymesh.httpx
from pymesh import telemetry
from tests.integration.httpx.conftest import HOST, PORT, Backend, Mesh, Upstream, service_yaml

Make = Callable[..., tuple[Backend, Upstream]]
Install = Callable[..., telemetry.Telemetry]

PEER = {
    "NAMESPACE": "bookinfo",
    "WORKLOAD_NAME": "reviews-v2",
    "CLUSTER_ID": "Kubernetes",
    "LABELS": {"app": "reviews", "version": "v2"},
}


def test_response_exchange_headers_are_read_and_hidden_from_the_app(
    mesh: Mesh, upstreams: Make, installed: Install
) -> None:
    s = struct_pb2.Struct()
    s.update(PEER)
    answer = base64.b64encode(s.SerializeToString(deterministic=True))

    async def reviews(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [
            (b"x-envoy-peer-metadata", answer),
            (b"x-envoy-peer-metadata-id", b"sidecar~10.0.0.9~reviews-v2~bookinfo"),
            (b"x-app", b"kept"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    _, up = upstreams("v1", app=reviews)
    mesh.write(service_yaml({"v1": up.port}))
    mesh.start(workload="productpage-v1", labels={"app": "productpage", "version": "v1"})
    assert mesh.client is not None
    tel = installed(node=mesh.client.bootstrap.node)
    url = f"http://{HOST}:{PORT}/"
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        r = client.get(url)
    assert r.status_code == 200 and r.text == "ok"
    assert r.headers["x-app"] == "kept"
    assert "x-envoy-peer-metadata" not in r.headers
    assert "x-envoy-peer-metadata-id" not in r.headers

    async def run() -> httpx.Response:
        async with pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10) as client:
            return await client.get(url)

    ar = asyncio.run(run())
    assert ar.status_code == 200 and ar.headers["x-app"] == "kept"
    assert "x-envoy-peer-metadata" not in ar.headers
    assert "x-envoy-peer-metadata-id" not in ar.headers
    # read all the same: both requests name the peer the server described
    rows = [(labels, s.requests) for labels, s in tel.requests.snapshot() if labels[0] == "source"]
    assert [(labels[9], labels[10], labels[12], n) for labels, n in rows] == [
        ("reviews-v2", "bookinfo", "reviews", 2)
    ]
    telemetry.uninstall()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        off = client.get(url)  # telemetry off: no exchange read, the response as it came
    assert off.headers["x-envoy-peer-metadata"] == answer.decode()
