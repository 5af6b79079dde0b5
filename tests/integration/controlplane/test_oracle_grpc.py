"""Oracle: grpcio's own C-core xDS client routes real RPCs through the control plane's config.

Two real gRPC servers on loopback are the endpoints of one ServiceEntry; a DestinationRule
makes subsets v1/v2 and a VirtualService splits 80/20. A subprocess (GRPC_XDS_BOOTSTRAP set
before grpc starts) calls ``xds:///echo.default.svc.cluster.local:7070`` 1,000 times; the
measured split must be within 5 points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from pymesh.bootstrap import generate_bootstrap
from pymesh.controlplane import ControlPlane
from tests.integration.controlplane._helpers import (
    EDS,
    LDS,
    RawAds,
    http_get,
    make_node,
    syncz,
    wait_for,
)

HOST = "echo.default.svc.cluster.local"
PORT = 7070
CALLS = 1000

CLIENT = textwrap.dedent(
    """
    import collections, json, sys
    import grpc
    target, calls = sys.argv[1], int(sys.argv[2])
    channel = grpc.insecure_channel(target)
    call = channel.unary_unary("/echo.Echo/Who", request_serializer=None,
                               response_deserializer=None)
    seen = collections.Counter()
    for _ in range(calls):
        seen[call(b"hi", timeout=20).decode()] += 1
    channel.close()
    print(json.dumps(seen))
    """
)


def _echo_server(answer: bytes) -> tuple[grpc.Server, int]:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        del request, context
        return answer

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def backends() -> Iterator[dict[str, int]]:
    servers = {v: _echo_server(v.encode()) for v in ("v1", "v2")}
    yield {v: port for v, (_, port) in servers.items()}
    for server, _ in servers.values():
        server.stop(grace=None).wait(5)


def mesh_yaml(ports: dict[str, int], v1_weight: int) -> str:
    return textwrap.dedent(
        f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: echo, namespace: default}}
        spec:
          hosts: [{HOST}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: {PORT}, name: grpc, protocol: GRPC}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{grpc: {ports["v1"]}}}, labels: {{version: v1}}}}
          - {{address: 127.0.0.1, ports: {{grpc: {ports["v2"]}}}, labels: {{version: v2}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: echo, namespace: default}}
        spec:
          host: {HOST}
          subsets:
          - {{name: v1, labels: {{version: v1}}}}
          - {{name: v2, labels: {{version: v2}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: echo, namespace: default}}
        spec:
          hosts: [{HOST}]
          http:
          - route:
            - destination: {{host: {HOST}, subset: v1}}
              weight: {v1_weight}
            - destination: {{host: {HOST}, subset: v2}}
              weight: {100 - v1_weight}
        """
    )


INTERACTIVE_CLIENT = textwrap.dedent(
    """
    import collections, json, sys
    import grpc
    channel = grpc.insecure_channel(sys.argv[1])
    call = channel.unary_unary("/echo.Echo/Who", request_serializer=None,
                               response_deserializer=None)
    for line in sys.stdin:  # one number of calls per line; answers one JSON line each
        seen = collections.Counter()
        for _ in range(int(line)):
            seen[call(b"hi", timeout=20).decode()] += 1
        print(json.dumps(seen), flush=True)
    channel.close()
    """
)


