"""gRPC rotation under load, both sides at once: a client (``MeshChannelCredentials`` tunnel)
calls a server (dynamic credentials) without pause while both certificates are replaced
several times. The server ends connections after 0.5 s (``grpc.max_connection_age_ms``, with a
grace period) so that new handshakes pick up the new certificates, as a long-lived mesh would
over a certificate lifetime. No call may fail; every certificate each side was given must be
seen in use by the other side."""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from pymesh.controlplane import ControlPlane
from pymesh.controlplane.ca import CertificateAuthority
from pymesh.model.matcher import StringMatcher
from pymesh.security import (
    CaClientProvider,
    CertificateBundle,
    MeshChannelCredentials,
    SpiffeId,
    StaticProvider,
    server_credentials,
)
from tests.unit.security.pki_helpers import ca_bundle, spiffe

ROTATIONS = 4


def _serial(pem_or_der: bytes) -> int:
    if pem_or_der.startswith(b"-----"):
        return x509.load_pem_x509_certificate(pem_or_der).serial_number
    return x509.load_der_x509_certificate(pem_or_der).serial_number


@pytest.mark.parametrize("native", ["off", "auto"])
def test_both_sides_rotate_under_a_steady_stream(tmp_path: Path, native: str) -> None:
    """``off``: the tunnel (it records the server certificates it saw); ``auto``: grpcio's
    own TLS (pymesh-issued certificates), where the client cannot see the server's
    certificate, so the server's credential fetcher must have served the last one."""
    ca = CertificateAuthority(tmp_path / "ca")
    server_certs = StaticProvider(ca_bundle(ca, "default", "server"))
    client_certs = StaticProvider(ca_bundle(ca, "default", "client"))
    seen_clients: set[int] = set()

    def who(request: bytes, context: Any) -> bytes:
        pem = context.auth_context().get("x509_pem_cert", [b""])[0]
        seen_clients.add(_serial(pem))
        return b"ok"

    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        options=[("grpc.max_connection_age_ms", 500), ("grpc.max_connection_age_grace_ms", 5000)],
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.W", {"A": grpc.unary_unary_rpc_method_handler(who)}
            ),
        )
    )
    server_creds = server_credentials(server_certs)
    port = server.add_secure_port("127.0.0.1:0", server_creds)
    server.start()
    creds = MeshChannelCredentials(
        client_certs,
        expected_sans=[StringMatcher.exact(spiffe("default", "server"))],
        native=native,
    )
    channel = creds.open_subchannel(f"127.0.0.1:{port}", [], None, None)
    assert creds.stats["native_endpoints"] == (native == "auto")
    call = channel.unary_unary("/t.W/A")
    given_server = {_serial(server_certs.current().chain_pem)}
    given_client = {_serial(client_certs.current().chain_pem)}
    failures: list[str] = []
    calls = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                call(b"x", timeout=10)
                calls += 1
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    worker = threading.Thread(target=load)
    worker.start()
    try:
        for _ in range(ROTATIONS):
            time.sleep(0.8)
            server_certs.update(ca_bundle(ca, "default", "server"))
            client_certs.update(ca_bundle(ca, "default", "client"))
            given_server.add(_serial(server_certs.current().chain_pem))
            given_client.add(_serial(client_certs.current().chain_pem))
        time.sleep(1.2)  # the last certificates get into use
    finally:
        stop.set()
        worker.join(15)
        channel.close()
        tunnel_seen = {_serial(d) for t in creds.tunnels for d in t.peer_certificates}
        creds.close()
        server.stop(0).wait(5)
    assert failures == [], failures[:3]
    assert calls > 100
    assert given_client <= seen_clients, (len(given_client), len(seen_clients))
    if native == "off":
        assert given_server <= tunnel_seen, (len(given_server), len(tunnel_seen))
    else:
        assert not creds.tunnels
        assert creds.stats["native_channels"] == ROTATIONS + 1
        fetcher = server_creds._pymesh_fetcher  # type: ignore[attr-defined]
        assert fetcher.served_version == server_certs.current().version
    assert len(given_server) == len(given_client) == ROTATIONS + 1


SOAK = float(os.environ.get("PYMESH_GRPC_SOAK", "300"))  # seconds; shorter for a dev run
TTL = 60.0


