"""mTLS on loopback with stdlib sockets: a valid exchange, every attack refused (counted),
rotation (new connections use the new certificate, an open connection keeps the old)."""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pymesh.controlplane.ca import CertificateAuthority
from pymesh.model.matcher import StringMatcher
from pymesh.security import (
    CertificateBundle,
    StaticProvider,
    client_ssl_context,
    server_ssl_context,
)
from pymesh.security._pki import cert_pem, key_from_pem
from tests.integration.security.tls_servers import EchoServer, serial_of
from tests.unit.security.pki_helpers import ca_bundle, new_root, raw_bundle, spiffe

SERVER = spiffe("default", "server")
CLIENT = spiffe("default", "client")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


@pytest.fixture
def servers() -> Iterator[list[EchoServer]]:
    made: list[EchoServer] = []
    yield made
    for s in made:
        s.close()


def _serve(servers: list[EchoServer], ctx: ssl.SSLContext) -> EchoServer:
    server = EchoServer(ctx)
    servers.append(server)
    return server


def _exchange(ctx: ssl.SSLContext | None, port: int, payload: bytes = b"ping\n") -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if ctx is None:
        with raw:
            raw.sendall(payload)
            data = raw.recv(100)
            if not data or not data.startswith(payload.upper()):
                raise ConnectionError(f"plaintext refused: {data!r}")
            return data
    with ctx.wrap_socket(raw) as tls:
        tls.sendall(payload)
        data = tls.recv(100)
        if not data:
            raise ConnectionError("closed by peer")
        return data


def _root_key(ca: CertificateAuthority, tmp_path: Path):  # type: ignore[no-untyped-def]
    return key_from_pem((tmp_path / "ca" / "root-key.pem").read_bytes())


def test_valid_mtls_exchange(ca: CertificateAuthority, servers: list[EchoServer]) -> None:
    sp = StaticProvider(ca_bundle(ca, "default", "server"))
    cp = StaticProvider(ca_bundle(ca, "default", "client"))
    server = _serve(servers, server_ssl_context(sp, trust_domains=["cluster.local"]))
    ctx = client_ssl_context(cp, [StringMatcher.exact(SERVER)], trust_domains=["cluster.local"])
    assert _exchange(ctx, server.port) == b"PING\n"
    server.close()
    [rec] = server.records
    assert rec.identity == CLIENT and rec.received == b"ping\n" and rec.error is None


def test_every_attack_is_refused(
    ca: CertificateAuthority, servers: list[EchoServer], tmp_path: Path
) -> None:
    root, root_key = ca.roots[0], _root_key(ca, tmp_path)
    trust = cert_pem(root)
    other_root, other_key = new_root("evil")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    good_server = StaticProvider(ca_bundle(ca, "default", "server"))
    good_client = StaticProvider(ca_bundle(ca, "default", "client"))
    expect_server = [StringMatcher.exact(SERVER)]

    def server_with(bundle: CertificateBundle) -> int:
        return _serve(servers, server_ssl_context(StaticProvider(bundle))).port

    strict = _serve(servers, server_ssl_context(good_server, trust_domains=["cluster.local"]))

    def client(
        bundle: CertificateBundle, sans: list[StringMatcher] = expect_server
    ) -> ssl.SSLContext:
        return client_ssl_context(StaticProvider(bundle), sans, trust_domains=["cluster.local"])

    trust_only = CertificateBundle.from_pem(b"", b"", trust)
    attacks: dict[str, Callable[[], bytes]] = {
        # the client refuses the server
        "server in another trust domain": lambda: _exchange(
            client(good_client.current(), [StringMatcher.prefix("spiffe://")]),
            server_with(raw_bundle(root, root_key, spiffe("default", "server", "evil.org"))),
        ),
        "expired server certificate": lambda: _exchange(
            client(good_client.current()),
            server_with(
                raw_bundle(
                    root,
                    root_key,
                    SERVER,
                    not_before=past,
                    not_after=past + datetime.timedelta(hours=1),
                )
            ),
        ),
        "server signed by another CA": lambda: _exchange(
            client(good_client.current()),
            server_with(raw_bundle(other_root, other_key, SERVER, trust=trust)),
        ),
        "server SAN mismatch": lambda: _exchange(
            client(good_client.current(), [StringMatcher.exact(spiffe("default", "ratings"))]),
            strict.port,
        ),
        # the server (STRICT) refuses the client
        "client without certificate": lambda: _exchange(client(trust_only), strict.port),
        "client signed by another CA": lambda: _exchange(
            client(raw_bundle(other_root, other_key, CLIENT, trust=trust)), strict.port
        ),
        "expired client certificate": lambda: _exchange(
            client(
                raw_bundle(
                    root,
                    root_key,
                    CLIENT,
                    not_before=past,
                    not_after=past + datetime.timedelta(hours=1),
                )
            ),
            strict.port,
        ),
        "client in another trust domain": lambda: _exchange(
            client(raw_bundle(root, root_key, spiffe("default", "client", "evil.org"))), strict.port
        ),
        "plaintext to STRICT": lambda: _exchange(None, strict.port),
    }
    refused: list[str] = []
    passed: list[str] = []
    for name, attack in attacks.items():
        try:
            attack()
        except (ssl.SSLError, OSError) as exc:  # ConnectionError is an OSError
            refused.append(f"{name}: {exc}")
        else:
            passed.append(name)
    assert passed == []
    why = dict(r.split(": ", 1) for r in refused)
    assert "not in trust domain" in why["server in another trust domain"]
    assert "expired" in why["expired server certificate"]
    assert "unable to get local issuer" in why["server signed by another CA"]
    assert "match none of the expected" in why["server SAN mismatch"]
    assert len(refused) == len(attacks) == 9
    for s in servers:
        s.close()
    strict_errors = " | ".join(str(rec.error) for rec in strict.records)
    for reason in (
        "did not return a certificate",
        "unable to get local issuer",
        "certificate has expired",
        "not in trust domain",
        "WRONG_VERSION",
    ):
        assert reason.lower() in strict_errors.lower(), (reason, strict_errors.split(" | "))
    # no application byte ever reached a server in any attack
    assert all(rec.received == b"" for s in servers for rec in s.records)
    assert sum(len(s.records) for s in servers) == 9


