"""Local replies byte for byte as real Envoy's (compare against a real peer).

One route table and one set of clusters go to both: a static Envoy bootstrap, and an xDS
test server that pymesh's client reads. Each route provokes one kind of local reply (no
healthy upstream, connection failure with and without a retry, circuit-breaker overflow,
cluster not found, no route); for every one, the status, the body and the
``content-type`` / ``x-envoy-overloaded`` headers the application gets from
``pymesh.httpx.Client`` must be what Envoy answers.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from google.protobuf import json_format

import pymesh.httpx
from pymesh.xds.client import XdsClient
from tests.envoy_process import run_envoy
from tests.xdsserver import CDS, LDS, XdsTestServer

pytestmark = pytest.mark.envoy

_REGISTERED = (router_pb2, http_connection_manager_pb2)
MESH_HOST = "svc.default.svc.cluster.local:80"
PATHS = ("/uh", "/uf", "/uf-retried", "/uo", "/nc", "/no-route")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def _hcm() -> dict[str, Any]:
    def route(prefix: str, **action: Any) -> dict[str, Any]:
        return {"match": {"path": prefix}, "route": action}

    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "oracle",
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
        "route_config": {
            "name": "oracle",
            "virtual_hosts": [
                {
                    "name": "svc",
                    "domains": ["*"],
                    "routes": [
                        route("/uh", cluster="empty"),
                        route("/uf", cluster="closed"),
                        route(
                            "/uf-retried",
                            cluster="closed",
                            retry_policy={"retry_on": "connect-failure", "num_retries": 1},
                        ),
                        route("/uo", cluster="zero"),
                        route("/nc", cluster_header="x-no-such-header"),
                    ],
                }
            ],
        },
    }


def _clusters(closed: int) -> list[dict[str, Any]]:
    def endpoint(name: str) -> dict[str, Any]:
        address = {"socket_address": {"address": "127.0.0.1", "port_value": closed}}
        lb_endpoints = [{"endpoint": {"address": address}}]
        return {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}

    return [
        {"name": "empty", "type": "STATIC", "load_assignment": {"cluster_name": "empty"}},
        {
            "name": "closed",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": endpoint("closed"),
        },
        {
            "name": "zero",
            "type": "STATIC",
            "circuit_breakers": {"thresholds": [{"max_requests": 0, "max_pending_requests": 0}]},
            "load_assignment": endpoint("zero"),
        },
    ]


@pytest.fixture(scope="module")
def envoy_port(
    envoy_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, int]]:
    """Envoy's listener port, and the closed port the ``closed`` cluster points at."""
    tmp = tmp_path_factory.mktemp("local-replies-envoy")
    closed = _closed_port()
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "oracle",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{"name": "hcm", "typed_config": _hcm()}]}],
                }
            ],
            "clusters": _clusters(closed),
        },
    }
    with run_envoy(envoy_bin, json.dumps(bootstrap), tmp) as envoy:
        yield envoy.port, closed


def _envoy_answer(port: int, path: str) -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"host": "svc"})
        resp = conn.getresponse()
        body = resp.read().decode()
        return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_local_replies_match_envoy(envoy_port: tuple[int, int]) -> None:
    port, closed = envoy_port
    listener = {"name": MESH_HOST, "api_listener": {"api_listener": _hcm()}}
    lds = {MESH_HOST: json_format.ParseDict(listener, listener_pb2.Listener())}
    cds = {c["name"]: json_format.ParseDict(c, cluster_pb2.Cluster()) for c in _clusters(closed)}
    with XdsTestServer() as server:
        server.set_resources(LDS, lds)
        server.set_resources(CDS, cds)
        with (
            XdsClient(server.bootstrap()) as xds,
            pymesh.httpx.Client(xds_client=xds, timeout=10, mesh_wait=10) as client,
        ):
            for path in PATHS:
                status, body, headers = _envoy_answer(port, path)
                r = client.get(f"http://svc{path}")
                assert (r.status_code, r.text) == (status, body), path
                for name in ("content-type", "x-envoy-overloaded"):
                    assert r.headers.get(name) == headers.get(name), (path, name)
                assert r.headers.get("content-length") == headers.get("content-length"), path
