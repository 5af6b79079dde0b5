"""``pymesh.serve`` writes a response's head together with its first body message (one
``send``, one TLS record), as ASGI allows, and otherwise behaves as uvicorn does: a head the
app never completes still reaches the client before the connection is closed."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import httpx

from tests.integration.asgi.conftest import Mesh
from tests.unit.security.pki_helpers import spiffe

REQUEST = b"GET /x HTTP/1.1\r\nhost: web\r\n\r\n"
PAUSE = 0.3  # between the app's head and its body: longer than the first read waits


def _app(kind: str) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        start = {"type": "http.response.start", "status": 200}
        if kind in ("stream", "flush"):
            await send({**start, "headers": [(b"transfer-encoding", b"chunked")]})
            if kind == "flush":  # an empty first body message: the head goes now
                await send({"type": "http.response.body", "body": b"", "more_body": True})
            await asyncio.sleep(PAUSE)
            await send({"type": "http.response.body", "body": b"one", "more_body": True})
            await asyncio.sleep(PAUSE)
            await send({"type": "http.response.body", "body": b"two"})
            return
        await send({**start, "headers": [(b"content-length", b"2")]})
        await asyncio.sleep(PAUSE)
        if kind == "raise":
            raise RuntimeError("the app failed after its head")
        if kind == "ok":
            await send({"type": "http.response.body", "body": b"ok"})
        # "nobody": returns without a body

    return app


def _connect(port: int, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(sock) if ctx is not None else sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_head_and_first_body_chunk_leave_in_one_write(mesh: Mesh) -> None:
    server = mesh.serve(_app("ok"))
    ctx = mesh.client_context(mesh.identity("default", "client"))
    for tls in (None, ctx):
        with _connect(server.port, tls) as sock:
            sock.sendall(REQUEST)
            first = sock.recv(65536)  # one TLS record at most: the head alone before
            assert first.startswith(b"HTTP/1.1 200 OK\r\n"), first
            assert first.endswith(b"\r\n\r\nok"), (tls, first)


def test_streaming_head_waits_for_the_first_chunk_only(mesh: Mesh) -> None:
    server = mesh.serve(_app("stream"))
    with _connect(server.port, None) as sock:
        sock.sendall(REQUEST)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"3\r\none\r\n"), first
        second = b""
        while not second.endswith(b"0\r\n\r\n"):
            second += sock.recv(65536)
        assert second == b"3\r\ntwo\r\n0\r\n\r\n"


def test_an_empty_first_body_message_sends_the_head_at_once(mesh: Mesh) -> None:
    server = mesh.serve(_app("flush"))
    with _connect(server.port, None) as sock:
        sock.sendall(REQUEST)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\n"), first


def test_an_unfinished_response_still_sends_its_head_then_closes(mesh: Mesh) -> None:
    """As under uvicorn alone: the head, then the connection closed (not a 500)."""
    for kind in ("raise", "nobody"):
        server = mesh.serve(_app(kind))
        with _connect(server.port, None) as sock:
            sock.sendall(REQUEST)
            data = _read_all(sock)
        assert data.startswith(b"HTTP/1.1 200 OK\r\n"), (kind, data)
        assert data.endswith(b"\r\n\r\n"), (kind, data)  # no body: the connection closed


def test_each_keep_alive_connection_keeps_its_own_identity(mesh: Mesh) -> None:
    """The middleware builds a connection's peer once: alternating requests on two kept-alive
    connections with different client certificates each see their own caller."""
    server = mesh.serve()
    url = f"https://127.0.0.1:{server.port}/who"
    ids = {sa: spiffe("default", sa) for sa in ("alpha", "beta")}
    clients = {
        sa: httpx.Client(verify=mesh.client_context(mesh.identity("default", sa)), timeout=5)
        for sa in ids
    }
    try:
        for _ in range(3):
            for sa, client in clients.items():
                body = client.get(url).json()
                assert body["spiffe_id"] == ids[sa], (sa, body)
    finally:
        for client in clients.values():
            client.close()
    plain = httpx.get(f"http://127.0.0.1:{server.port}/who", timeout=5).json()
    assert plain["tls"] is False and plain["spiffe_id"] is None
