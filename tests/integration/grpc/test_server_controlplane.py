"""``pymesh.grpc.server`` under the embedded control plane: Istio YAML in, enforced RPCs out.

The server's node (bootstrap from ``generate_bootstrap``, label ``app: echo``) fetches the
inbound listener istiod-style: PERMISSIVE by default (a TLS chain gRPC cannot match and a
plaintext ``raw_buffer`` chain), AuthorizationPolicies as RBAC filters (DENY, then ALLOW).
Editing the YAML changes what the running server enforces; STRICT mTLS without a certificate
provider makes it NOT_SERVING.
"""

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
from tests.integration.grpc.test_server_xds import SERVICE, StatusRecorder, echo_handlers

SERVICE_ENTRY = textwrap.dedent(
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: echo, namespace: default}
    spec:
      hosts: [echo.default.svc.cluster.local]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 7070, name: grpc, protocol: GRPC}]
      workloadSelector: {labels: {app: echo}}
    """
)

DENY_OTHER = textwrap.dedent(
    f"""
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

STRICT = textwrap.dedent(
    """
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: strict, namespace: default}
    spec:
      selector: {matchLabels: {app: echo}}
      mtls: {mode: STRICT}
    """
)


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mesh"
    d.mkdir()
    (d / "service.yaml").write_text(SERVICE_ENTRY)
    return d


@pytest.fixture
def control_plane(mesh_dir: Path) -> Iterator[ControlPlane]:
    with ControlPlane([mesh_dir], xds_address="127.0.0.1:0", admin_port=None) as cp:
        yield cp


def _code(channel: grpc.Channel, method: str) -> grpc.StatusCode:
    try:
        channel.unary_unary(f"/{SERVICE}/{method}")(b"x", timeout=5)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _until(channel: grpc.Channel, method: str, code: grpc.StatusCode) -> None:
    deadline = time.monotonic() + 15
    while _code(channel, method) is not code:
        assert time.monotonic() < deadline, f"{method} never gave {code}"
        time.sleep(0.05)


def test_authorization_policy_and_peer_authentication(
    mesh_dir: Path, control_plane: ControlPlane
) -> None:
    data = generate_bootstrap(
        xds_address=control_plane.address,
        namespace="default",
        labels={"app": "echo"},
        service_account="echo",
        ip="127.0.0.1",
    )
    client = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
    statuses = StatusRecorder()
    server = pymesh.grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        handlers=echo_handlers(),
        xds_serving_callback=statuses,
        xds_client=client,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        assert server.wait_for_serving(15), server.serving_status
        assert server.listener_name == f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{port}"
        # PERMISSIVE (no PeerAuthentication): the plaintext chain serves; no policy: all pass.
        assert _code(channel, "Unary") is grpc.StatusCode.OK
        assert _code(channel, "Other") is grpc.StatusCode.OK
        # A DENY AuthorizationPolicy reaches the running server.
        (mesh_dir / "deny.yaml").write_text(DENY_OTHER)
        _until(channel, "Other", grpc.StatusCode.PERMISSION_DENIED)
        assert _code(channel, "Unary") is grpc.StatusCode.OK
        # STRICT mTLS: this plaintext server has no certificate provider: NOT_SERVING.
        (mesh_dir / "strict.yaml").write_text(STRICT)
        status = statuses.wait_for(lambda s: not s.serving, timeout=15)
        assert "requires TLS" in status.message
        assert _code(channel, "Unary") is grpc.StatusCode.UNAVAILABLE
        # Back to PERMISSIVE: serving again, the DENY policy still enforced.
        (mesh_dir / "strict.yaml").unlink()
        statuses.wait_for(lambda s: s.serving, start=len(statuses.items) - 1, timeout=15)
        assert _code(channel, "Unary") is grpc.StatusCode.OK
        assert _code(channel, "Other") is grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()
        server.stop(None).wait(5)
        client.close()
