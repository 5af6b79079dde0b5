"""Envoy's HTTP/1.1 connection-pool semantics, end to end on loopback.

With ``max_connections: 1`` and ``max_pending_requests: 1`` a second concurrent request
waits for the first one's connection and then succeeds on it; a third overflows (503
``UO``, ``x-envoy-overloaded``); a waiting request gives up at its deadline (504 ``UT``).
``max_requests_per_connection: 1`` opens a new connection for every request: the upstream
counts the connections it accepted (distinct client ports).

The config comes from an xDS test server (one listener, one STATIC cluster), as Envoy's
protos: the Istio translation of the embedded control plane sends no protocol options to
proxyless clients.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

import pymesh.httpx
from pymesh.xds.client import XdsClient
from tests.integration.httpx.conftest import Upstream
from tests.xdsserver import CDS, LDS, XdsTestServer

_REGISTERED = (router_pb2, http_connection_manager_pb2, http_protocol_options_pb2)
TARGET = "queue.default.svc.cluster.local:80"
URL = "http://queue.default.svc.cluster.local:80"


class Counting:
    """ASGI app: ``/sleep/MS`` sleeps first; records each request's client port (one per
    connection) and the highest concurrency."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.active = 0
        self.max_active = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.ports.append(scope["client"][1])
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            path: str = scope["path"]
            if path.startswith("/sleep/"):
                await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        finally:
            self.active -= 1

    def connections(self) -> int:
        return len(set(self.ports))


def _resources(port: int, per_connection: int) -> tuple[dict[str, Any], dict[str, Any]]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "queue",
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
        "route_config": {
            "name": "queue",
            "virtual_hosts": [
                {"name": "queue", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": "queue", "timeout": "10s"}}
                ]}
            ],
        },
    }  # fmt: skip
    listener = {"name": TARGET, "api_listener": {"api_listener": hcm}}
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    common: dict[str, Any] = {}
    if per_connection:
        common["max_requests_per_connection"] = per_connection
    cluster = {
        "name": "queue",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "queue",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
        "circuit_breakers": {
            "thresholds": [{"max_connections": 1, "max_pending_requests": 1, "max_retries": 0}]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": common,
            }
        },
    }
    return (
        {TARGET: json_format.ParseDict(listener, listener_pb2.Listener())},
        {"queue": json_format.ParseDict(cluster, cluster_pb2.Cluster())},
    )


Setup = Callable[[int], tuple[Counting, XdsClient]]


@pytest.fixture
def setup() -> Iterator[Setup]:
    """``setup(max_requests_per_connection)``: a started upstream and an xDS client of a
    test server describing it (all stopped at the end)."""
    started: list[Any] = []

    def make(per_connection: int) -> tuple[Counting, XdsClient]:
        app = Counting()
        up = Upstream(app).start()
        started.append(up)
        server = XdsTestServer()
        server.__enter__()
        started.append(server)
        lds, cds = _resources(up.port, per_connection)
        server.set_resources(LDS, lds)
        server.set_resources(CDS, cds)
        xds = XdsClient(server.bootstrap())
        started.append(xds)
        return app, xds

    yield make
    for thing in reversed(started):
        if isinstance(thing, Upstream):
            thing.stop()
        elif isinstance(thing, XdsTestServer):
            thing.__exit__(None, None, None)
        else:
            thing.close()


def _concurrently(client: httpx.Client, paths: list[str]) -> list[tuple[httpx.Response, float]]:
    barrier = threading.Barrier(len(paths))
    out: list[tuple[httpx.Response, float] | None] = [None] * len(paths)

    def call(i: int) -> None:
        barrier.wait()
        start = time.monotonic()
        r = client.get(URL + paths[i])
        out[i] = (r, time.monotonic() - start)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(o is not None for o in out)
    return out  # type: ignore[return-value]


def _flags(r: httpx.Response) -> tuple[str, ...]:
    return r.extensions[pymesh.httpx.RESULT_EXTENSION].flags  # type: ignore[no-any-return]


