"""Loopback TLS servers for the identity tests (stdlib; every server stops in ``close``)."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from pymesh.security import peer_identity


def serial_of(der: bytes | None) -> int | None:
    return None if der is None else x509.load_der_x509_certificate(der).serial_number


@dataclass
class ConnRecord:
    identity: str | None = None
    received: bytes = b""
    error: str | None = None
    peer_serial: int | None = None


@dataclass
class EchoServer:
    """Accepts TLS connections with ``ctx``; echoes upper-cased lines; records each."""

    ctx: ssl.SSLContext
    records: list[ConnRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _handle(self, conn: socket.socket) -> None:
        rec = ConnRecord()
        self.records.append(rec)
        conn.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            rec.error = f"handshake: {exc}"
            conn.close()
            return
        rec.identity = peer_identity(tls)
        rec.peer_serial = serial_of(tls.getpeercert(binary_form=True))
        try:
            while True:
                data = tls.recv(4096)
                if not data:
                    break
                rec.received += data
                tls.sendall(data.upper())
        except (ssl.SSLError, OSError) as exc:
            rec.error = f"io: {exc}"
        finally:
            tls.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._accept.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.request.settimeout(10)
        self.request.do_handshake()  # verification (and SAN checks) happen here
        super().setup()

    def do_GET(self) -> None:
        der = self.request.getpeercert(binary_form=True)
        server: HttpsServer = self.server  # type: ignore[assignment]
        server.app_calls += 1
        body = (peer_identity(self.request) or "-").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-client-serial", str(serial_of(der)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpsServer(http.server.ThreadingHTTPServer):
    """HTTP/1.1 over TLS with ``ctx``; answers the client's identity, header x-client-serial."""

    daemon_threads = True
    block_on_close = True

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.app_calls = 0
        super().__init__(("127.0.0.1", 0), _Handler)
        self.port = self.server_address[1]
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # refused handshakes are expected in these tests

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
