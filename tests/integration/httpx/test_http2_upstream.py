"""A cluster whose protocol options say HTTP/2 is spoken to with HTTP/2 (prior knowledge,
as Envoy's ``http2_protocol_options`` to a plaintext upstream), over one pooled connection.

The upstream is a tiny h2c server on the ``h2`` library (uvicorn speaks HTTP/1.1 only); the
config comes from an xDS test server: one listener with an inline route table, one STATIC
cluster with ``HttpProtocolOptions.explicit_http_config.http2_protocol_options``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
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
from tests.xdsserver import CDS, LDS, XdsTestServer

_REGISTERED = (router_pb2, http_connection_manager_pb2, http_protocol_options_pb2)
TARGET = "h2svc.default.svc.cluster.local:80"


class H2Server:
    """h2c with prior knowledge; answers every stream ``200 h2 ok``; counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.05)  # accept() wakes up to see _stop
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self.streams = 0
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._stop = False
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self.connections += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _handle(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        try:
            while True:
                data = sock.recv(65535)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        self.streams += 1
                        conn.send_headers(
                            event.stream_id, [(":status", "200"), ("content-type", "text/plain")]
                        )
                        conn.send_data(event.stream_id, b"h2 ok", end_stream=True)
                sock.sendall(conn.data_to_send())
        except OSError:
            return
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop = True
        self._accept.join(5)
        self.sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)


@pytest.fixture
def h2_server() -> Iterator[H2Server]:
    server = H2Server()
    yield server
    server.stop()


def _resources(port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "h2",
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
        "route_config": {
            "name": "h2",
            "virtual_hosts": [
                {"name": "h2", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": "h2"}}
                ]}
            ],
        },
    }  # fmt: skip
    listener = {"name": TARGET, "api_listener": {"api_listener": hcm}}
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    cluster = {
        "name": "h2",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "h2",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    return (
        {TARGET: json_format.ParseDict(listener, listener_pb2.Listener())},
        {"h2": json_format.ParseDict(cluster, cluster_pb2.Cluster())},
    )


def test_http2_cluster_multiplexes_on_one_connection(h2_server: H2Server) -> None:
    lds, cds = _resources(h2_server.port)
    with XdsTestServer() as server:
        server.set_resources(LDS, lds)
        server.set_resources(CDS, cds)
        with XdsClient(server.bootstrap()) as xds:
            with pymesh.httpx.Client(xds_client=xds, mesh_wait=10) as client:
                for _ in range(5):
                    r = client.get("http://h2svc:80/")
                    assert (r.status_code, r.text) == (200, "h2 ok")
                    assert r.extensions["http_version"] == b"HTTP/2"

            async def concurrent() -> list[int]:
                async with pymesh.httpx.AsyncClient(xds_client=xds, mesh_wait=10) as client:
                    rs = await asyncio.gather(*(client.get("http://h2svc:80/") for _ in range(20)))
                    return [r.status_code for r in rs]

            assert asyncio.run(concurrent()) == [200] * 20
    assert h2_server.streams == 25
    assert h2_server.connections == 2  # one per client, every stream multiplexed on it
