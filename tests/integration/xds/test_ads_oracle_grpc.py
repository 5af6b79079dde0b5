"""Oracle: grpcio's own C-core xDS client and pymesh's client, side by side on one server.

Both subscribe (C-core through a real ``xds:///`` channel making RPCs to a real backend,
pymesh through a watch) to the same resources on one ``XdsTestServer``, which then does
the same thing to both streams:

- a good EDS version, one C-core rejects (a sparse priority list), a good one again: the EDS
  requests of both clients must be ACK "1", NACK carrying "1", ACK "3" (and C-core keeps
  routing on the last good config meanwhile);
- streams killed: both resubscribe with the version they hold and no nonce;
- the cluster removed from CDS: both drop it (C-core fails RPCs, pymesh says
  does-not-exist), unless the server has ``ignore_resource_deletion``: both keep it.
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
    for line in sys.stdin:  # "wait": wait for the channel to be ready; "now": fail fast
        try:
            answer = call(b"hi", timeout=20, wait_for_ready=line.strip() == "wait").decode()
        except grpc.RpcError as exc:
            answer = "ERR:" + exc.code().name
        print(answer, flush=True)
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
                core.stdin.write("wait\n")
                core.stdin.flush()
                assert core.stdout.readline().strip() == "backend"
                core_stream = server.wait_for_request(lambda r: r.type_url == LDS).stream
                ours = server.wait_for_request(
                    lambda r: r.type_url == EDS and r.stream != core_stream
                ).stream

                server.set_resources(EDS, {CLUSTER: endpoints(backend, priority=1)})  # v2
                for stream in (core_stream, ours):
                    server.wait_for_request(lambda r, s=stream: r.stream == s and r.is_nack)
                core.stdin.write("now\n")  # still served by the last good config
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


def _start_core(
    server: XdsTestServer, python_exe: str, features: list[str]
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(server.bootstrap_dict(server_features=features)),
    }
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    return subprocess.Popen(
        [python_exe, "-c", CLIENT, TARGET],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop_core(core: subprocess.Popen[str]) -> None:
    assert core.stdin is not None and core.stdout is not None and core.stderr is not None
    core.stdin.close()
    try:
        core.wait(20)
    finally:
        if core.poll() is None:
            core.kill()
            core.wait(5)
        core.stdout.close()
        core.stderr.close()


def _call(core: subprocess.Popen[str], mode: str = "wait") -> str:
    assert core.stdin is not None and core.stdout is not None
    core.stdin.write(mode + "\n")
    core.stdin.flush()
    return core.stdout.readline().strip()


def test_reconnect_resends_the_versions_held_like_grpc_core(backend: int, python_exe: str) -> None:
    with XdsTestServer() as server:
        server.set_resources(LDS, {TARGET: listener()})
        server.set_resources(CDS, {CLUSTER: cluster()})
        server.set_resources(EDS, {CLUSTER: endpoints(backend)})
        core = _start_core(server, python_exe, ["xds_v3"])
        try:
            with XdsClient(server.bootstrap()) as client:
                rec = WatchRecorder()
                client.watch(ResourceType.CLUSTER_LOAD_ASSIGNMENT, CLUSTER, rec)
                rec.wait_for(lambda e: e[0] == "changed")
                assert _call(core) == "backend"
                first_streams = {r.stream for r in server.requests}
                assert len(first_streams) == 2
                count = len(server.requests)
                server.kill_streams()
                resent = {}
                for _ in range(2):
                    r = server.wait_for_request(
                        lambda r: (
                            r.type_url == EDS
                            and r.stream not in first_streams
                            and r.stream not in resent
                        ),
                        start=count,
                    )
                    resent[r.stream] = r.request
                versions = sorted((q.version_info, q.response_nonce) for q in resent.values())
                assert versions == [("1", ""), ("1", "")]  # both: the version held, no nonce
                assert _call(core) == "backend"
                assert rec.kinds() == ["changed"]
        finally:
            _stop_core(core)


@pytest.mark.parametrize("ignore", [False, True], ids=["delete", "ignore_resource_deletion"])
def test_cds_deletion_like_grpc_core(backend: int, python_exe: str, ignore: bool) -> None:
    features = ["xds_v3", "ignore_resource_deletion"] if ignore else ["xds_v3"]
    with XdsTestServer() as server:
        server.set_resources(LDS, {TARGET: listener()})
        server.set_resources(CDS, {CLUSTER: cluster()})
        server.set_resources(EDS, {CLUSTER: endpoints(backend)})
        core = _start_core(server, python_exe, features)
        try:
            bootstrap = server.bootstrap(server_features=features)
            with XdsClient(bootstrap) as client:
                rec = WatchRecorder()
                client.watch(ResourceType.CLUSTER, CLUSTER, rec)
                rec.wait_for(lambda e: e[0] == "changed")
                assert _call(core) == "backend"
                streams = {r.stream for r in server.requests}
                assert len(streams) == 2
                version = server.remove_resources(CDS, [CLUSTER])
                for stream in streams:
                    server.wait_for_request(
                        lambda r, s=stream: (
                            r.stream == s
                            and r.type_url == CDS
                            and r.request.version_info == version
                        )
                    )
                if ignore:
                    assert _call(core, "now") == "backend"  # C-core keeps the cluster
                    assert rec.kinds() == ["changed"]  # and so do we
                else:
                    rec.wait_for(lambda e: e == ("does_not_exist", CLUSTER))
                    assert client.resource_statuses()[0].status == "DOES_NOT_EXIST"
                    answers = []
                    for _ in range(50):  # C-core applies the deletion asynchronously
                        answers.append(_call(core, "now"))
                        if answers[-1] != "backend":
                            break
                    assert answers[-1] == "ERR:UNAVAILABLE", answers
        finally:
            _stop_core(core)