def test_rotation_open_connection_keeps_old_new_connection_gets_new(
    ca: CertificateAuthority, servers: list[EchoServer]
) -> None:
    sp = StaticProvider(ca_bundle(ca, "default", "server"))
    cp = StaticProvider(ca_bundle(ca, "default", "client"))
    sctx = server_ssl_context(sp)
    cctx = client_ssl_context(cp, [StringMatcher.exact(SERVER)])
    server = _serve(servers, sctx)
    first = cctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10))
    first.sendall(b"one\n")
    assert first.recv(100) == b"ONE\n"
    serial_a = serial_of(first.getpeercert(binary_form=True))
    # both sides rotate while `first` is open
    sp.update(ca_bundle(ca, "default", "server"))
    cp.update(ca_bundle(ca, "default", "client"))
    assert sctx.swaps == 2 and cctx.swaps == 2
    first.sendall(b"still\n")
    assert first.recv(100) == b"STILL\n"  # the open connection finishes on the old certs
    assert serial_of(first.getpeercert(binary_form=True)) == serial_a
    first.close()
    second = cctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10))
    second.sendall(b"two\n")
    assert second.recv(100) == b"TWO\n"
    serial_b = serial_of(second.getpeercert(binary_form=True))
    second.close()
    server.close()
    assert serial_b != serial_a
    assert serial_b == serial_of_pem(sp.current().chain_pem)
    first_rec, second_rec = server.records
    assert first_rec.received == b"one\nstill\n" and second_rec.received == b"two\n"
    assert first_rec.peer_serial != second_rec.peer_serial
    assert second_rec.peer_serial == serial_of_pem(cp.current().chain_pem)


def serial_of_pem(pem: bytes) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificates(pem)[0].serial_number


def test_root_rotation_keeps_mtls_working(
    ca: CertificateAuthority, servers: list[EchoServer]
) -> None:
    """Two-phase root rotation over real TLS: at every step, peers renewed at different
    times still authenticate each other; after retirement the old root is refused."""
    sp = StaticProvider(ca_bundle(ca, "default", "server"))
    cp = StaticProvider(ca_bundle(ca, "default", "client"))
    server = _serve(servers, server_ssl_context(sp))
    cctx = client_ssl_context(cp, [StringMatcher.exact(SERVER)])
    stale_client = ca_bundle(ca, "default", "client")  # under the old root, never renewed
    assert _exchange(cctx, server.port) == b"PING\n"
    ca.add_next_root()
    cp.update(ca_bundle(ca, "default", "client"))  # client renewed: trusts both roots
    assert _exchange(cctx, server.port) == b"PING\n"
    ca.activate_next_root()
    sp.update(ca_bundle(ca, "default", "server"))  # server: new-root cert, trusts both
    assert _exchange(cctx, server.port) == b"PING\n"  # old-root client cert still accepted
    cp.update(ca_bundle(ca, "default", "client"))
    assert _exchange(cctx, server.port) == b"PING\n"
    ca.retire_previous_roots()
    sp.update(ca_bundle(ca, "default", "server"))
    cp.update(ca_bundle(ca, "default", "client"))
    assert _exchange(cctx, server.port) == b"PING\n"
    # a workload still holding an old-root certificate is refused now
    old = client_ssl_context(
        StaticProvider(
            CertificateBundle.from_pem(
                stale_client.chain_pem, stale_client.key_pem, cp.current().roots_pem
            )
        ),
        [StringMatcher.exact(SERVER)],
    )
    with pytest.raises((ssl.SSLError, OSError)):
        _exchange(old, server.port)
