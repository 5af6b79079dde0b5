"""gRPC retries (gRFC A44/A6) against grpcio's own C-core xDS client (compare against a real
peer).

One ``RouteConfiguration`` with retry policies goes to grpcio (inline in the listener, over
a real ADS server) and, decoded by pymesh's codec, to ``RetryState(is_grpc=True)``. A real
gRPC backend answers each attempt of a call from a script in the call's metadata (a status
code, optionally with ``grpc-retry-pushback-ms``) and counts attempts. For every case the
number of attempts C-core made and the status the call ended with must be what pymesh
predicts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from pymesh.core.retry import Retry, RetryState
from pymesh.core.types import Headers, Outcome, RequestInfo
from pymesh.model.route import RouteAction, RouteConfiguration
from pymesh.xds.codec import decode_resource
from pymesh.xds.resource_types import ResourceType
from tests.xdsserver import CDS, EDS, LDS, XdsTestServer

TARGET = "retry.test:7070"
CLUSTER = "c1"
FAST = {"base_interval": "0.005s", "max_interval": "0.01s"}

ROUTES = [
    ("R1", {"retry_on": "unavailable", "num_retries": 2, "retry_back_off": FAST}),
    (
        "R2",
        {"retry_on": "cancelled,internal,5xx,reset", "num_retries": 10, "retry_back_off": FAST},
    ),
    ("R3", None),
    ("R4", {"retry_on": "5xx,reset,connect-failure", "num_retries": 3, "retry_back_off": FAST}),
    (
        "R5",
        {"retry_on": "resource-exhausted,deadline-exceeded", "retry_back_off": FAST},
    ),
]


def route_configuration() -> route_pb2.RouteConfiguration:
    routes = []
    for method, policy in ROUTES:
        action: dict[str, object] = {"cluster": CLUSTER}
        if policy is not None:
            action["retry_policy"] = policy
        routes.append({"name": method, "match": {"path": f"/echo.Echo/{method}"}, "route": action})
    rc = {"name": "rc", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]}
    return json_format.ParseDict(rc, route_pb2.RouteConfiguration())


def listener(rc: route_pb2.RouteConfiguration) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager()
    hcm.route_config.CopyFrom(rc)
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
    loc.locality.zone = "z1"
    loc.load_balancing_weight.value = 1
    lb = loc.lb_endpoints.add()
    lb.endpoint.address.socket_address.address = "127.0.0.1"
    lb.endpoint.address.socket_address.port_value = port
    return cla


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    method: str
    script: tuple[str, ...]
    """Per attempt (the last repeats): a gRPC status code, optionally ``pN`` for a
    ``grpc-retry-pushback-ms: N`` trailer (``p-1``: do not retry)."""
    metadata: tuple[tuple[str, str], ...] = ()


CASES = [
    Case("R1", ("0",)),
    Case("R1", ("14", "0")),
    Case("R1", ("14", "14", "0")),
    Case("R1", ("14",)),
    Case("R1", ("13", "0")),
    Case("R1", ("14", "13", "0")),
    Case("R1", ("14",), (("x-envoy-max-retries", "0"), ("x-envoy-retry-grpc-on", "internal"))),
    Case("R1", ("14p-1", "0")),
    Case("R1", ("14pabc", "0")),
    Case("R1", ("14p30", "0")),
    # (A pushback of 0 ms is left out: grpcio 1.85 then never retries and waits for the
    # deadline; gRFC A6 says retry at once, which is what pymesh does.)
    Case("R1", ("14p1", "14p1", "14p1", "0")),
    Case("R1", ("13p20", "0")),
    Case("R2", ("13",)),
    Case("R2", ("1", "13", "1", "0")),
    Case("R2", ("14", "0")),
    Case("R2", ("2", "0")),
    Case("R3", ("14", "0")),
    Case("R4", ("14", "0")),
    Case("R5", ("8", "4", "0")),
    Case("R5", ("8", "8", "0")),
    Case("R5", ("4",)),
]

# --------------------------------------------------------------------------- processes

CLIENT = textwrap.dedent(
    """
    import sys
    import grpc
    channel = grpc.insecure_channel("xds:///" + sys.argv[1])
    for line in sys.stdin:
        method, call_id, script, extra = line.rstrip("\\n").split("|")
        call = channel.unary_unary("/echo.Echo/" + method, request_serializer=None,
                                   response_deserializer=None)
        metadata = [("x-id", call_id), ("x-script", script)]
        for item in filter(None, extra.split(";")):
            k, v = item.split("=", 1)
            metadata.append((k, v))
        try:
            call(b"hi", timeout=20, wait_for_ready=True, metadata=metadata)
            answer = "OK"
        except grpc.RpcError as exc:
            answer = exc.code().name
        print(answer, flush=True)
    channel.close()
    """
)

_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Backend:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}

    def handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = dict(context.invocation_metadata())
        call_id = str(md.get("x-id", ""))
        script = str(md.get("x-script", "0")).split(",")
        with self.lock:
            n = self.attempts.get(call_id, 0)
            self.attempts[call_id] = n + 1
        item = script[min(n, len(script) - 1)]
        code_text, _, pushback = item.partition("p")
        code = int(code_text)
        if pushback:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", pushback),))
        if code == 0:
            return b"ok"
        context.abort(_CODES[code], f"scripted {code}")
        raise AssertionError("unreachable")


@pytest.fixture
def backend() -> Iterator[tuple[int, _Backend]]:
    state = _Backend()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {method: grpc.unary_unary_rpc_method_handler(state.handle) for method, _ in ROUTES}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, state
    finally:
        server.stop(None).wait(5)


# --------------------------------------------------------------------------- comparing


def _predict(config: RouteConfiguration, case: Case) -> tuple[int, str]:
    route = next(r for r in config.virtual_hosts[0].routes if r.name == case.method)
    action = route.action
    assert isinstance(action, RouteAction)
    request = RequestInfo(
        "POST", TARGET, f"/echo.Echo/{case.method}", Headers(case.metadata), grpc=True
    )
    state = RetryState(action.retry_policy, request, rng=random.Random(0), is_grpc=True)
    for attempt in range(1, 50):
        item = case.script[min(attempt - 1, len(case.script) - 1)]
        code_text, _, pushback = item.partition("p")
        code = int(code_text)
        if code == 0:
            return attempt, "OK"
        headers = Headers([("grpc-retry-pushback-ms", pushback)] if pushback else [])
        outcome = Outcome(status=200, grpc_status=code, headers=headers)
        if not isinstance(state.should_retry(outcome, budget_ok=True), Retry):
            return attempt, _CODES[code].name
    raise AssertionError("unbounded")


def test_grpc_core_retries_as_pymesh_predicts(
    backend: tuple[int, _Backend], python_exe: str
) -> None:
    port, state = backend
    rc = route_configuration()
    data = rc.SerializeToString()
    config = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, data).value
    assert isinstance(config, RouteConfiguration)
    with XdsTestServer() as server:
        server.set_resources(LDS, {TARGET: listener(route_pb2.RouteConfiguration.FromString(data))})
        server.set_resources(CDS, {CLUSTER: cluster()})
        server.set_resources(EDS, {CLUSTER: endpoints(port)})
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(server.bootstrap_dict())}
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
        mismatches = []
        try:
            for i, case in enumerate(CASES):
                call_id = f"call-{i}"
                extra = ";".join(f"{k}={v}" for k, v in case.metadata)
                core.stdin.write(f"{case.method}|{call_id}|{','.join(case.script)}|{extra}\n")
                core.stdin.flush()
                answer = core.stdout.readline().strip()
                with state.lock:
                    attempts = state.attempts.get(call_id, 0)
                want = _predict(config, case)
                if (attempts, answer) != want:
                    mismatches.append(f"{case}: grpc-core {(attempts, answer)} pymesh {want}")
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
        assert not mismatches, "\n".join(mismatches)


ADAPTER_GAPS = (
    # pymesh.grpc does not hand the trailing metadata to the attempt loop yet, so the
    # server's grpc-retry-pushback-ms is not seen (it retries anyway).
    Case("R1", ("14p-1", "0")),
    Case("R1", ("14pabc", "0")),
    # pymesh.grpc takes a DEADLINE_EXCEEDED sent by the server for the caller's own deadline
    # and ends the call instead of retrying it as grpc-core does.
    Case("R5", ("4",)),
)
"""Cases where ``pymesh.grpc`` (not the policy core) still differs from grpc-core; listed,
not hidden: the first test checks them against grpc-core, this list shrinks as the adapter
is fixed."""


def test_pymesh_grpc_channel_retries_as_grpc_core(backend: tuple[int, _Backend]) -> None:
    """End to end: the same cases through ``pymesh.grpc.insecure_channel`` (same resources
    over ADS, same backend) make the attempts and end with the status predicted above, which
    grpc-core matches (previous test) — except the listed :data:`ADAPTER_GAPS`."""
    import pymesh.grpc
    from pymesh.xds.client import XdsClient

    assert set(ADAPTER_GAPS) <= set(CASES)
    port, state = backend
    rc = route_configuration()
    data = rc.SerializeToString()
    config = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, data).value
    assert isinstance(config, RouteConfiguration)
    mismatches = []
    retried = 0
    with XdsTestServer() as server:
        server.set_resources(LDS, {TARGET: listener(route_pb2.RouteConfiguration.FromString(data))})
        server.set_resources(CDS, {CLUSTER: cluster()})
        server.set_resources(EDS, {CLUSTER: endpoints(port)})
        with XdsClient(server.bootstrap()) as xds:
            channel = pymesh.grpc.insecure_channel(f"xds:///{TARGET}", xds_client=xds)
            try:
                for i, case in enumerate(CASES):
                    if case in ADAPTER_GAPS:
                        continue
                    call_id = f"mesh-{i}-{random.random()}"
                    call = channel.unary_unary(f"/echo.Echo/{case.method}")
                    metadata = [("x-id", call_id), ("x-script", ",".join(case.script))]
                    metadata += list(case.metadata)
                    try:
                        call(b"hi", timeout=20, wait_for_ready=True, metadata=metadata)
                        answer = "OK"
                    except grpc.RpcError as exc:
                        answer = exc.code().name
                    with state.lock:
                        attempts = state.attempts.get(call_id, 0)
                    retried += attempts > 1
                    want = _predict(config, case)
                    if (attempts, answer) != want:
                        mismatches.append(f"{case}: pymesh.grpc {(attempts, answer)} want {want}")
            finally:
                channel.close()
    assert not mismatches, "\n".join(mismatches)
    assert retried >= 8
