"""PERMISSIVE on one gRPC port (``add_permissive_port``): a pymesh front listener peeks at
each connection's first byte and hands TLS and plaintext to two internal grpcio ports.

Under the embedded control plane (Istio YAML): one port serves a plaintext client and an
mTLS client; the mTLS client's SPIFFE identity reaches RBAC (principals) and both clients'
real addresses do too (ipBlocks, told apart by IPv4 vs IPv6 loopback while the internal
hop is always 127.0.0.1); STRICT makes the front refuse plaintext connections, DISABLE TLS
ones; sync and aio.
"""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import pymesh.grpc
import pymesh.grpc.aio
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.controlplane.ca import CertificateAuthority
from pymesh.grpc._server import mesh_server_credentials
from pymesh.model.matcher import StringMatcher
from pymesh.security import CertificateBundle, MeshChannelCredentials, StaticProvider
from pymesh.xds.client import XdsClient
from tests.integration.grpc.test_server_xds import SERVICE, echo_handlers
from tests.unit.security.pki_helpers import ca_bundle, spiffe

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
# Other: only the mTLS principal "client"; Unary: anyone but from 127.0.0.1 (IPv4 loopback).
POLICY = textwrap.dedent(
    f"""
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: echo, namespace: default}}
    spec:
      selector: {{matchLabels: {{app: echo}}}}
      action: DENY
      rules:
      - from: [{{source: {{notPrincipals: ["cluster.local/ns/default/sa/client"]}}}}]
        to: [{{operation: {{paths: ["/{SERVICE}/Other"]}}}}]
      - from: [{{source: {{ipBlocks: ["127.0.0.1/32"]}}}}]
        to: [{{operation: {{paths: ["/{SERVICE}/Unary"]}}}}]
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
ECHO = spiffe("default", "echo")
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
OPTS = [("grpc.use_local_subchannel_pool", 1)]


def _write(bundle: CertificateBundle, directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "cert-chain.pem").write_bytes(bundle.chain_pem)
    (directory / "key.pem").write_bytes(bundle.key_pem)
    (directory / "root-cert.pem").write_bytes(bundle.roots_pem)
    return directory


class Mesh:
    def __init__(self, tmp: Path, cp: ControlPlane, ca: CertificateAuthority) -> None:
        self.dir = tmp / "mesh"
        self.ca = ca
        certs = _write(ca_bundle(ca, "default", "echo"), tmp / "certs")
        data = generate_bootstrap(
            xds_address=cp.address,
            namespace="default",
            labels={"app": "echo"},
            service_account="echo",
            cert_dir=str(certs),
        )
        self.client = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
        self.tls = MeshChannelCredentials(
            StaticProvider(ca_bundle(ca, "default", "client")),
            expected_sans=[StringMatcher.exact(ECHO)],
        )

    def close(self) -> None:
        self.tls.close()
        self.client.close()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    d = tmp_path / "mesh"
    d.mkdir()
    (d / "service.yaml").write_text(SERVICE_ENTRY)
    (d / "policy.yaml").write_text(POLICY)
    ca = CertificateAuthority(tmp_path / "ca")
    with ControlPlane([d], xds_address="127.0.0.1:0", admin_port=None, ca=False) as cp:
        m = Mesh(tmp_path, cp, ca)
        yield m
        m.close()


def _code(channel: Any, method: str) -> grpc.StatusCode:
    try:
        channel.unary_unary(f"/{SERVICE}/{method}")(b"x", timeout=5)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return OK


def _until(channel: Any, method: str, code: grpc.StatusCode) -> None:
    deadline = time.monotonic() + 15
    while (got := _code(channel, method)) is not code:
        assert time.monotonic() < deadline, f"{method} gave {got}, never {code}"
        time.sleep(0.05)


def test_one_port_plaintext_and_mtls_rbac_and_strict(mesh: Mesh) -> None:
    server = pymesh.grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), handlers=echo_handlers(), xds_client=mesh.client
    )
    port = server.add_permissive_port("[::]:0", mesh_server_credentials(xds_client=mesh.client))
    server.start()
    plain4 = grpc.insecure_channel(f"127.0.0.1:{port}", OPTS)
    plain6 = grpc.insecure_channel(f"[::1]:{port}", OPTS)
    mtls4 = mesh.tls.open_subchannel(f"127.0.0.1:{port}", OPTS, None, None)
    try:
        assert server.wait_for_serving(15), server.serving_status
        # PERMISSIVE (the default): both transports on the one port.
        _until(plain6, "Unary", OK)
        # RBAC sees the mTLS client's SPIFFE identity and the plaintext client has none.
        assert _code(mtls4, "Other") is OK
        assert _code(plain6, "Other") is DENIED
        # ... and every client's own address, not the front's internal 127.0.0.1 hop.
        assert _code(plain4, "Unary") is DENIED
        assert _code(mtls4, "Unary") is DENIED
        front = server._core._front
        assert front.stats.tls >= 1 and front.stats.plaintext >= 2
        # STRICT: a plaintext connection already open gets UNAVAILABLE per RPC (its filter
        # chain demands TLS); a new plaintext connection is closed by the front at once.
        (mesh.dir / "strict.yaml").write_text(STRICT)
        _until(plain6, "Unary", grpc.StatusCode.UNAVAILABLE)
        refused = front.stats.refused
        fresh = grpc.insecure_channel(f"[::1]:{port}", OPTS)
        try:
            assert _code(fresh, "Unary") is grpc.StatusCode.UNAVAILABLE
        finally:
            fresh.close()
        assert front.stats.refused > refused
        assert _code(mtls4, "Other") is OK
        # DISABLE: plaintext served again; a new TLS connection is closed by the front.
        (mesh.dir / "strict.yaml").write_text(STRICT.replace("STRICT", "DISABLE"))
        _until(plain6, "Unary", OK)
        refused = front.stats.refused
        late = mesh.tls.open_subchannel(f"127.0.0.1:{port}", OPTS, None, None)
        try:
            assert _code(late, "Other") is grpc.StatusCode.UNAVAILABLE
        finally:
            late.close()
        assert front.stats.refused > refused
    finally:
        for ch in (plain4, plain6, mtls4):
            ch.close()
        server.stop(None).wait(5)
    deadline = time.monotonic() + 5
    while front.stats.active:
        assert time.monotonic() < deadline, "the front kept connections after the stop"
        time.sleep(0.02)


def test_aio_server_permissive_port(mesh: Mesh) -> None:
    async def main() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        server = pymesh.grpc.aio.server(handlers=echo_handlers(), xds_client=mesh.client)
        port = server.add_permissive_port(
            "127.0.0.1:0", mesh_server_credentials(xds_client=mesh.client)
        )
        await server.start()
        plain = grpc.aio.insecure_channel(f"127.0.0.1:{port}", OPTS)
        mtls = mesh.tls.open_aio_subchannel(f"127.0.0.1:{port}", OPTS, None, None, None)

        async def code(ch: grpc.aio.Channel, method: str) -> grpc.StatusCode:
            try:
                await ch.unary_unary(f"/{SERVICE}/{method}")(b"x", timeout=5)
            except grpc.aio.AioRpcError as e:
                return e.code()
            return OK

        try:
            assert await server.wait_for_serving(15)
            return await code(mtls, "Other"), await code(plain, "Other")
        finally:
            await plain.close()
            await mtls.close()
            await server.stop(None)

    mtls_other, plain_other = asyncio.run(main())
    assert (mtls_other, plain_other) == (OK, DENIED)


def test_graceful_stop_lets_rpcs_through_the_front_finish(mesh: Mesh) -> None:
    release = threading.Event()

    def slow(request: bytes, context: Any) -> bytes:
        release.wait(5)
        return b"done"

    handlers = [
        grpc.method_handlers_generic_handler(
            "t.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)}
        )
    ]
    server = pymesh.grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), handlers=handlers, xds_client=mesh.client
    )
    port = server.add_permissive_port(
        "127.0.0.1:0", mesh_server_credentials(xds_client=mesh.client)
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", OPTS)
    try:
        assert server.wait_for_serving(15)
        future = channel.unary_unary("/t.Slow/Call").future(b"x", timeout=10)
        time.sleep(0.3)  # the RPC is running in the handler
        stopped = server.stop(grace=5)
        with pytest.raises(OSError):  # no new connections on the port
            socket.create_connection(("127.0.0.1", port), timeout=1).recv(1)
        release.set()
        assert future.result(timeout=10) == b"done"  # the RPC in flight finished
        assert stopped.wait(10)
    finally:
        release.set()
        channel.close()
        server.stop(None).wait(5)