@pytest.mark.slow
@pytest.mark.timeout(SOAK + 120)
@pytest.mark.parametrize("native", ["off", "auto"])
def test_grpc_rotation_soak_with_the_ca(tmp_path: Path, native: str) -> None:
    """The issue's soak for gRPC: 1-minute certificates from the control plane's CA, renewed
    by both workloads (``CaClientProvider``) while the client calls for 5 minutes; connections
    end every 2 s (``max_connection_age``). Zero failed calls; every certificate either side
    held for a few seconds is seen in use by the other side. Both client paths: the tunnel
    (which records the server certificates it saw) and grpcio's own TLS (where a server
    certificate counts as used once the server's credential fetcher served it: the client
    cannot see it, but the handshakes that follow succeed on it)."""
    server_id = SpiffeId("cluster.local", "default", "server")
    client_id = SpiffeId("cluster.local", "default", "client")
    (tmp_path / "config").mkdir()
    ca = CertificateAuthority(tmp_path / "ca")
    published: dict[str, list[tuple[float, int]]] = {"server": [], "client": []}
    lock = threading.Lock()
    seen_clients: set[int] = set()

    def who(request: bytes, context: Any) -> bytes:
        pem = context.auth_context().get("x509_pem_cert", [b""])[0]
        seen_clients.add(_serial(pem))
        return b"ok"

    with ControlPlane(tmp_path / "config", xds_address="127.0.0.1:0", admin_port=None, ca=ca) as cp:
        providers = {}
        for name, ident in (("server", server_id), ("client", client_id)):
            p = CaClientProvider(
                cp.address,
                ident,
                token=ca.create_token(ident.namespace, ident.service_account),
                ttl=TTL,
            )

            def record(bundle: CertificateBundle, name: str = name) -> None:
                with lock:
                    published[name].append((time.monotonic(), _serial(bundle.chain_pem)))

            p.subscribe(record)
            first = p.wait_ready(30)
            with lock:
                published[name].insert(0, (time.monotonic(), _serial(first.chain_pem)))
            providers[name] = p
        server = grpc.server(
            futures.ThreadPoolExecutor(4),
            options=[
                ("grpc.max_connection_age_ms", 2000),
                ("grpc.max_connection_age_grace_ms", 10000),
            ],
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "t.W", {"A": grpc.unary_unary_rpc_method_handler(who)}
                ),
            )
        )
        server_creds = server_credentials(providers["server"])
        fetcher = server_creds._pymesh_fetcher  # type: ignore[attr-defined]
        port = server.add_secure_port("127.0.0.1:0", server_creds)
        server.start()
        creds = MeshChannelCredentials(
            providers["client"], expected_sans=[StringMatcher.exact(server_id.uri)], native=native
        )
        channel = creds.open_subchannel(f"127.0.0.1:{port}", [], None, None)
        assert creds.stats["native_endpoints"] == (native == "auto")
        call = channel.unary_unary("/t.W/A")
        failures: list[str] = []
        seen_servers: set[int] = set()
        calls = 0
        try:
            end = time.monotonic() + SOAK
            while time.monotonic() < end:
                try:
                    call(b"x", timeout=10)
                    calls += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")
                if native == "off":
                    seen_servers.update(
                        _serial(d) for d in list(creds.tunnels[0].peer_certificates)
                    )
                else:
                    served = providers["server"].current()
                    if fetcher.served_version == served.version:
                        seen_servers.add(_serial(served.chain_pem))
                time.sleep(0.02)
            stop = time.monotonic()
        finally:
            channel.close()
            creds.close()
            server.stop(0).wait(5)
            for p in providers.values():
                p.close()
    print(
        f"\ngrpc soak ({native}): {calls} calls, {len(failures)} failed, client certs used "
        f"{len(seen_clients)}, server certs used {len(seen_servers)}"
    )
    assert failures == [], failures[:3]
    for name, seen in (("client", seen_clients), ("server", seen_servers)):
        issued = [s for t, s in published[name] if t < stop - 5.0]
        # renewal at about half the lifetime: ~10 certificates in 5 minutes
        assert len(set(issued)) >= max(2, int(SOAK / TTL * 1.2)), (name, issued)
        assert set(issued) <= seen, (name, set(issued) - seen)
    assert calls > SOAK * 10
