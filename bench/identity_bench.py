"""Identity costs on loopback (not a timed test): CA signing, TLS handshakes, round trips.

- CA: key + CSR + ``CertificateAuthority.create_certificate`` (token check, CSR checks,
  signing) per certificate, in-process.
- Handshake: a full mTLS handshake over loopback with pymesh's provider-backed contexts
  (SPIFFE SAN check included) vs plain stdlib contexts loaded with the same files, vs a
  plaintext TCP connect.
- Round trip: 64-byte echo on an established connection, mTLS vs plaintext.

Rounds are interleaved; medians reported. ``python bench/identity_bench.py [--n 300]``
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pymesh.controlplane.ca import CertificateAuthority
from pymesh.model.matcher import StringMatcher
from pymesh.security import (
    CertificateBundle,
    SpiffeId,
    StaticProvider,
    build_csr,
    client_ssl_context,
    generate_key,
    server_ssl_context,
    split_chain,
)
from pymesh.security._pki import cert_pem, key_pem


def _bundle(ca: CertificateAuthority, sa: str) -> CertificateBundle:
    key = generate_key()
    csr = build_csr(key, SpiffeId("cluster.local", "default", sa)).decode()
    token = ca.create_token("default", sa)
    chain, roots = split_chain(
        ca.create_certificate(csr, 3600, {"authorization": f"Bearer {token}"})
    )
    return CertificateBundle.from_pem(cert_pem(chain), key_pem(key), cert_pem(roots))


def _plain_ctx(bundle: CertificateBundle, server: bool, d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if not server:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle.roots_pem.decode())
    (d / "c.pem").write_bytes(bundle.chain_pem)
    (d / "k.pem").write_bytes(bundle.key_pem)
    ctx.load_cert_chain(d / "c.pem", d / "k.pem")
    return ctx


class _Server:
    """Echo server; ``ctx=None`` for plaintext."""

    def __init__(self, ctx: ssl.SSLContext | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ctx = ctx
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            s = self.ctx.wrap_socket(conn, server_side=True) if self.ctx else conn
            while data := s.recv(4096):
                s.sendall(data)
            s.close()
        except OSError:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _connect(port: int, ctx: ssl.SSLContext | None) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(raw) if ctx else raw


def _median_us(fn: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ca = CertificateAuthority(Path(d) / "ca")
        t = time.perf_counter()
        for _ in range(50):
            _bundle(ca, "bench")
        sign_ms = (time.perf_counter() - t) / 50 * 1e3
        sb, cb = _bundle(ca, "server"), _bundle(ca, "client")
        mesh_s = server_ssl_context(StaticProvider(sb))
        mesh_c = client_ssl_context(
            StaticProvider(cb), [StringMatcher.exact("spiffe://cluster.local/ns/default/sa/server")]
        )
        plain_s, plain_c = _plain_ctx(sb, True, Path(d)), _plain_ctx(cb, False, Path(d))
        servers = {
            "pymesh mTLS": _Server(mesh_s),
            "stdlib mTLS": _Server(plain_s),
            "plaintext": _Server(None),
        }
        clients = {"pymesh mTLS": mesh_c, "stdlib mTLS": plain_c, "plaintext": None}
        hs: dict[str, list[float]] = {k: [] for k in servers}
        rt: dict[str, list[float]] = {k: [] for k in servers}
        payload = b"x" * 64
        for _ in range(args.rounds):
            for name, server in servers.items():
                ctx = clients[name]

                def handshake(server: _Server = server, ctx: ssl.SSLContext | None = ctx) -> None:
                    s = _connect(server.port, ctx)
                    s.sendall(b"!")
                    s.recv(1)
                    s.close()

                hs[name].append(_median_us(handshake, args.n // args.rounds))
                conn = _connect(server.port, ctx)

                def roundtrip(conn: socket.socket = conn) -> None:
                    conn.sendall(payload)
                    got = 0
                    while got < len(payload):
                        got += len(conn.recv(4096))

                rt[name].append(_median_us(roundtrip, args.n * 3))
                conn.close()
        for s in servers.values():
            s.close()
    print(f"CA: key + CSR + token check + sign: {sign_ms:.2f} ms per certificate")
    print(f"{'':14} {'connect+handshake+1B echo':>26} {'64B echo round trip':>20}")
    for name in servers:
        h, r = statistics.median(hs[name]), statistics.median(rt[name])
        print(f"{name:14} {h:>23.0f} us {r:>17.0f} us")


if __name__ == "__main__":
    main()