def test_grpc_xds_client_weighted_split_and_push(tmp_path: Path, backends: dict[str, int]) -> None:
    config = tmp_path / "mesh"
    config.mkdir()
    (config / "echo.yaml").write_text(mesh_yaml(backends, 80))
    with ControlPlane([config], xds_address="127.0.0.1:0", admin_port=0) as cp:
        bootstrap = generate_bootstrap(
            xds_address=cp.address, namespace="default", labels={"app": "client"}
        )
        path = tmp_path / "bootstrap.json"
        path.write_text(json.dumps(bootstrap))
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(path)}
        env.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
        proc = subprocess.Popen(
            [sys.executable, "-c", INTERACTIVE_CLIENT, f"xds:///{HOST}:{PORT}"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None

        def calls(n: int) -> dict[str, int]:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{n}\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:] if proc.stderr else "client died"
            seen: dict[str, int] = json.loads(line)
            return seen

        try:
            seen = calls(CALLS)
            assert sum(seen.values()) == CALLS
            assert abs(100.0 * seen.get("v1", 0) / CALLS - 80) <= 5, seen
            # The split flips while the client runs: the push reaches grpcio's client.
            (config / "echo.yaml").write_text(mesh_yaml(backends, 20))
            deadline = time.monotonic() + 15
            while calls(50).get("v2", 0) < 30:
                assert time.monotonic() < deadline, "the new split was not pushed"
            seen = calls(CALLS)
            assert abs(100.0 * seen.get("v1", 0) / CALLS - 20) <= 5, seen
            # The client ACKed everything and NACKed nothing.
            (status,) = [s for s in syncz(cp.admin_url) if s["generator"] == "grpc"]
            for name, t in status["types"].items():
                assert t["last_nack"] is None, (name, t)
            assert cp.call(lambda: cp.hub.metrics.total("pilot_total_xds_rejects")) == 0
        finally:
            proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


REGISTERED_MESH = textwrap.dedent(
    f"""
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: echo, namespace: default}}
    spec:
      hosts: [{HOST}]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{{number: {PORT}, name: grpc, protocol: GRPC}}]
      workloadSelector: {{labels: {{app: echo}}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: WorkloadGroup
    metadata: {{name: echo, namespace: default}}
    spec:
      metadata: {{labels: {{app: echo}}}}
      template: {{ports: {{grpc: 1}}, serviceAccount: echo}}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: echo, namespace: default}}
    spec:
      host: {HOST}
      subsets:
      - {{name: v1, labels: {{version: v1}}}}
      - {{name: v2, labels: {{version: v2}}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: echo, namespace: default}}
    spec:
      hosts: [{HOST}]
      http:
      - route:
        - destination: {{host: {HOST}, subset: v1}}
          weight: 80
        - destination: {{host: {HOST}, subset: v2}}
          weight: 20
    """
)


def eds_ports(resp: object) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for a in resp.resources:  # type: ignore[attr-defined]
        cla = endpoint_pb2.ClusterLoadAssignment()
        a.Unpack(cla)
        out[cla.cluster_name] = [
            ep.endpoint.address.socket_address.port_value
            for loc in cla.endpoints
            for ep in loc.lb_endpoints
        ]
    return out


def _run_client(tmp_path: Path, address: str) -> dict[str, int]:
    bootstrap = generate_bootstrap(xds_address=address, namespace="default")
    path = tmp_path / "client-bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(path)}
    env.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, f"xds:///{HOST}:{PORT}", str(CALLS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return seen


def test_grpc_xds_client_with_auto_registered_endpoints(
    tmp_path: Path, backends: dict[str, int]
) -> None:
    config = tmp_path / "mesh"
    config.mkdir()
    (config / "echo.yaml").write_text(REGISTERED_MESH)
    with ControlPlane(
        [config], xds_address="127.0.0.1:0", admin_port=0, registration_grace=0.5
    ) as cp:
        streams = {}
        try:
            for version, port in backends.items():
                node = make_node(
                    f"sidecar~127.0.0.1~echo-{version}.default~default.svc.cluster.local",
                    GENERATOR="grpc",
                    NAMESPACE="default",
                    LABELS={"app": "echo", "version": version},
                    INSTANCE_IPS="127.0.0.1",
                    POD_PORTS=json.dumps([{"name": "grpc", "containerPort": port}]),
                )
                stream = RawAds(cp.address)
                stream.send(
                    node=node,
                    type_url=LDS,
                    resource_names=[f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{port}"],
                )
                stream.recv()
                streams[version] = stream

            def workloads() -> list[dict[str, object]]:
                body = http_get(cp.admin_url + "/debug/configz")[1]
                out: list[dict[str, object]] = json.loads(body)["workloads"]
                return out

            wait_for(lambda: len(workloads()) == 2)
            seen = _run_client(tmp_path, cp.address)
            assert sum(seen.values()) == CALLS
            assert abs(100.0 * seen.get("v1", 0) / CALLS - 80) <= 5, seen

            # v2 goes away: after the grace period its endpoint is gone from EDS.
            watcher = RawAds(cp.address)
            streams["watcher"] = watcher
            watched = [f"outbound|{PORT}|v1|{HOST}", f"outbound|{PORT}|v2|{HOST}"]
            watcher.send(
                node=make_node("watcher", GENERATOR="grpc", NAMESPACE="default"),
                type_url=EDS,
                resource_names=watched,
            )
            resp = watcher.recv()
            assert eds_ports(resp) == {
                f"outbound|{PORT}|v1|{HOST}": [backends["v1"]],
                f"outbound|{PORT}|v2|{HOST}": [backends["v2"]],
            }
            watcher.ack(resp, resource_names=watched)
            streams.pop("v2").close()
            closed_at = time.monotonic()
            resp = watcher.recv(timeout=5)
            assert time.monotonic() - closed_at >= 0.45  # not before the grace period
            assert eds_ports(resp) == {
                f"outbound|{PORT}|v1|{HOST}": [backends["v1"]],
                f"outbound|{PORT}|v2|{HOST}": [],
            }
            assert [w["name"] for w in workloads()] == [f"echo-127.0.0.1-{backends['v1']}"]
        finally:
            for stream in streams.values():
                stream.close()
