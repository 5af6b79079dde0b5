"""The PERMISSIVE front listener on its own (real sockets on loopback): the first byte picks
the internal port, the client's address is recorded for the internal connection, ``admit``
refuses, the connection bound and the first-byte timeout hold, ``close`` closes everything."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pymesh.security._forward import PermissiveFront


class Echo:
    """A TCP server answering ``TAG`` + the peer port it saw + the bytes it got; with
    ``hold`` it keeps the connection until the other side closes it."""

    def __init__(self, tag: bytes, *, hold: bool = False) -> None:
        self.tag = tag
        self.hold = hold
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(100)
                conn.sendall(self.tag + str(addr[1]).encode() + b":" + data)
                if self.hold:
                    conn.settimeout(10)
                    try:
                        conn.recv(100)
                    except OSError:
                        pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echoes() -> Iterator[tuple[Echo, Echo]]:
    tls, plain = Echo(b"T"), Echo(b"P")
    yield tls, plain
    tls.close()
    plain.close()


def _ask(port: int, data: bytes) -> tuple[bytes, tuple[str, int]]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(data)
        out = b""
        while chunk := c.recv(100):
            out += chunk
        return out, c.getsockname()


def test_first_byte_routes_and_origin_is_recorded(echoes: tuple[Echo, Echo]) -> None:
    tls, plain = echoes
    seen: list[tuple[str, tuple[str, int]]] = []

    def admit(transport: str, client: tuple[str, int], local: tuple[str, int]) -> bool:
        seen.append((transport, client))
        return True

    front = PermissiveFront("127.0.0.1", 0, tls_port=tls.port, plain_port=plain.port, admit=admit)
    try:
        out, me = _ask(front.port, b"\x16\x03\x01hello")
        assert out.startswith(b"T") and out.endswith(b":\x16\x03\x01hello")
        out2, me2 = _ask(front.port, b"PRI * HTTP/2.0")
        assert out2.startswith(b"P") and out2.endswith(b"PRI * HTTP/2.0")
        assert seen == [("tls", me), ("raw_buffer", me2)]
        assert (front.stats.tls, front.stats.plaintext) == (1, 1)
    finally:
        front.close()


def test_origin_maps_the_internal_connection_to_the_client() -> None:
    tls, plain = Echo(b"T", hold=True), Echo(b"P", hold=True)
    front = PermissiveFront("127.0.0.1", 0, tls_port=tls.port, plain_port=plain.port)
    try:
        with socket.create_connection(("127.0.0.1", front.port), timeout=5) as c:
            c.sendall(b"x")
            answer = c.recv(100)
            internal_port = int(answer[1:].split(b":")[0])
            # while the client's connection is open its internal one maps back to it
            assert front.origin(internal_port) == ("127.0.0.1", c.getsockname()[1], "raw_buffer")
    finally:
        front.close()
        tls.close()
        plain.close()


def test_refusals_bounds_and_close(echoes: tuple[Echo, Echo]) -> None:
    tls, plain = echoes
    front = PermissiveFront(
        "127.0.0.1",
        0,
        tls_port=tls.port,
        plain_port=plain.port,
        admit=lambda transport, client, local: transport == "tls",  # "STRICT"
        max_connections=1,
        timeout=0.3,
    )
    try:
        out, _ = _ask(front.port, b"GET / HTTP/1.1\r\n")
        assert out == b""  # plaintext closed unanswered
        assert front.stats.refused == 1
        idle = socket.create_connection(("127.0.0.1", front.port), timeout=5)
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", front.port), timeout=5) as extra:
            assert extra.recv(10) == b""  # over max_connections: closed at once
        assert front.stats.refused == 2
        assert idle.recv(10) == b""  # no first byte within the timeout: closed
        idle.close()
        assert front.stats.refused == 3
        assert front.stats.active == 0
    finally:
        front.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", front.port), timeout=1).recv(1)
