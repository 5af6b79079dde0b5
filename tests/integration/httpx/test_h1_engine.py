"""pymesh's HTTP/1.1 engine (``pymesh.httpx._h1``) against real peers on loopback: raw-socket
servers that script each edge of the protocol, and uvicorn. Every test runs the sync pool
(blocking sockets) and the async pool (asyncio) through the same scenario."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import httpcore
import pytest
import uvicorn

from pymesh.httpx._h1 import AsyncPool, SyncPool, serialize_head

Script = Callable[[socket.socket, int], None]


def read_request(sock: socket.socket) -> bytes:
    """One request off ``sock`` (head + Content-Length or chunked body); b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            return b""
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += sock.recv(65536)
    elif b"transfer-encoding: chunked" in lower:
        while not rest.endswith(b"0\r\n\r\n"):
            rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


class RawServer:
    """Accepts connections and runs ``script(sock, index)`` on each (index from 0)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            index = self.connections
            self.connections += 1
            t = threading.Thread(target=self._run, args=(sock, index), daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, sock: socket.socket, index: int) -> None:
        try:
            self.script(sock, index)
        except OSError:
            pass
        finally:
            sock.close()

    def serve_requests(self, answer: Callable[[bytes, int], bytes | None]) -> Script:
        """A script answering each request with ``answer(request, n)`` (None: close)."""

        def script(sock: socket.socket, index: int) -> None:
            while True:
                req = read_request(sock)
                if not req:
                    return
                self.requests.append(req)
                reply = answer(req, len(self.requests))
                if reply is None:
                    return
                sock.sendall(reply)

        return script

    def stop(self) -> None:
        self._stop = True
        self.listener.close()
        for t in self._threads:
            t.join(5)


class Engine:
    """One pool, sync or async, with a blocking API for the scenarios."""

    def __init__(self, kind: str, port: int, **kwargs: Any) -> None:
        self.kind = kind
        self.port = port
        if kind == "sync":
            self.pool: Any = SyncPool("127.0.0.1", port, **kwargs)
            self.loop = None
        else:
            self.loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self._thread.start()
            self.pool = AsyncPool("127.0.0.1", port, **kwargs)

    def _run(self, coro: Any) -> Any:
        assert self.loop is not None
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(30)

    def open(
        self,
        method: bytes = b"GET",
        path: str = "/",
        *,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        body: Any = b"",
        timeout: dict[str, float] | None = None,
    ) -> httpcore.Response:
        request = httpcore.Request(
            method,
            f"http://127.0.0.1:{self.port}{path}",
            headers=[(b"Host", b"test"), *headers],
            content=body,
            extensions={"timeout": timeout or {}},
        )
        if self.kind == "sync":
            response: httpcore.Response = self.pool.handle_request(request)
            return response
        return self._run(self.pool.handle_async_request(request))  # type: ignore[no-any-return]

    def read(self, response: httpcore.Response) -> bytes:
        if self.kind == "sync":
            return b"".join(response.stream)  # type: ignore[arg-type]

        async def read() -> bytes:
            return b"".join([part async for part in response.stream])  # type: ignore[union-attr]

        return self._run(read())  # type: ignore[no-any-return]

    def first_chunk(self, response: httpcore.Response) -> bytes:
        if self.kind == "sync":
            return next(iter(response.stream))  # type: ignore[call-overload,no-any-return]

        async def first() -> bytes:
            async for part in response.stream:  # type: ignore[union-attr]
                return part
            return b""

        return self._run(first())  # type: ignore[no-any-return]

    def close_response(self, response: httpcore.Response) -> None:
        if self.kind == "sync":
            response.stream.close()  # type: ignore[union-attr]
        else:
            self._run(response.stream.aclose())  # type: ignore[union-attr]

    def get(self, path: str = "/", **kwargs: Any) -> tuple[int, bytes]:
        response = self.open(b"GET", path, **kwargs)
        return response.status, self.read(response)

    def close(self) -> None:
        if self.kind == "sync":
            self.pool.close()
        else:
            self._run(self.pool.aclose())
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def raw() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def make(
        answer: Callable[[bytes, int], bytes | None] | None = None, script: Script | None = None
    ) -> RawServer:
        server = RawServer(lambda s, i: None)
        server.script = script if script is not None else server.serve_requests(answer)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def engines() -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(kind: str, port: int, **kwargs: Any) -> Engine:
        engine = Engine(kind, port, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# -- keep-alive and reuse ---------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(kind: str, raw: Any, engines: Any) -> None:
    server = raw(lambda req, n: ok(b"n%d" % n))
    engine = engines(kind, server.port)
    assert [engine.get() for _ in range(5)] == [(200, b"n%d" % n) for n in range(1, 6)]
    assert server.connections == 1
    assert engine.pool.idle_count() == 1 and engine.pool.is_idle()
    network = engine.open().extensions["network_stream"]  # as httpcore's, for the app
    assert network.get_extra_info("server_addr")[1] == server.port
    assert network.get_extra_info("client_addr")[0] == "127.0.0.1"
    assert network.get_extra_info("ssl_object") is None


def test_keep_alive_closed_by_the_server_is_not_reused(kind: str, raw: Any, engines: Any) -> None:
    # Answers with keep-alive semantics, then closes the connection anyway: the pooled
    # connection is seen closed when checked out, and a fresh one carries the request.
    closed = threading.Semaphore(0)

    def script(sock: socket.socket, index: int) -> None:
        req = read_request(sock)
        server.requests.append(req)
        sock.sendall(ok(b"c%d" % index))
        sock.shutdown(socket.SHUT_RDWR)
        closed.release()

    server = raw(script=script)
    engine = engines(kind, server.port)
    for n in range(3):
        assert engine.get() == (200, b"c%d" % n)
        assert closed.acquire(timeout=10)  # the server has closed its end
        time.sleep(0.02)  # and the FIN has reached us (loopback)
    assert server.connections == 3
    assert len(server.requests) == 3  # each request reached the server exactly once


def test_reset_after_the_request_on_a_reused_connection_is_not_replayed(
    kind: str, raw: Any, engines: Any
) -> None:
    # The server reads the second request, then resets: it may have acted on it, so the
    # engine reports the failure (the mesh's retry policy decides, as Envoy's does).
    def script(sock: socket.socket, index: int) -> None:
        server.requests.append(read_request(sock))
        sock.sendall(ok())
        server.requests.append(read_request(sock))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    server = raw(script=script)
    engine = engines(kind, server.port)
    assert engine.get() == (200, b"hello")
    with pytest.raises((httpcore.ReadError, httpcore.RemoteProtocolError)):
        engine.get()
    assert len(server.requests) == 2 and server.connections == 1
    assert engine.pool.is_idle() and engine.pool.idle_count() == 0


def test_write_to_a_stale_connection_is_sent_once_more_on_a_fresh_one() -> None:
    # The check at checkout cannot see a close that lands after it; a write that fails
    # then means the server never saw the request: one more try on a fresh connection.
    import pymesh.httpx._h1 as h1

    server = RawServer(lambda s, i: None)
    server.script = server.serve_requests(lambda req, n: ok(b"n%d" % n))
    pool = SyncPool("127.0.0.1", server.port)
    try:
        assert b"".join(pool.handle_request(_get(server.port)).stream) == b"n1"  # type: ignore[arg-type]
        stale = pool._idle[0]
        stale.sock.shutdown(socket.SHUT_WR)  # our side can no longer write on it
        original = h1._SyncConn.readable
        h1._SyncConn.readable = lambda self: False  # type: ignore[method-assign]
        try:
            response = pool.handle_request(_get(server.port))
        finally:
            h1._SyncConn.readable = original  # type: ignore[method-assign]
        assert b"".join(response.stream) == b"n2"  # type: ignore[arg-type]
        assert server.connections == 2 and len(server.requests) == 2
    finally:
        pool.close()
        server.stop()


def _get(port: int) -> httpcore.Request:
    return httpcore.Request(b"GET", f"http://127.0.0.1:{port}/", headers=[(b"Host", b"t")])


def test_fresh_connection_closed_without_response_is_an_error(
    kind: str, raw: Any, engines: Any
) -> None:
    server = raw(lambda req, n: None)
    engine = engines(kind, server.port)
    with pytest.raises(httpcore.RemoteProtocolError, match="without sending a response"):
        engine.get()
    assert server.connections == 1  # a fresh connection is not retried


def test_connection_close_response_is_not_reused(kind: str, raw: Any, engines: Any) -> None:
    server = raw(lambda req, n: ok(b"x", b"Connection: close\r\n"))
    engine = engines(kind, server.port)
    assert engine.get() == (200, b"x")
    assert engine.get() == (200, b"x")
    assert server.connections == 2
    assert engine.pool.idle_count() == 0


def test_connection_close_request_is_not_reused(kind: str, raw: Any, engines: Any) -> None:
    server = raw(lambda req, n: ok())
    engine = engines(kind, server.port)
    for _ in range(2):
        response = engine.open(headers=((b"Connection", b"close"),))
        assert engine.read(response) == b"hello"
    assert server.connections == 2
    assert b"Connection: close" in server.requests[0]


def test_http10_response_without_keep_alive_is_not_reused(
    kind: str, raw: Any, engines: Any
) -> None:
    server = raw(lambda req, n: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    engine = engines(kind, server.port)
    response = engine.open()
    assert response.extensions["http_version"] == b"HTTP/1.0"
    assert engine.read(response) == b"ok"
    engine.get()
    assert server.connections == 2


def test_idle_expiry_on_a_fake_clock(kind: str, raw: Any, engines: Any) -> None:
    now = [100.0]
    server = raw(lambda req, n: ok())
    engine = engines(kind, server.port, keepalive_expiry=30.0, clock=lambda: now[0])
    engine.get()
    now[0] += 29.0
    engine.get()  # idle 29 s < 30 s: reused
    assert server.connections == 1
    now[0] += 30.5
    engine.get()  # idle 30.5 s: expired, closed, a new connection
    assert server.connections == 2


def test_pool_keeps_at_most_max_idle(kind: str, raw: Any, engines: Any) -> None:
    go = threading.Event()

    def script(sock: socket.socket, index: int) -> None:
        while read_request(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            go.wait(10)
            sock.sendall(b"cd")

    server = raw(script=script)
    engine = engines(kind, server.port, max_idle=2)
    responses = [engine.open() for _ in range(4)]  # four connections in use at once
    assert server.connections == 4
    assert not engine.pool.is_idle()
    go.set()
    for response in responses:
        assert engine.read(response) == b"abcd"
    assert engine.pool.idle_count() == 2
    assert engine.pool.is_idle()


# -- bodies -----------------------------------------------------------------------------------


def test_chunked_response_streamed(kind: str, raw: Any, engines: Any) -> None:
    def script(sock: socket.socket, index: int) -> None:
        while read_request(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            time.sleep(0.05)
            sock.sendall(b"6\r\n world\r\n0\r\n\r\n")

    server = raw(script=script)
    engine = engines(kind, server.port)
    response = engine.open()
    assert response.status == 200
    assert engine.first_chunk(response) == b"hello"
    assert engine.read(response) == b" world"
    assert engine.get() == (200, b"hello world")
    assert server.connections == 1  # fully read: reused


def test_body_closed_before_the_end_drops_the_connection(kind: str, raw: Any, engines: Any) -> None:
    def script(sock: socket.socket, index: int) -> None:
        while read_request(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
            time.sleep(0.1)
            sock.sendall(b"67890")

    server = raw(script=script)
    engine = engines(kind, server.port)
    response = engine.open()
    assert engine.first_chunk(response) == b"12345"
    engine.close_response(response)
    assert engine.pool.idle_count() == 0 and engine.pool.is_idle()
    assert engine.get() == (200, b"1234567890")
    assert server.connections == 2


def test_partial_body_then_close_is_a_protocol_error(kind: str, raw: Any, engines: Any) -> None:
    def script(sock: socket.socket, index: int) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")

    server = raw(script=script)
    engine = engines(kind, server.port)
    response = engine.open()
    assert response.status == 200
    with pytest.raises(httpcore.RemoteProtocolError, match="complete message body"):
        engine.read(response)
    assert engine.pool.idle_count() == 0 and engine.pool.is_idle()


def test_body_delimited_by_eof(kind: str, raw: Any, engines: Any) -> None:
    def script(sock: socket.socket, index: int) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil ")
        time.sleep(0.05)
        sock.sendall(b"the end")

    server = raw(script=script)
    engine = engines(kind, server.port)
    assert engine.get() == (200, b"until the end")
    assert engine.pool.idle_count() == 0


def test_interim_1xx_responses_are_skipped(kind: str, raw: Any, engines: Any) -> None:
    server = raw(
        lambda req, n: (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            + ok(b"final", b"X-Final: 1\r\n")
        )
    )
    engine = engines(kind, server.port)
    response = engine.open()
    assert response.status == 200
    assert response.headers == [(b"Content-Length", b"5"), (b"X-Final", b"1")]
    assert response.extensions["reason_phrase"] == b"OK"
    assert engine.read(response) == b"final"
    assert engine.get() == (200, b"final")
    assert server.connections == 1


@pytest.mark.parametrize(
    ("method", "status_line"),
    [(b"HEAD", b"200 OK"), (b"GET", b"204 No Content"), (b"GET", b"304 Not Modified")],
)
def test_responses_without_body(
    kind: str, raw: Any, engines: Any, method: bytes, status_line: bytes
) -> None:
    # HEAD announces the GET body's length; 204/304 carry none: no body, connection reused.
    server = raw(
        lambda req, n: (
            ok()
            if req.startswith(b"GET /next")
            else b"HTTP/1.1 %s\r\nContent-Length: 1000\r\n\r\n" % status_line
            if method == b"HEAD"
            else b"HTTP/1.1 %s\r\n\r\n" % status_line
        )
    )
    engine = engines(kind, server.port)
    response = engine.open(method)
    assert engine.read(response) == b""
    assert engine.get("/next") == (200, b"hello")
    assert server.connections == 1


def test_request_bodies(kind: str, raw: Any, engines: Any) -> None:
    server = raw(lambda req, n: ok(req.partition(b"\r\n\r\n")[2]))
    engine = engines(kind, server.port)
    big = bytes(range(256)) * 1000  # larger than what is appended to the head
    assert engine.get(body=b"small") == (200, b"small")
    assert engine.get(body=big) == (200, big)
    assert b"Content-Length: 5\r\n" in server.requests[0]
    # An iterator body without a length goes chunked.
    status, echoed = engine.get(body=iter([b"ab", b"", b"cde"]))
    assert status == 200
    assert echoed == b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
    assert b"Transfer-Encoding: chunked" in server.requests[2]
    # An app-declared length is kept, the body sent as is.
    engine.get(body=iter([b"xy", b"z"]), headers=((b"Content-Length", b"3"),))
    assert server.requests[3].endswith(b"\r\n\r\nxyz")
    assert server.connections == 1


def test_header_injection_is_refused() -> None:
    with pytest.raises(httpcore.LocalProtocolError):
        serialize_head(b"GET", b"/", [(b"x-a", b"1\r\nx-evil: 1")], 0)
    with pytest.raises(httpcore.LocalProtocolError):
        serialize_head(b"GET", b"/", [(b"x-a\n", b"1")], 0)
    head, chunked, close = serialize_head(b"POST", b"/p?q", [(b"Host", b"h")], 3)
    assert head == b"POST /p?q HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"
    assert not chunked
    assert not close


def test_connection_close_is_read_from_the_head() -> None:
    for headers, close in [
        ([(b"Host", b"h"), (b"Connection", b"Close")], True),
        ([(b"connection", b"keep-alive, close")], True),
        ([(b"connection", b"keep-alive")], False),
        ([(b"x-connection", b"close"), (b"connections", b"close")], False),
    ]:
        assert serialize_head(b"GET", b"/", headers, 0)[2] is close, headers


# -- errors and timeouts ----------------------------------------------------------------------


def test_connect_refused_is_a_connect_error(kind: str, engines: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        engine = engines(kind, port)
        with pytest.raises(httpcore.ConnectError):
            engine.get()
        assert engine.pool.is_idle()


def test_read_timeout_waiting_for_the_head(kind: str, raw: Any, engines: Any) -> None:
    def script(sock: socket.socket, index: int) -> None:
        read_request(sock)
        time.sleep(1.0)

    server = raw(script=script)
    engine = engines(kind, server.port)
    t0 = time.monotonic()
    with pytest.raises(httpcore.ReadTimeout):
        engine.get(timeout={"read": 0.2})
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert engine.pool.is_idle() and engine.pool.idle_count() == 0


def test_read_timeout_on_a_slow_body(kind: str, raw: Any, engines: Any) -> None:
    def script(sock: socket.socket, index: int) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        time.sleep(1.0)

    server = raw(script=script)
    engine = engines(kind, server.port)
    response = engine.open(timeout={"read": 0.2})
    with pytest.raises(httpcore.ReadTimeout):
        engine.read(response)
    assert engine.pool.is_idle() and engine.pool.idle_count() == 0


def test_reset_mid_body_is_a_read_error(kind: str, raw: Any, engines: Any) -> None:
    def script(sock: socket.socket, index: int) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nab")
        time.sleep(0.05)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    server = raw(script=script)
    engine = engines(kind, server.port)
    response = engine.open()
    with pytest.raises((httpcore.ReadError, httpcore.RemoteProtocolError)):
        engine.read(response)


def test_garbage_response_is_a_protocol_error(kind: str, raw: Any, engines: Any) -> None:
    server = raw(lambda req, n: b"SPDY/9 what\r\n\r\n")
    engine = engines(kind, server.port)
    with pytest.raises(httpcore.RemoteProtocolError):
        engine.get()


# -- a real server, many in flight ------------------------------------------------------------


@pytest.fixture(scope="module")
def uvicorn_port() -> Iterator[int]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode() + body})

    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def test_async_pool_with_64_in_flight_against_uvicorn(uvicorn_port: int) -> None:
    async def main() -> tuple[list[bytes], int]:
        pool = AsyncPool("127.0.0.1", uvicorn_port)

        async def one(i: int) -> bytes:
            request = httpcore.Request(
                b"POST", f"http://127.0.0.1:{uvicorn_port}/r{i}", content=b"-b"
            )
            response = await pool.handle_async_request(request)
            return b"".join([part async for part in response.stream])  # type: ignore[union-attr]

        bodies: list[bytes] = []
        for _ in range(3):
            bodies += await asyncio.gather(*(one(i) for i in range(64)))
        idle = pool.idle_count()
        await pool.aclose()
        return bodies, idle

    bodies, idle = asyncio.run(main())
    assert bodies == [b"/r%d-b" % i for i in range(64)] * 3
    assert 1 <= idle <= 64  # connections reused across the rounds, never more than in flight


def test_sync_pool_against_uvicorn_from_threads(uvicorn_port: int) -> None:
    pool = SyncPool("127.0.0.1", uvicorn_port)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(20):
                request = httpcore.Request(b"GET", f"http://127.0.0.1:{uvicorn_port}/{w}/{i}")
                response = pool.handle_request(request)
                assert response.read() == b"/%d/%d" % (w, i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert 1 <= pool.idle_count() <= 8
    pool.close()
    assert pool.idle_count() == 0


def test_sync_body_dropped_unread_frees_its_slot(raw: Any, engines: Any) -> None:
    import gc

    def script(sock: socket.socket, index: int) -> None:
        while read_request(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            time.sleep(0.2)
            sock.sendall(b"cd")

    server = raw(script=script)
    engine = engines("sync", server.port)
    response = engine.open()
    assert not engine.pool.is_idle()
    del response
    gc.collect()
    assert engine.pool.is_idle() and engine.pool.idle_count() == 0


def test_bytes_after_the_response_are_dropped_with_the_connection(
    kind: str, raw: Any, engines: Any
) -> None:
    server = raw(lambda req, n: ok(b"one") + b"HTTP/1.1 200 OK\r\nX-Unasked: 1\r\n\r\n")
    engine = engines(kind, server.port)
    response = engine.open()
    assert response.headers == [(b"Content-Length", b"3")]
    assert engine.read(response) == b"one"
    assert engine.get() == (200, b"one")
    assert server.connections == 2  # the first connection was not reused


def test_async_pool_used_from_a_second_event_loop(uvicorn_port: int) -> None:
    pool = AsyncPool("127.0.0.1", uvicorn_port)

    async def one() -> bytes:
        request = httpcore.Request(b"GET", f"http://127.0.0.1:{uvicorn_port}/loop")
        response = await pool.handle_async_request(request)
        return b"".join([part async for part in response.stream])  # type: ignore[union-attr]

    assert asyncio.run(one()) == b"/loop"
    assert pool.idle_count() == 1  # its loop is gone now
    assert asyncio.run(one()) == b"/loop"  # the old connection is dropped, a new one used
    assert pool.idle_count() == 1
    asyncio.run(pool.aclose())


def test_write_timeout_when_the_server_does_not_read(kind: str, raw: Any, engines: Any) -> None:
    done = threading.Event()

    def script(sock: socket.socket, index: int) -> None:
        done.wait(10)  # accepts, never reads

    server = raw(script=script)
    engine = engines(kind, server.port)
    t0 = time.monotonic()
    try:
        with pytest.raises(httpcore.WriteTimeout):
            engine.get(body=b"x" * (32 << 20), timeout={"write": 0.3})
    finally:
        done.set()
    assert time.monotonic() - t0 < 5
    assert engine.pool.is_idle() and engine.pool.idle_count() == 0


def test_async_transport_keeps_httpcore_without_an_asyncio_loop() -> None:
    # Under trio (no asyncio loop running) the async transport uses httpcore's pool; under
    # asyncio, the engine's. HTTP/2 clusters use httpcore's either way.
    from types import SimpleNamespace

    from pymesh.httpx._transport import _PLAINTEXT, _AsyncPools
    from pymesh.model.cluster import UpstreamProtocol

    def send(protocol: UpstreamProtocol, key: str) -> Any:
        options = SimpleNamespace(idle_timeout=60.0, max_requests_per_connection=None)
        cluster = SimpleNamespace(http_protocol_options=options)
        return SimpleNamespace(
            host=SimpleNamespace(key=key, address=SimpleNamespace(host="127.0.0.1", port=1)),
            cluster=SimpleNamespace(protocol=protocol, config=SimpleNamespace(cluster=cluster)),
        )

    pools = _AsyncPools()
    h1_send = send(UpstreamProtocol.HTTP1, "127.0.0.1:1")
    assert isinstance(pools.get(h1_send, _PLAINTEXT), httpcore.AsyncConnectionPool)  # no loop

    async def inside() -> tuple[Any, Any]:
        h2 = send(UpstreamProtocol.HTTP2, "127.0.0.1:2")
        return pools.get(h1_send, _PLAINTEXT), pools.get(h2, _PLAINTEXT)

    pools = _AsyncPools()
    on_asyncio, h2_pool = asyncio.run(inside())
    assert isinstance(on_asyncio, AsyncPool)
    assert isinstance(h2_pool, httpcore.AsyncConnectionPool)
    assert on_asyncio.keepalive_expiry == 60.0

    # Without httptools the engine is off: httpcore for every upstream.
    import pymesh.httpx._h1 as h1
    from pymesh.httpx._transport import _SyncPools

    saved = h1.AVAILABLE
    h1.AVAILABLE = False
    try:
        pools = _AsyncPools()
        assert isinstance(asyncio.run(inside())[0], httpcore.AsyncConnectionPool)
        assert isinstance(_SyncPools().get(h1_send, _PLAINTEXT), httpcore.ConnectionPool)
    finally:
        h1.AVAILABLE = saved


def test_async_body_dropped_unread_frees_its_slot(raw: Any) -> None:
    import gc

    def script(sock: socket.socket, index: int) -> None:
        while read_request(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            time.sleep(0.3)

    server = raw(script=script)

    async def main() -> tuple[bool, bool, int]:
        pool = AsyncPool("127.0.0.1", server.port)
        request = httpcore.Request(b"GET", f"http://127.0.0.1:{server.port}/")
        response = await pool.handle_async_request(request)  # the body is still arriving
        busy = not pool.is_idle()
        del response
        gc.collect()
        await asyncio.sleep(0.05)  # the close scheduled on the loop runs
        idle = pool.is_idle()
        count = pool.idle_count()
        await pool.aclose()
        return busy, idle, count

    busy, idle, count = asyncio.run(main())
    assert busy and idle and count == 0
