"""gRPC clients on grpcio's own TLS for pymesh-issued server certificates (the native path of
``MeshChannelCredentials``): the CA's derived DNS SAN, the per-endpoint probe, the attacks
refused by grpcio's handshake itself (counted), the fallback to the tunnel for certificates
without the derived name, and client-certificate rotation with a call in flight."""

from __future__ import annotations

import asyncio
import datetime
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509

from pymesh.controlplane.ca import CaRefused, CertificateAuthority
from pymesh.model.matcher import StringMatcher
from pymesh.security import (
    CertificateBundle,
    MeshChannelCredentials,
    SpiffeId,
    StaticProvider,
    generate_key,
    server_credentials,
)
from pymesh.security._pki import PrivateKey, cert_pem, issue_cert, key_from_pem, key_pem
from pymesh.security._spiffe import SPIFFE_DNS_SUFFIX, spiffe_dns_name
from tests.unit.security.pki_helpers import ca_bundle, new_root, raw_bundle, spiffe

SERVER = spiffe("default", "server")
CLIENT = spiffe("default", "client")
OPTS = [("grpc.use_local_subchannel_pool", 1)]


class Server:
    """A grpcio mTLS server: ``Am`` answers the client's SPIFFE ID, ``Slow`` waits for
    ``release`` first."""

    def __init__(self, bundle: CertificateBundle, port: int = 0) -> None:
        self.provider = StaticProvider(bundle)
        self.release = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))

        def whoami(request: bytes, context: Any) -> bytes:
            sans = context.auth_context().get("x509_subject_alternative_name", [])
            return b",".join(s for s in sans if s.startswith(b"spiffe://"))

        def slow(request: bytes, context: Any) -> bytes:
            self.release.wait(10)
            return whoami(request, context)

        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "t.Who",
                    {
                        "Am": grpc.unary_unary_rpc_method_handler(whoami),
                        "Slow": grpc.unary_unary_rpc_method_handler(slow),
                    },
                ),
            )
        )
        self.port = self.server.add_secure_port(
            f"127.0.0.1:{port}", server_credentials(self.provider)
        )
        self.server.start()

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.release.set()
        self.server.stop(0).wait(5)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


@pytest.fixture
def server(ca: CertificateAuthority) -> Iterator[Server]:
    s = Server(ca_bundle(ca, "default", "server"))
    yield s
    s.stop()


def _creds(ca: CertificateAuthority, expected: str, **kw: Any) -> MeshChannelCredentials:
    return MeshChannelCredentials(
        StaticProvider(ca_bundle(ca, "default", "client")),
        expected_sans=[StringMatcher.exact(expected)],
        **kw,
    )


def _call(creds: MeshChannelCredentials, key: str, method: str = "Am") -> bytes:
    channel = creds.open_subchannel(key, OPTS, None, None)
    try:
        return channel.unary_unary(f"/t.Who/{method}")(b"", timeout=5)  # type: ignore[no-any-return]
    finally:
        channel.close()


def _leaf(
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    uri: str,
    dns: str,
    *,
    trust: bytes,
    expired: bool = False,
) -> CertificateBundle:
    """A leaf with the URI SAN and the DNS SAN ``dns`` (as the pymesh CA would issue it)."""
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(hours=3 if expired else 0, minutes=1)
    key = generate_key()
    leaf = issue_cert(
        key.public_key(),
        uri,
        issuer=issuer,
        issuer_key=issuer_key,
        not_before=start,
        not_after=start + datetime.timedelta(hours=1),
        dns_names=(dns,),
    )
    return CertificateBundle.from_pem(cert_pem(leaf), key_pem(key), trust)


# ----------------------------------------------------------------------------- the name


