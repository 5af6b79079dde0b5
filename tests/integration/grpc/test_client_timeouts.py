"""Deadlines of gRPC calls: the caller's ``timeout`` combined with the route's
``max_stream_duration`` and ``grpc_timeout_header_max``.

Hand-made xDS on ``tests/xdsserver.py`` (Istio does not emit ``grpc_timeout_header_max``):
``/echo.Echo/`` with ``grpc_timeout_header_max: 0.3 s`` (the caller's timeout, capped at
0.3 s) and ``/other.Other/`` with ``max_stream_duration: 0.3 s``. Expected values follow
gRFC A31's table, except one deliberate difference (see the last case).

grpcio's C-core is not used as the oracle here: in a trial with this config grpcio 1.85
failed every call at once (``DEADLINE_EXCEEDED`` after 0.2 ms) on routes with a limit of
1 s or less, while the same routes with 5 s worked.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

import pymesh.grpc
from pymesh.xds.client import XdsClient
from tests.integration.grpc._client_mesh import OTHER, WHO, EchoServer, echo_servers
from tests.xdsserver import CDS, EDS, LDS, XdsTestServer

__all__ = ["echo_servers"]

TARGET = "echo.test:7070"
CLUSTER = "c1"

# (name, method, caller timeout or None, server sleep ms)
CASES: list[tuple[str, str, float | None, int]] = [
    ("header-max-caps-caller", WHO, 10.0, 2000),
    ("caller-shorter", WHO, 0.1, 2000),
    ("no-header-no-limit", WHO, None, 500),
    ("stream-duration", OTHER, None, 2000),
    ("stream-duration-ok", OTHER, 10.0, 50),
]

RUNNER = textwrap.dedent(
    """
    import json, sys, time
    import grpc

    def run(channel, cases):
        out = {}
        for name, method, timeout, sleep_ms in cases:
            mc = channel.unary_unary(method)
            start = time.monotonic()
            try:
                mc(b"hi", timeout=timeout, metadata=[("x-sleep-ms", str(sleep_ms))])
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            out[name] = [code, time.monotonic() - start]
        return out

    if __name__ == "__main__":
        channel = grpc.insecure_channel("xds:///" + sys.argv[1])
        try:
            channel.unary_unary("/warm.Up/Call")(b"hi", timeout=20)
        except grpc.RpcError as e:
            assert e.code() is grpc.StatusCode.UNIMPLEMENTED, e
        print(json.dumps(run(channel, json.loads(sys.argv[2]))))
        channel.close()
    """
)


def listener() -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager()
    vhost = hcm.route_config.virtual_hosts.add(name="vh", domains=["*"])
    echo = vhost.routes.add()
    echo.match.prefix = "/echo.Echo/"
    echo.route.cluster = CLUSTER
    echo.route.max_stream_duration.grpc_timeout_header_max.FromMilliseconds(300)
    other = vhost.routes.add()
    other.match.prefix = "/other.Other/"
    other.route.cluster = CLUSTER
    other.route.max_stream_duration.max_stream_duration.FromMilliseconds(300)
    rest = vhost.routes.add()  # no limits: the warm-up call (the server answers UNIMPLEMENTED)
    rest.match.prefix = "/"
    rest.route.cluster = CLUSTER
    router = hcm.http_filters.add(name="router")
    router.typed_config.Pack(router_pb2.Router())
    lis = listener_pb2.Listener(name=TARGET)
    lis.api_listener.api_listener.Pack(hcm)
    return lis


def cluster() -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=CLUSTER, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def endpoints(port: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=CLUSTER)
    loc = cla.endpoints.add()
    loc.locality.zone = "z1"  # C-core requires a locality
    loc.load_balancing_weight.value = 1
    lb = loc.lb_endpoints.add()
    lb.endpoint.address.socket_address.address = "127.0.0.1"
    lb.endpoint.address.socket_address.port_value = port
    return cla


def test_deadlines_caller_and_route(echo_servers: Callable[[str], EchoServer]) -> None:
    backend = echo_servers("v1")
    with XdsTestServer() as server:
        server.set_resources(LDS, {TARGET: listener()})
        server.set_resources(CDS, {CLUSTER: cluster()})
        server.set_resources(EDS, {CLUSTER: endpoints(backend.port)})
        with (
            XdsClient(server.bootstrap()) as client,
            pymesh.grpc.insecure_channel(f"xds:///{TARGET}", xds_client=client) as channel,
        ):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/warm.Up/Call")(b"hi", timeout=20)
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            namespace: dict[str, Any] = {"__name__": "runner"}
            exec(RUNNER, namespace)
            ours: dict[str, Any] = namespace["run"](channel, json.loads(json.dumps(CASES)))
    expected = {
        "header-max-caps-caller": ("DEADLINE_EXCEEDED", 0.3),  # A31: 20s app, 10s max -> 10s
        "caller-shorter": ("DEADLINE_EXCEEDED", 0.1),  # the app's deadline is never exceeded
        "stream-duration": ("DEADLINE_EXCEEDED", 0.3),  # A31: unset app, 10s msd -> 10s
        "stream-duration-ok": ("OK", 0.05),
        # The deliberate difference: no deadline on a grpc_timeout_header_max route. A31
        # caps it at the max; Envoy (the sidecar, whose semantics the policy core follows)
        # applies the max to a grpc-timeout header only, so there is no limit.
        "no-header-no-limit": ("OK", 0.5),
    }
    for name, (code, seconds) in expected.items():
        result = ours[name]
        assert result[0] == code, (name, result)
        assert seconds - 0.02 <= result[1] < seconds + 0.9, (name, result)
