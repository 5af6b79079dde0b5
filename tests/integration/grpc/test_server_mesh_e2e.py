"""Both halves proxyless: a ``pymesh.grpc`` channel (``xds:///``) calls a ``pymesh.grpc``
server, both configured by the embedded control plane from Istio YAML. The server enforces
its AuthorizationPolicy; the client sees the server's answers as a grpcio client would."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import pymesh.grpc
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.xds.client import XdsClient
from tests.integration.grpc.test_server_xds import SERVICE, echo_handlers

HOST = "echo.default.svc.cluster.local"


def mesh(port: int, deny: bool) -> str:
    text = f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: echo, namespace: default}}
        spec:
          hosts: [{HOST}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 7070, name: grpc, protocol: GRPC}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{grpc: {port}}}, labels: {{app: echo}}}}
        """
    if deny:
        text += f"""
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: deny-bad, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: echo}}}}
          action: DENY
          rules:
          - to: [{{operation: {{paths: ["/{SERVICE}/Other"]}}}}]
        """
    return textwrap.dedent(text)


def _client(cp: ControlPlane, labels: dict[str, str]) -> XdsClient:
    data = generate_bootstrap(xds_address=cp.address, namespace="default", labels=labels)
    return XdsClient(parse_bootstrap(json.dumps(data), source="test"))


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mesh"
    d.mkdir()
    return d


@pytest.fixture
def control_plane(mesh_dir: Path) -> Iterator[ControlPlane]:
    with ControlPlane([mesh_dir], xds_address="127.0.0.1:0", admin_port=None) as cp:
        yield cp


def _code(call: grpc.UnaryUnaryMultiCallable) -> tuple[grpc.StatusCode, str]:  # type: ignore[type-arg]
    try:
        call(b"x", timeout=10)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def test_pymesh_client_to_pymesh_server(mesh_dir: Path, control_plane: ControlPlane) -> None:
    server_xds = _client(control_plane, {"app": "echo"})
    client_xds = _client(control_plane, {"app": "client"})
    server = pymesh.grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), handlers=echo_handlers(), xds_client=server_xds
    )
    port = server.add_insecure_port("127.0.0.1:0")
    (mesh_dir / "mesh.yaml").write_text(mesh(port, deny=False))
    server.start()
    channel = pymesh.grpc.insecure_channel(f"xds:///{HOST}:7070", xds_client=client_xds)
    try:
        assert server.wait_for_serving(15), server.serving_status
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        other = channel.unary_unary(f"/{SERVICE}/Other")
        assert unary(b"hi", timeout=15) == b"echo:hi"
        assert other(b"hi", timeout=10) == b"echo:hi"
        # The AuthorizationPolicy reaches the server; the mesh client sees its answer.
        (mesh_dir / "mesh.yaml").write_text(mesh(port, deny=True))
        deadline = time.monotonic() + 15
        while _code(other)[0] is not grpc.StatusCode.PERMISSION_DENIED:
            assert time.monotonic() < deadline, "the policy never applied"
            time.sleep(0.05)
        assert _code(other) == (grpc.StatusCode.PERMISSION_DENIED, "RBAC: access denied")
        assert unary(b"again", timeout=10) == b"echo:again"
    finally:
        channel.close()
        server.stop(None).wait(5)
        client_xds.close()
        server_xds.close()
