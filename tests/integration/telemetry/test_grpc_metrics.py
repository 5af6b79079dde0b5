"""Istio's request metrics for gRPC, both reporters: a pymesh channel (``xds:///``) calls a
pymesh server (sync, then grpc.aio), both under the embedded control plane from Istio YAML;
the server's AuthorizationPolicy denies one method. Scraped from the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import pymesh.grpc
import pymesh.grpc.aio
from pymesh import telemetry
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.xds.client import XdsClient
from tests.integration.grpc.test_server_xds import SERVICE, echo_handlers
from tests.integration.telemetry.conftest import parse_prometheus, scrape, value

HOST = "echo.default.svc.cluster.local"


def _yaml(port: int) -> str:
    return textwrap.dedent(
        f"""
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
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: deny-other, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: echo}}}}
          action: DENY
          rules:
          - to: [{{operation: {{paths: ["/{SERVICE}/Other"]}}}}]
        """
    )


def _xds(cp: ControlPlane, workload: str, labels: dict[str, str]) -> XdsClient:
    data = generate_bootstrap(
        xds_address=cp.address, namespace="default", workload=workload, labels=labels
    )
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


def _deny(call: Callable[[], Any]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            call()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                return
        assert time.monotonic() < deadline, "the policy never applied"
        time.sleep(0.05)


def test_grpc_sync_client_and_server_reporters(
    mesh_dir: Path, control_plane: ControlPlane, installed: Callable[..., telemetry.Telemetry]
) -> None:
    server_xds = _xds(control_plane, "echo-v1", {"app": "echo", "version": "v1"})
    client_xds = _xds(control_plane, "client-v1", {"app": "client", "version": "v1"})
    server = pymesh.grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), handlers=echo_handlers(), xds_client=server_xds
    )
    port = server.add_insecure_port("127.0.0.1:0")
    (mesh_dir / "mesh.yaml").write_text(_yaml(port))
    server.start()
    channel = pymesh.grpc.insecure_channel(f"xds:///{HOST}:7070", xds_client=client_xds)
    try:
        assert server.wait_for_serving(15), server.serving_status
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        other = channel.unary_unary(f"/{SERVICE}/Other")
        assert unary(b"hi", timeout=15) == b"echo:hi"  # config warmed up before counting
        _deny(lambda: other(b"hi", timeout=10))
        # One process plays both workloads but has one Telemetry at a time: first with the
        # client's node (its source_* labels), then with the server's (destination_*).
        tel = installed(node=client_xds.bootstrap.node)
        for _ in range(3):
            assert unary(b"hi", timeout=10) == b"echo:hi"
        with pytest.raises(grpc.RpcError):
            other(b"hi", timeout=10)
        samples_client = parse_prometheus(tel.prometheus_text())
        tel.close()
        tel2 = installed(node=server_xds.bootstrap.node)
        server_url = tel2.serve_prometheus(port=0).url
        for _ in range(3):
            assert unary(b"hi", timeout=10) == b"echo:hi"
        with pytest.raises(grpc.RpcError):
            other(b"hi", timeout=10)
        samples_server = scrape(server_url)
    finally:
        channel.close()
        server.stop(None).wait(5)
        client_xds.close()
        server_xds.close()
    # client-side labels from the client's telemetry, server-side from the server's
    client_only = [s for s in samples_client if s[1].get("reporter") == "source"]
    server_only = [s for s in samples_server if s[1].get("reporter") == "destination"]
    assert value(client_only, "istio_requests_total", grpc_response_status="0") == 3

    _check_side(client_only, "source", "client-v1", "client")
    _check_side(server_only, "destination", "echo-v1", "echo")
    assert value(server_only, "istio_request_bytes_sum", grpc_response_status="0") == 2 * 3
    assert value(server_only, "istio_response_bytes_sum", grpc_response_status="0") == 7 * 3
    assert value(client_only, "istio_request_bytes_sum", grpc_response_status="0") == 2 * 3


def _check_side(
    samples: list[Any], reporter: str, workload: str, app: str, service: str = HOST
) -> None:
    local = "source" if reporter == "source" else "destination"
    labels = {
        "reporter": reporter,
        f"{local}_workload": workload,
        f"{local}_app": app,
        f"{local}_version": "v1",
        f"{local}_workload_namespace": "default",
        "request_protocol": "grpc",
        "response_code": "200",
        "response_flags": "-",
    }
    if reporter == "source":
        labels |= {
            "destination_service": HOST,
            "destination_service_name": "echo",
            "destination_service_namespace": "default",
            "connection_security_policy": "unknown",
        }
        # from the server's metadata exchange answer: one process plays both workloads,
        # so the pymesh server answers with the installed telemetry's node (the client's);
        # an upstream error status comes back without the endpoint (unknown there)
        ok = {**labels, "grpc_response_status": "0"}
        assert value(samples, "istio_requests_total", **ok, destination_app="client",
                     destination_workload="client-v1", destination_canonical_service="client",
                     destination_canonical_revision="v1",
                     destination_workload_namespace="default") == 3  # fmt: skip
    else:
        labels |= {
            "source_principal": "unknown",
            "connection_security_policy": "none",
            # the :authority the mesh channel sends (grpc.aio servers do not expose it:
            # there the server's own canonical service and namespace stand in)
            "destination_service": service,
            "destination_service_name": "echo",
            "destination_service_namespace": "default",
        }
    assert value(samples, "istio_requests_total", **labels, grpc_response_status="0") == 3
    assert value(samples, "istio_requests_total", **labels, grpc_response_status="7") == 1
    for name in ("istio_request_messages_total", "istio_response_messages_total"):
        assert value(samples, name, **labels, grpc_response_status="0") == 3
    assert (
        value(samples, "istio_request_duration_milliseconds_count", **labels,
              grpc_response_status="0") == 3
    )  # fmt: skip


def test_grpc_aio_client_and_server_reporters(
    mesh_dir: Path, control_plane: ControlPlane, installed: Callable[..., telemetry.Telemetry]
) -> None:
    server_xds = _xds(control_plane, "echo-v1", {"app": "echo", "version": "v1"})
    client_xds = _xds(control_plane, "client-v1", {"app": "client", "version": "v1"})

    async def main() -> list[Any]:
        server = pymesh.grpc.aio.server(handlers=echo_handlers(), xds_client=server_xds)
        port = server.add_insecure_port("127.0.0.1:0")
        (mesh_dir / "mesh.yaml").write_text(_yaml(port))
        await server.start()
        channel = pymesh.grpc.aio.insecure_channel(f"xds:///{HOST}:7070", xds_client=client_xds)
        try:
            assert await server.wait_for_serving(15)
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            other = channel.unary_unary(f"/{SERVICE}/Other")
            assert await unary(b"hi", timeout=15) == b"echo:hi"
            deadline = time.monotonic() + 15
            while True:
                try:
                    await other(b"hi", timeout=10)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                        break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            tel = installed(node=server_xds.bootstrap.node)
            for _ in range(3):
                assert await unary(b"hi", timeout=10) == b"echo:hi"
            with pytest.raises(grpc.RpcError):
                await other(b"hi", timeout=10)
            await asyncio.sleep(0.1)  # the server side records after the response went out
            return parse_prometheus(tel.prometheus_text())
        finally:
            await channel.close()
            await server.stop(None)

    try:
        samples = asyncio.run(main())
    finally:
        client_xds.close()
        server_xds.close()
    server_only = [s for s in samples if s[1].get("reporter") == "destination"]
    _check_side(server_only, "destination", "echo-v1", "echo", service="unknown")
    client_side = [s for s in samples if s[1].get("reporter") == "source"]
    assert value(client_side, "istio_requests_total", grpc_response_status="0") == 3
    assert value(client_side, "istio_requests_total", grpc_response_status="7") == 1
    assert {s[1]["destination_service"] for s in client_side} == {HOST}
    assert {s[1]["source_workload"] for s in client_side} == {"echo-v1"}  # one process
