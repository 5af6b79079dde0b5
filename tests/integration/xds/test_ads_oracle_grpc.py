"""Oracle: grpcio's own C-core xDS client and pymesh's client, side by side on one server.

Both subscribe (C-core through a real ``xds:///`` channel making RPCs to a real backend,
pymesh through a watch) to the same ClusterLoadAssignment on one ``XdsTestServer``. The
server pushes a good version, then one C-core rejects (a sparse priority list), then a good
one again. The EDS requests each client sends must agree: ACK of "1", NACK carrying "1",
ACK of "3"; and C-core keeps routing RPCs on the last good config meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from pymesh.xds.client import XdsClient
from pymesh.xds.resource_types import ResourceType
from tests.xdsserver import CDS, EDS, LDS, Received, WatchRecorder, XdsTestServer

TARGET = "echo.test:7070"
CLUSTER = "c1"

CLIENT = textwrap.dedent(
    """
    import sys
    import grpc
    channel = grpc.insecure_channel("xds:///" + sys.argv[1])
    call = channel.unary_unary("/echo.Echo/Who", request_serializer=None,
                               response_deserializer=None)
    for line in sys.stdin:
        print(call(b"hi", timeout=20, wait_for_ready=True).decode(), flush=True)
    channel.close()
    """
)


def listener() -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager()
    vhost = hcm.route_config.virtual_hosts.add(name="vh", domains=["*"])
    route = vhost.routes.add()
    route.match.prefix = ""
    route.route.cluster = CLUSTER
    router = hcm.http_filters.add(name="router")
    router.typed_config.Pack(router_pb2.Router())
    lis = listener_pb2.Listener(name=TARGET)
    lis.api_listener.api_listener.Pack(hcm)
    return lis


def cluster() -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=CLUSTER, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def endpoints(port: int, priority: int = 0) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=CLUSTER)
    loc = cla.endpoints.add(priority=priority)
    loc.locality.zone = "z1"
    loc.load_balancing_weight.value = 1
    lb = loc.lb_endpoints.add()
    lb.endpoint.address.socket_address.address = "127.0.0.1"
    lb.endpoint.address.socket_address.port_value = port
    return cla


@pytest.fixture
def backend() -> Iterator[int]:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"backend"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None).wait(5)


def eds_answers(server: XdsTestServer, stream: int) -> list[tuple[str, bool]]:
    """(version_info, is NACK) of the EDS requests of ``stream`` that answer a response."""
    return [
        (r.request.version_info, r.is_nack)
        for r in server.requests
        if r.stream == stream and r.type_url == EDS and r.request.response_nonce
    ]


def test_pymesh_acks_and_nacks_like_grpc_core(
    backend: int, python_exe: str, tmp_path: Path
) -> None:
    with XdsTestServer() as server:
        server.set_resources(LDS, {TARGET: listener()})
        server.set_resources(CDS, {CLUSTER: cluster()})
        server.set_resources(EDS, {CLUSTER: endpoints(backend)})  # EDS version 1
        env = {
            **os.environ,
            "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(server.bootstrap_dict()),
        }
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        core = subprocess.Popen(
            [python_exe, "-c", CLIENT, TARGET],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert core.stdin is not None and core.stdout is not None
        try:
            with XdsClient(server.bootstrap()) as client:
                rec = WatchRecorder()
                client.watch(ResourceType.CLUSTER_LOAD_ASSIGNMENT, CLUSTER, rec)
                rec.wait_for(lambda e: e[0] == "changed")
                core.stdin.write("call\n")
                core.stdin.flush()
                assert core.stdout.readline().strip() == "backend"
                core_stream = server.wait_for_request(lambda r: r.type_url == LDS).stream
                ours = server.wait_for_request(
                    lambda r: r.type_url == EDS and r.stream != core_stream
                ).stream

                server.set_resources(EDS, {CLUSTER: endpoints(backend, priority=1)})  # v2
                for stream in (core_stream, ours):
                    server.wait_for_request(lambda r, s=stream: r.stream == s and r.is_nack)
                core.stdin.write("call\n")  # still served by the last good config
                core.stdin.flush()
                assert core.stdout.readline().strip() == "backend"
                server.set_resources(EDS, {CLUSTER: endpoints(backend)})  # v3
                for stream in (core_stream, ours):
                    server.wait_for_request(
                        lambda r, s=stream: (
                            r.stream == s and r.type_url == EDS and r.request.version_info == "3"
                        )
                    )
                expected = [("1", False), ("1", True), ("3", False)]
                assert eds_answers(server, core_stream) == expected
                assert eds_answers(server, ours) == expected
                core_nack = _nack(server, core_stream)
                our_nack = _nack(server, ours)
                assert core_nack.request.error_detail.code == our_nack.request.error_detail.code
                assert "priorit" in core_nack.request.error_detail.message.lower()
                assert "priorit" in our_nack.request.error_detail.message.lower()
        finally:
            core.stdin.close()
            try:
                core.wait(20)
            finally:
                if core.poll() is None:
                    core.kill()
                    core.wait(5)
                assert core.stdout is not None and core.stderr is not None
                core.stdout.close()
                core.stderr.close()


def _nack(server: XdsTestServer, stream: int) -> Received:
    return next(r for r in server.requests if r.stream == stream and r.is_nack)