def test_ca_adds_the_derived_dns_san_from_the_checked_identity(
    ca: CertificateAuthority,
) -> None:
    bundle = ca_bundle(ca, "default", "server")
    leaf = x509.load_pem_x509_certificate(bundle.chain_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SERVER]
    assert san.get_values_for_type(x509.DNSName) == [spiffe_dns_name(SERVER)]
    assert bundle.identity == SERVER
    # a pure function of the ID: stable, distinct per identity, valid DNS label lengths
    name = SpiffeId.parse(SERVER).dns_name
    assert name == spiffe_dns_name(SERVER) != spiffe_dns_name(CLIENT)
    label, _, zone = name.partition(".")
    assert zone == SPIFFE_DNS_SUFFIX and len(label) == 32 and label.isalnum()
    assert label == label.lower() and len(name) <= 253
    # the CSR cannot bring a DNS SAN of its own (the CA derives it; it never copies one)
    from tests.unit.security.test_authority import _bearer, _csr

    with pytest.raises(CaRefused):
        ca.create_certificate(
            _csr(SERVER, extra_dns=spiffe_dns_name(CLIENT)), 600, _bearer(ca, "default", "server")
        )


# ----------------------------------------------------------------------------- path choice


def test_native_path_taken_for_a_pymesh_issued_server(
    ca: CertificateAuthority, server: Server
) -> None:
    creds = _creds(ca, SERVER, trust_domains=["cluster.local"])
    try:
        assert _call(creds, server.key) == CLIENT.encode()
        assert creds.stats["native_endpoints"] == 1
        assert creds.stats["probe_native"] == 1
        assert creds.stats["tunnel_endpoints"] == 0
        assert creds.tunnels == ()  # no tunnel was even created
    finally:
        creds.close()