def test_sync_one_connection_one_pending(setup: Setup) -> None:
    app, xds = setup(0)
    with pymesh.httpx.Client(xds_client=xds, mesh_wait=10) as client:
        one = [client.get(URL + "/").status_code for _ in range(20)]
        assert one == [200] * 20  # one client never overflows
        two = _concurrently(client, ["/sleep/300"] * 2)
        assert [r.status_code for r, _ in two] == [200, 200]  # the second waited
        assert max(took for _, took in two) >= 0.55  # ... for the first one's 300 ms
        three = _concurrently(client, ["/sleep/300"] * 3)
    codes = collections.Counter(r.status_code for r, _ in three)
    assert codes == {200: 2, 503: 1}, codes
    (overflow,) = [r for r, _ in three if r.status_code == 503]
    assert overflow.headers["x-envoy-overloaded"] == "true" and _flags(overflow) == ("UO",)
    assert app.max_active == 1  # never two requests on the upstream at once
    assert app.connections() == 1  # the waiter got the connection given back


def test_async_one_connection_one_pending(setup: Setup) -> None:
    app, xds = setup(0)

    async def main() -> tuple[list[int], list[int], list[httpx.Response]]:
        async with pymesh.httpx.AsyncClient(xds_client=xds, mesh_wait=10) as client:
            one = [(await client.get(URL + "/")).status_code for _ in range(20)]
            two = await asyncio.gather(*(client.get(URL + "/sleep/200") for _ in range(2)))
            three = await asyncio.gather(*(client.get(URL + "/sleep/200") for _ in range(3)))
            return one, [r.status_code for r in two], list(three)

    one, two, three = asyncio.run(main())
    assert one == [200] * 20 and two == [200, 200]
    codes = collections.Counter(r.status_code for r in three)
    assert codes == {200: 2, 503: 1}, codes
    assert [_flags(r) for r in three if r.status_code == 503] == [("UO",)]
    assert app.max_active == 1 and app.connections() == 1


def test_waiting_request_gives_up_at_its_deadline(setup: Setup) -> None:
    app, xds = setup(0)
    with pymesh.httpx.Client(xds_client=xds, mesh_wait=10) as client:
        assert client.get(URL + "/").status_code == 200
        barrier = threading.Barrier(2)
        results: dict[str, tuple[httpx.Response, float]] = {}

        def call(name: str, path: str, timeout_ms: int) -> None:
            barrier.wait()
            if name == "waiter":
                time.sleep(0.1)  # the other one holds the connection by then
            start = time.monotonic()
            r = client.get(URL + path, headers={"x-envoy-upstream-rq-timeout-ms": str(timeout_ms)})
            results[name] = (r, time.monotonic() - start)

        threads = [
            threading.Thread(target=call, args=("holder", "/sleep/1200", 5000)),
            threading.Thread(target=call, args=("waiter", "/", 300)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    waiter, waited = results["waiter"]
    assert waiter.status_code == 504 and "UT" in _flags(waiter)
    assert 0.25 <= waited < 1.0, waited  # its own deadline, not the holder's response
    assert results["holder"][0].status_code == 200
    assert app.ports.count(app.ports[0]) == len(app.ports) == 2  # the waiter never went out


def test_max_requests_per_connection_opens_a_connection_per_request(setup: Setup) -> None:
    app, xds = setup(1)
    with pymesh.httpx.Client(xds_client=xds, mesh_wait=10) as client:
        assert [client.get(URL + "/").status_code for _ in range(5)] == [200] * 5
        two = _concurrently(client, ["/sleep/200"] * 2)  # the waiter gets a new connection
        assert [r.status_code for r, _ in two] == [200, 200]

    async def main() -> list[int]:
        async with pymesh.httpx.AsyncClient(xds_client=xds, mesh_wait=10) as client:
            return [(await client.get(URL + "/")).status_code for _ in range(5)]

    assert asyncio.run(main()) == [200] * 5
    assert len(app.ports) == 12 and app.connections() == 12


def test_without_a_per_connection_limit_one_connection_serves_all(setup: Setup) -> None:
    app, xds = setup(0)
    with pymesh.httpx.Client(xds_client=xds, mesh_wait=10) as client:
        assert [client.get(URL + "/").status_code for _ in range(5)] == [200] * 5
    assert app.connections() == 1