def test_server_without_the_dns_san_falls_back_to_the_tunnel(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """An Istio-style certificate (URI SAN only, same CA): the probe finds no derived name,
    the tunnel serves the endpoint and still verifies the identity."""
    root_key = key_from_pem((tmp_path / "ca" / "root-key.pem").read_bytes())
    s = Server(raw_bundle(ca.roots[0], root_key, SERVER))
    creds = _creds(ca, SERVER)
    try:
        assert _call(creds, s.key) == CLIENT.encode()
        assert creds.stats["probe_no_dns_san"] == 1
        assert creds.stats["tunnel_endpoints"] == 1 and creds.stats["native_endpoints"] == 0
        assert len(creds.tunnels) == 1 and creds.tunnels[0].stats.refused == 0
    finally:
        creds.close()
        s.stop()


def test_matchers_other_than_one_exact_uri_keep_the_tunnel(
    ca: CertificateAuthority, server: Server
) -> None:
    creds = MeshChannelCredentials(
        StaticProvider(ca_bundle(ca, "default", "client")),
        expected_sans=[StringMatcher.prefix("spiffe://cluster.local/ns/default/")],
    )
    try:
        assert _call(creds, server.key) == CLIENT.encode()
        assert creds.stats["tunnel_endpoints"] == 1 and creds.stats["native_endpoints"] == 0
        assert creds.stats["probe_native"] == 0  # not even probed
    finally:
        creds.close()


def test_late_server_switches_to_native_after_a_reprobe(ca: CertificateAuthority) -> None:
    """Unreachable when the channel opened: the tunnel first, native once a re-probe finds
    the derived name (new calls only)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    creds = _creds(ca, SERVER)
    channel = creds.open_subchannel(f"127.0.0.1:{port}", OPTS, None, None)
    s = None
    try:
        assert creds.stats["probe_unreachable"] == 1 and creds.stats["native_endpoints"] == 0
        s = Server(ca_bundle(ca, "default", "server"), port=port)
        call = channel.unary_unary("/t.Who/Am")
        assert call(b"", timeout=5, wait_for_ready=True) == CLIENT.encode()
        deadline = time.monotonic() + 10
        while creds.stats["native_switches"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert creds.stats["native_switches"] == 1
        assert call(b"", timeout=5) == CLIENT.encode()
        assert creds.stats["native_channels"] == 1
    finally:
        channel.close()
        creds.close()
        if s is not None:
            s.stop()


def test_server_losing_the_name_moves_the_endpoint_to_the_tunnel(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Native first; the server's certificate is then replaced by one without the derived
    name (as if now from istiod): grpcio's handshakes fail, a probe sees why, and new calls
    go through the tunnel, which verifies the URI SAN."""
    root_key = key_from_pem((tmp_path / "ca" / "root-key.pem").read_bytes())
    s = Server(ca_bundle(ca, "default", "server"))
    creds = _creds(ca, SERVER)
    channel = creds.open_subchannel(s.key, OPTS, None, None)
    try:
        call = channel.unary_unary("/t.Who/Am")
        assert call(b"", timeout=5) == CLIENT.encode()
        assert creds.stats["native_endpoints"] == 1
        s.provider.update(raw_bundle(ca.roots[0], root_key, SERVER))
        s.server.stop(0).wait(5)  # end the open connection; the next server has the new cert
        port = s.port
        s = Server(s.provider.current(), port=port)
        deadline = time.monotonic() + 15
        answer = None
        while time.monotonic() < deadline:
            try:
                answer = call(b"", timeout=2)
                break
            except grpc.RpcError:
                time.sleep(0.1)
        assert answer == CLIENT.encode()
        assert creds.stats["native_fallbacks"] == 1 and len(creds.tunnels) == 1
        assert creds.stats["probe_no_dns_san"] == 1
    finally:
        channel.close()
        creds.close()
        s.stop()


# ----------------------------------------------------------------------------- attacks


def test_attacks_are_refused_by_grpcio_on_the_native_path(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """``native="always"``: no probe, so grpcio's own handshake is what must refuse. Each
    hostile certificate carries a DNS SAN exactly as the pymesh CA would issue one for the
    identity it names."""
    root_key = key_from_pem((tmp_path / "ca" / "root-key.pem").read_bytes())
    root = ca.roots[0]
    trust = cert_pem(root)
    other_root, other_key = new_root()
    evil = "spiffe://evil.example/ns/default/sa/server"
    cases = [
        # (server certificate, expected identity) — what it tries
        (ca_bundle(ca, "default", "server"), spiffe("default", "other")),  # wrong SAN
        (_leaf(root, root_key, evil, spiffe_dns_name(evil), trust=trust), SERVER),  # domain
        (
            _leaf(other_root, other_key, SERVER, spiffe_dns_name(SERVER), trust=trust),
            SERVER,
        ),  # another CA
        (
            _leaf(root, root_key, SERVER, spiffe_dns_name(SERVER), trust=trust, expired=True),
            SERVER,
        ),  # expired
    ]
    refused = 0
    for bundle, expected in cases:
        s = Server(bundle)
        creds = _creds(ca, expected, native="always")
        try:
            with pytest.raises(grpc.RpcError) as err:
                _call(creds, s.key)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
            assert creds.stats["native_endpoints"] == 1 and not creds.tunnels
            refused += 1
        finally:
            creds.close()
            s.stop()
    assert refused == len(cases) == 4
    # the control: the right certificate passes on the same path
    s = Server(_leaf(root, root_key, SERVER, spiffe_dns_name(SERVER), trust=trust))
    creds = _creds(ca, SERVER, native="always")
    try:
        assert _call(creds, s.key) == CLIENT.encode()
    finally:
        creds.close()
        s.stop()


# ----------------------------------------------------------------------------- rotation


def test_rotation_new_calls_on_new_credentials_inflight_call_finishes(
    ca: CertificateAuthority, server: Server
) -> None:
    client = StaticProvider(ca_bundle(ca, "default", "client"))
    creds = MeshChannelCredentials(client, expected_sans=[StringMatcher.exact(SERVER)])
    channel = creds.open_subchannel(server.key, OPTS, None, None)
    try:
        assert creds.stats["native_endpoints"] == 1
        slow = channel.unary_unary("/t.Who/Slow").future(b"", timeout=10)
        time.sleep(0.2)  # the slow call is on the wire, on the first certificate
        client.update(ca_bundle(ca, "default", "client-next"))
        fast = channel.unary_unary("/t.Who/Am")(b"", timeout=5)
        assert fast == spiffe("default", "client-next").encode()
        assert not slow.done()
        server.release.set()
        assert slow.result(timeout=5) == CLIENT.encode()  # finished on the old channel
        assert creds.stats["native_channels"] == 2
    finally:
        channel.close()
        creds.close()


# ----------------------------------------------------------------------------- grpc.aio


def test_aio_auto_keeps_the_tunnel(ca: CertificateAuthority, server: Server) -> None:
    """``grpc.aio`` with ``native="auto"`` stays on the tunnel (it measured faster there);
    ``native="always"`` takes grpcio's TLS."""
    for native, tunnels in (("auto", 1), ("always", 0)):
        creds = _creds(ca, SERVER, native=native)

        async def main(creds: MeshChannelCredentials = creds) -> bytes:
            ch = creds.open_aio_subchannel(server.key, OPTS, None, None, None)
            try:
                return await ch.unary_unary("/t.Who/Am")(b"", timeout=5)  # type: ignore[no-any-return]
            finally:
                await ch.close()

        try:
            assert asyncio.run(main()) == CLIENT.encode()
            assert len(creds.tunnels) == tunnels
            assert creds.stats["native_endpoints"] == 1 - tunnels
        finally:
            creds.close()


def test_aio_attacks_refused_natively_and_rotation(
    ca: CertificateAuthority, server: Server, tmp_path: Path
) -> None:
    root_key = key_from_pem((tmp_path / "ca" / "root-key.pem").read_bytes())
    root = ca.roots[0]
    other_root, other_key = new_root()
    trust = cert_pem(root)
    evil = "spiffe://evil.example/ns/default/sa/server"
    cases = [
        (ca_bundle(ca, "default", "server"), spiffe("default", "other")),
        (_leaf(root, root_key, evil, spiffe_dns_name(evil), trust=trust), SERVER),
        (_leaf(other_root, other_key, SERVER, spiffe_dns_name(SERVER), trust=trust), SERVER),
        (
            _leaf(root, root_key, SERVER, spiffe_dns_name(SERVER), trust=trust, expired=True),
            SERVER,
        ),
    ]

    async def attempt(creds: MeshChannelCredentials, key: str) -> grpc.StatusCode:
        ch = creds.open_aio_subchannel(key, OPTS, None, None, None)
        try:
            await ch.unary_unary("/t.Who/Am")(b"", timeout=5)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            await ch.close()

    refused = 0
    for bundle, expected in cases:
        s = Server(bundle)
        creds = _creds(ca, expected, native="always")
        try:
            assert asyncio.run(attempt(creds, s.key)) == grpc.StatusCode.UNAVAILABLE
            assert creds.stats["native_endpoints"] == 1 and not creds.tunnels
            refused += 1
        finally:
            creds.close()
            s.stop()
    assert refused == len(cases) == 4

    # rotation: a call in flight finishes on the old channel, new calls use the new cert
    client = StaticProvider(ca_bundle(ca, "default", "client"))
    creds = MeshChannelCredentials(
        client, expected_sans=[StringMatcher.exact(SERVER)], native="always"
    )

    async def rotate() -> tuple[bytes, bytes]:
        ch = creds.open_aio_subchannel(server.key, OPTS, None, None, None)
        try:
            slow = asyncio.ensure_future(ch.unary_unary("/t.Who/Slow")(b"", timeout=10))
            await asyncio.sleep(0.2)
            client.update(ca_bundle(ca, "default", "client-next"))
            fast = await ch.unary_unary("/t.Who/Am")(b"", timeout=5)
            assert not slow.done()
            server.release.set()
            return await slow, fast
        finally:
            await ch.close()

    try:
        slow, fast = asyncio.run(rotate())
        assert slow == CLIENT.encode()
        assert fast == spiffe("default", "client-next").encode()
        assert creds.stats["native_channels"] == 2
    finally:
        creds.close()
