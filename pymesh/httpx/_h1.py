"""pymesh's own HTTP/1.1 connection engine: one keep-alive pool per endpoint.

Why not httpcore: for the per-endpoint send the transport needs far less than httpcore's
general machinery (h11's per-event objects, anyio's stream layers, a pool that scans every
connection per request and degrades with many requests in flight on one async pool). This
engine serialises a request in one ``bytes.join``, parses the response with ``httptools``
(llhttp, C), and keeps idle connections in a LIFO deque per endpoint.

The interface is httpcore's, so the transport's error translation, telemetry and
``_discard`` work unchanged: :meth:`SyncPool.handle_request` /
:meth:`AsyncPool.handle_async_request` take an ``httpcore.Request`` and return an
``httpcore.Response`` whose ``stream`` is the body, and raise httpcore's exceptions
(``ConnectError``/``ConnectTimeout`` for connection failures, ``ReadTimeout``,
``WriteError``, ``ReadError``, ``RemoteProtocolError`` ...).

Theory of operation (one connection):

================  ==========================================  ===========================
state             event                                       next
================  ==========================================  ===========================
idle (in pool)    checked out (not expired, not readable)     sending
idle (in pool)    idle longer than the cluster's idle_timeout closed
idle (in pool)    readable when checked out (the server       closed; the next idle one or
                  closed it, or sent something unasked)       a fresh connection
sending           request written                             reading head
sending           reused connection, write fails (a stale     closed; the request is sent
                  keep-alive the check did not catch)         once on a fresh connection
reading head      1xx head                                    reading head (ignored)
reading head      final head, body already complete           idle (keep-alive) or closed
reading head      final head, body pending                    reading body
reading body      body complete (length, chunked, EOF)        idle (keep-alive) or closed
reading body      stream closed before the end                closed
idle or reading   ``max_requests`` requests done on it        closed (not back to idle)
any               read/write error, timeout, cancellation     closed
================  ==========================================  ===========================

``max_requests`` is the cluster's ``max_requests_per_connection`` (Istio's
``maxRequestsPerConnection``; ``None``/0: unlimited). The pools never queue: one request
per connection at a time, and how many requests may be in flight (Envoy's
``max_connections`` and pending queue) is the flow's business (``pymesh.core.limits``).

A connection returns to the pool only after a complete response on a keep-alive exchange
(``Connection: close`` from either side, HTTP/1.0 without keep-alive, and bodies delimited
by EOF close it). HEAD responses and 1xx/204/304 have no body. ``Transfer-Encoding:
chunked`` request headers make the engine frame the body in chunks; otherwise a body
without ``Content-Length`` gets one.

The async pool runs on asyncio only (``asyncio.Protocol``); the transport keeps httpcore
for trio and for HTTP/2 upstreams.
"""

from __future__ import annotations

import asyncio
import collections
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import httpcore

try:
    import httptools

    AVAILABLE = True
    """Whether the engine can run (``httptools`` importable); else the transport keeps
    httpcore for every upstream."""
except ImportError:  # pragma: no cover - httptools is a dependency
    AVAILABLE = False

__all__ = ["AVAILABLE", "AsyncPool", "Done", "SyncPool"]

_READ_SIZE = 65536
_MAX_IDLE = 256  # idle keep-alive connections kept per endpoint
_PAUSE_AT = 1 << 18  # bytes of unread body before an async connection stops reading
_HTTP11 = b"HTTP/1.1"
_ALPN = ["http/1.1"]
_NO_TIMEOUTS: dict[str, float | None] = {}
_HAVE_POLL = hasattr(select, "poll")


class _Unasked(Exception):
    """A second response on a connection that has one request in flight."""


class _Stale(Exception):
    """Writing the request on a reused keep-alive connection failed: the server had closed
    it, so it cannot have seen the request. A failure after the request was written is
    never replayed here (the server may have acted on it): it is the caller's error, and
    the mesh's retry policy decides, as Envoy's does."""


# -- the I/O-free part: serialising and parsing ---------------------------------------------


def serialize_head(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body_length: int | None
) -> tuple[bytes, bool, bool]:
    """The request head, whether the body is sent chunked, and whether the request asks
    to close the connection (``Connection: close``).

    ``body_length``: the length of a ``bytes`` body (``None``: an iterator). A body without
    a ``Content-Length`` or ``Transfer-Encoding`` header gets ``Content-Length`` (bytes) or
    chunked framing (iterator). Raises ``httpcore.LocalProtocolError`` for a header that
    would split the head (CR, LF or NUL in a name or value)."""
    chunked = False
    add: list[tuple[bytes, bytes]] = []
    if body_length != 0:
        framed = False
        for name, value in headers:
            n = name.lower()
            if n == b"content-length":
                framed = True
            elif n == b"transfer-encoding":
                framed = True
                chunked = b"chunked" in value.lower()
        if not framed:
            if body_length is None:
                chunked = True
                add.append((b"Transfer-Encoding", b"chunked"))
            else:
                add.append((b"Content-Length", b"%d" % body_length))
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    close = False
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
        if len(name) == 10 and name.lower() == b"connection" and b"close" in value.lower():
            close = True
    for name, value in add:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    head = b"".join(lines)
    count = len(headers) + len(add) + 2
    if head.count(b"\n") != count or head.count(b"\r") != count or b"\x00" in head:
        raise httpcore.LocalProtocolError("invalid character in a request header")
    return head, chunked, close


def _frame(part: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(part), part)


class _Message:
    """One response being parsed (the ``httptools`` callback target)."""

    __slots__ = (
        "chunks",
        "complete",
        "got_bytes",
        "head_done",
        "headers",
        "keep",
        "parser",
        "pending",
        "reason",
        "status",
        "until_eof",
    )

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.pending = 0  # bytes in chunks
        self.head_done = False
        self.complete = False
        self.until_eof = False
        self.got_bytes = False
        self.keep = False
        # None once released (see release); typed loosely: set while callbacks can run
        self.parser: Any = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Unasked  # bytes after the response: stop parsing, never reuse

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            self.headers = []  # an interim response: the final one follows
            self.reason = b""
            return
        self.status = status
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.pending += len(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
            # llhttp resets its flags once the callback returns: ask now
            self.keep = bool(self.parser.should_keep_alive())

    def feed(self, data: bytes) -> None:
        self.got_bytes = True
        parser = self.parser
        if parser is None:  # released: the response is over, these bytes nobody asked for
            self.keep = False
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Unasked):
                self.keep = False
                return
            raise httpcore.RemoteProtocolError(f"invalid HTTP response: {exc}") from exc
        except httptools.HttpParserUpgrade:
            raise httpcore.RemoteProtocolError("protocol upgrade is not supported") from None
        except httptools.HttpParserError as exc:
            raise httpcore.RemoteProtocolError(f"invalid HTTP response: {exc}") from exc

    def after_head(self, head_only: bool) -> None:
        """Called once the final head is parsed: settle bodies llhttp cannot know about."""
        if self.complete:
            return
        if head_only:
            self.complete = True
            self.keep = bool(self.parser.should_keep_alive())
            return
        for name, _ in self.headers:
            n = name.lower()
            if n in {b"content-length", b"transfer-encoding"}:
                return
        self.until_eof = True  # no framing: the body ends when the server closes

    def release(self) -> None:
        """Drop the parser once the response is over: it holds this message's callbacks, a
        reference cycle that would leave every response (and its request) to the garbage
        collector instead of being freed when the application drops it."""
        self.parser = None

    def take(self) -> list[bytes]:
        chunks = self.chunks
        self.chunks = []
        self.pending = 0
        return chunks

    def keep_alive(self, request_close: bool) -> bool:
        return self.keep and not request_close and not self.until_eof

    def response(self, stream: Any, network: Any) -> httpcore.Response:
        response = object.__new__(httpcore.Response)
        response.status = self.status
        response.headers = self.headers
        response.stream = stream
        version = self.parser.get_http_version()
        if self.complete:
            self.release()
        response._stream_consumed = False
        response.extensions = {
            "http_version": _HTTP11 if version == "1.1" else b"HTTP/" + version.encode(),
            "reason_phrase": self.reason,
            "network_stream": network,
        }
        return response


class _Chunks:
    """An async iterator over a list (no async generator: cheaper per response)."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        for chunk in self._chunks:
            return chunk
        raise StopAsyncIteration


class Done:
    """The body of a response that was complete when its head was read (nothing can fail
    while it is read: the transport hands its chunks over without an error wrapper)."""

    __slots__ = ("chunks",)

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Chunks(self.chunks)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class _Out:
    """One request, serialised: the head (with a small body appended), the rest of the
    body (``data`` bytes or ``parts`` iterator), and what the exchange needs to know."""

    __slots__ = ("chunked", "close", "data", "head", "head_only", "parts", "timeouts")

    def __init__(self, request: httpcore.Request) -> None:
        self.timeouts: dict[str, float | None] = request.extensions.get("timeout", _NO_TIMEOUTS)
        headers: list[tuple[bytes, bytes]] = request.headers  # type: ignore[assignment]
        stream: Any = request.stream
        data: bytes | None = None
        self.parts: Any = None
        if type(stream) is _BYTE_STREAM:
            data = stream._content  # httpcore.ByteStream's content
        else:
            self.parts = stream
        head, chunked, self.close = serialize_head(
            request.method, request.url.target, headers, len(data) if data is not None else None
        )
        if data is not None and not chunked and len(data) <= 65536:
            head, data = head + data, b""
        self.head = head
        self.data = data
        self.chunked = chunked
        self.head_only = request.method == b"HEAD"


_BYTE_STREAM: type[Any] = type(httpcore.Request(b"GET", b"http://x/").stream)


# -- sync -----------------------------------------------------------------------------------


class _SyncConn:
    __slots__ = ("idle_since", "poller", "sock", "timeout", "uses")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.uses = 0
        self.timeout: float | None = -1.0
        self.idle_since = 0.0
        self.poller: Any = None
        if _HAVE_POLL:
            self.poller = select.poll()
            self.poller.register(sock, select.POLLIN)

    def get_extra_info(self, info: str) -> Any:
        """``response.extensions["network_stream"].get_extra_info(...)`` as httpcore's:
        ``ssl_object`` (the TLS socket, ``None`` in plaintext), ``client_addr``,
        ``server_addr``, ``socket``, ``is_readable``."""
        sock = self.sock
        if info == "ssl_object":
            return sock if isinstance(sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        if info == "socket":
            return sock
        if info == "is_readable":
            return self.readable()
        return None

    def readable(self) -> bool:
        """Whether an idle connection has something to read: EOF or a reset from a server
        that closed it, or bytes nobody asked for. Either way it cannot be reused."""
        if self.poller is not None:
            return bool(self.poller.poll(0))
        return bool(select.select([self.sock], [], [], 0)[0])  # no poll() (Windows)

    def set_timeout(self, value: float | None) -> None:
        if value != self.timeout:
            self.sock.settimeout(value)
            self.timeout = value

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


_C = TypeVar("_C")


class _Pool(Generic[_C]):
    """What the sync and asyncio pools share: the endpoint, its TLS, the keep-alive limits
    and the idle connections (most recently used last)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        sni: str | None = None,
        keepalive_expiry: float | None = None,
        max_idle: int = _MAX_IDLE,
        max_requests: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.max_requests = max_requests or 0  # requests per connection; 0: unlimited
        self.port = port
        self.ssl_context = ssl_context
        self.sni = sni
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self.clock = clock
        self._idle: collections.deque[_C] = collections.deque()
        self._active = 0
        self._closed = False
        self._lock = threading.Lock()  # the sync pool's idle deque, closed from any thread

    def is_idle(self) -> bool:
        """No request in progress."""
        return self._active == 0

    def idle_count(self) -> int:
        return len(self._idle)


class SyncPool(_Pool["_SyncConn"]):
    """HTTP/1.1 keep-alive connections to one endpoint over blocking sockets."""

    # pool -----------------------------------------------------------------------------------

    def _checkout(self) -> _SyncConn | None:
        idle = self._idle
        expiry = self.keepalive_expiry
        while idle:
            try:
                conn = idle.pop()
            except IndexError:
                return None
            if expiry is not None and self.clock() - conn.idle_since > expiry:
                conn.close()
                self._expire_older()
                return None
            if conn.readable():
                conn.close()
                continue
            return conn
        return None

    def _expire_older(self) -> None:
        # the others were idle longer than the one just expired
        with self._lock:
            while self._idle:
                self._idle.popleft().close()

    def _release(self, conn: _SyncConn, reuse: bool) -> None:
        self._active -= 1
        limit = self.max_requests
        if limit and conn.uses >= limit:
            reuse = False
        if reuse and not self._closed and len(self._idle) < self.max_idle:
            conn.idle_since = self.clock()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            while self._idle:
                self._idle.popleft().close()

    # one request ----------------------------------------------------------------------------

    def _connect(self, timeouts: dict[str, float | None]) -> _SyncConn:
        timeout = timeouts.get("connect")
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc) or "connect timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ctx = self.ssl_context
            if ctx is not None:
                ctx.set_alpn_protocols(_ALPN)
                sock = ctx.wrap_socket(sock, server_hostname=self.sni or self.host)
        except TimeoutError as exc:
            sock.close()
            raise httpcore.ConnectTimeout(str(exc) or "TLS handshake timed out") from exc
        except (OSError, ssl.SSLError, ValueError) as exc:
            sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        conn = _SyncConn(sock)
        conn.timeout = timeout
        return conn

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        out = _Out(request)
        self._active += 1
        try:
            conn = self._checkout()
            if conn is not None:
                try:
                    return self._exchange(conn, out, True)
                except _Stale as exc:
                    # The server had closed it: once more on a fresh connection (a body
                    # from an iterator cannot be sent twice).
                    if out.parts is not None:
                        raise httpcore.RemoteProtocolError("keep-alive connection closed") from exc
            conn = self._connect(out.timeouts)
            return self._exchange(conn, out, False)
        except BaseException:
            self._active -= 1
            raise

    def _exchange(self, conn: _SyncConn, out: _Out, reused: bool) -> httpcore.Response:
        sock = conn.sock
        msg = _Message()
        timeouts = out.timeouts
        conn.uses += 1
        try:
            conn.set_timeout(timeouts.get("write"))
            try:
                sock.sendall(out.head)
                data, parts, chunked = out.data, out.parts, out.chunked
                if data:
                    sock.sendall(_frame(data) + b"0\r\n\r\n" if chunked else data)
                elif parts is not None:
                    for part in parts:
                        if part:
                            sock.sendall(_frame(part) if chunked else part)
                    if chunked:
                        sock.sendall(b"0\r\n\r\n")
                elif chunked:
                    sock.sendall(b"0\r\n\r\n")
            except TimeoutError as exc:
                raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
            except OSError as exc:
                if reused:
                    raise _Stale from exc
                raise httpcore.WriteError(str(exc)) from exc
            conn.set_timeout(timeouts.get("read"))
            while not msg.head_done:
                received = _recv(sock)
                if not received:
                    raise httpcore.RemoteProtocolError(
                        "Server disconnected without sending a response."
                    )
                msg.feed(received)
            msg.after_head(out.head_only)
        except BaseException:
            conn.close()
            raise
        if msg.complete:
            self._release(conn, msg.keep_alive(out.close))
            return msg.response(Done(msg.take()), conn)
        return msg.response(_SyncBody(self, conn, msg, out.close), conn)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(_READ_SIZE)
    except TimeoutError as exc:
        raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
    except OSError as exc:
        raise httpcore.ReadError(str(exc)) from exc


class _SyncBody:
    """A response body still arriving on its connection."""

    __slots__ = ("_close", "_conn", "_msg", "_pool")

    def __init__(self, pool: SyncPool, conn: _SyncConn, msg: _Message, close: bool) -> None:
        self._pool: SyncPool | None = pool
        self._conn = conn
        self._msg = msg
        self._close = close

    def __iter__(self) -> Iterator[bytes]:
        msg = self._msg
        while True:
            if msg.chunks:
                yield from msg.take()
            if msg.complete or self._pool is None:
                self._finish()
                return
            try:
                data = _recv(self._conn.sock)
                if not data:
                    if msg.until_eof:
                        msg.complete = True
                        continue
                    raise httpcore.RemoteProtocolError(
                        "peer closed connection without sending complete message body"
                    )
                msg.feed(data)
            except BaseException:
                self.close()
                raise

    def _finish(self) -> None:
        pool = self._pool
        self._msg.release()
        if pool is not None:
            self._pool = None
            pool._release(self._conn, self._msg.complete and self._msg.keep_alive(self._close))

    def close(self) -> None:
        pool = self._pool
        if pool is not None:
            self._pool = None
            pool._release(self._conn, False)  # not fully read: never reused

    def __del__(self) -> None:
        self.close()  # dropped unread: the connection is not left counted as busy


# -- async (asyncio) --------------------------------------------------------------------------


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _AsyncConn(asyncio.Protocol):
    """One connection: an asyncio protocol feeding the current response's parser."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.msg: _Message | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.lost = False
        self.eof = False
        self.paused = False
        self.write_paused = False
        self.idle_since = 0.0
        self.uses = 0

    # protocol callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        msg = self.msg
        if msg is None:  # data while idle: the connection is unusable
            self.lost = True
            assert self.transport is not None
            self.transport.close()
            return
        try:
            msg.feed(data)
        except httpcore.RemoteProtocolError as exc:
            self.error = exc
            self.lost = True
            assert self.transport is not None
            self.transport.close()
        if msg.pending > _PAUSE_AT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # driver side ----------------------------------------------------------------------------

    async def wait(self, timeout: float | None) -> None:
        """Until the next protocol event; ``TimeoutError`` after ``timeout``."""
        waiter = self.loop.create_future()
        self.waiter = waiter
        if timeout is None:
            try:
                await waiter
            finally:
                self.waiter = None
            return
        handle = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self.waiter = None
            handle.cancel()

    def get_extra_info(self, info: str) -> Any:
        """As :meth:`_SyncConn.get_extra_info`, from the asyncio transport."""
        transport = self.transport
        if transport is None:
            return None
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "is_readable":
            return self.lost or self.eof
        if info in ("ssl_object", "socket"):
            return transport.get_extra_info(info)
        return None

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            try:
                self.transport.close()
            except RuntimeError:
                pass  # its event loop is closed (a client used across asyncio.run calls)


class AsyncPool(_Pool["_AsyncConn"]):
    """HTTP/1.1 keep-alive connections to one endpoint on asyncio; shared by every task.

    Checking out and returning a connection is a deque operation: the pool does not slow
    down with many requests in flight."""

    def _checkout(self, loop: asyncio.AbstractEventLoop) -> _AsyncConn | None:
        idle = self._idle
        expiry = self.keepalive_expiry
        while idle:
            conn = idle.pop()
            if conn.lost or conn.eof or conn.loop is not loop:
                conn.close()
                continue
            if expiry is not None and self.clock() - conn.idle_since > expiry:
                conn.close()
                while idle:  # the others were idle longer still
                    idle.popleft().close()
                return None
            return conn
        return None

    def _release(self, conn: _AsyncConn, reuse: bool) -> None:
        self._active -= 1
        conn.msg = None
        limit = self.max_requests
        if limit and conn.uses >= limit:
            reuse = False
        if reuse and not conn.lost and not self._closed and len(self._idle) < self.max_idle:
            conn.idle_since = self.clock()
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.popleft().close()

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, timeouts: dict[str, float | None]
    ) -> _AsyncConn:
        ctx = self.ssl_context
        if ctx is not None:
            ctx.set_alpn_protocols(_ALPN)
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                _, conn = await loop.create_connection(
                    lambda: _AsyncConn(loop),
                    self.host,
                    self.port,
                    ssl=ctx,
                    server_hostname=(self.sni or self.host) if ctx is not None else None,
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc) or "connect timed out") from exc
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return conn

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        out = _Out(request)
        loop = asyncio.get_running_loop()
        self._active += 1
        try:
            conn = self._checkout(loop)
            if conn is not None:
                try:
                    return await self._exchange(conn, out, True)
                except _Stale as exc:
                    # The server had closed it: once more on a fresh connection (a body
                    # from an iterator cannot be sent twice).
                    if out.parts is not None:
                        raise httpcore.RemoteProtocolError("keep-alive connection closed") from exc
            conn = await self._connect(loop, out.timeouts)
            return await self._exchange(conn, out, False)
        except BaseException:
            self._active -= 1
            raise

    async def _exchange(self, conn: _AsyncConn, out: _Out, reused: bool) -> httpcore.Response:
        msg = _Message()
        conn.msg = msg
        conn.uses += 1
        transport = conn.transport
        assert transport is not None
        timeouts = out.timeouts
        try:
            if conn.lost:
                if reused:
                    raise _Stale
                raise httpcore.WriteError("connection closed")
            transport.write(out.head)
            data, parts, chunked = out.data, out.parts, out.chunked
            if data:
                transport.write(_frame(data) + b"0\r\n\r\n" if chunked else data)
            elif parts is not None:
                async for part in _aiter(parts):
                    if part:
                        transport.write(_frame(part) if chunked else part)
                        await self._drain(conn, timeouts)
                if chunked:
                    transport.write(b"0\r\n\r\n")
            elif chunked:
                transport.write(b"0\r\n\r\n")
            if conn.write_paused:
                await self._drain(conn, timeouts)
            read = timeouts.get("read")
            while not msg.head_done:
                if conn.error is not None and not isinstance(conn.error, OSError):
                    raise conn.error
                if conn.eof:
                    if conn.error is not None:
                        raise httpcore.ReadError(str(conn.error)) from conn.error
                    raise httpcore.RemoteProtocolError(
                        "Server disconnected without sending a response."
                    )
                try:
                    await conn.wait(read)
                except TimeoutError as exc:
                    raise httpcore.ReadTimeout("read timed out") from exc
            msg.after_head(out.head_only)
        except BaseException:
            conn.close()
            raise
        if msg.complete:
            self._release(conn, msg.keep_alive(out.close))
            return msg.response(Done(msg.take()), conn)
        return msg.response(_AsyncBody(self, conn, msg, out.close, timeouts.get("read")), conn)

    @staticmethod
    async def _drain(conn: _AsyncConn, timeouts: dict[str, float | None]) -> None:
        while conn.write_paused and not conn.lost:
            try:
                await conn.wait(timeouts.get("write"))
            except TimeoutError as exc:
                raise httpcore.WriteTimeout("write timed out") from exc
        error = conn.error
        if conn.lost and isinstance(error, OSError) and conn.msg and not conn.msg.got_bytes:
            raise httpcore.WriteError(str(error)) from error


async def _aiter(parts: Iterable[bytes] | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if hasattr(parts, "__aiter__"):
        async for part in parts:  # type: ignore[union-attr]
            yield part
    else:
        for part in parts:  # type: ignore[union-attr]
            yield part


class _AsyncBody:
    """A response body still arriving on its asyncio connection."""

    __slots__ = ("_close", "_conn", "_msg", "_pool", "_read")

    def __init__(
        self,
        pool: AsyncPool,
        conn: _AsyncConn,
        msg: _Message,
        close: bool,
        read: float | None,
    ) -> None:
        self._pool: AsyncPool | None = pool
        self._conn = conn
        self._msg = msg
        self._close = close
        self._read = read

    async def __aiter__(self) -> AsyncIterator[bytes]:
        msg = self._msg
        conn = self._conn
        while True:
            if msg.chunks:
                for chunk in msg.take():
                    yield chunk
                conn.resume()
            if msg.complete or self._pool is None:
                self._finish()
                return
            try:
                if conn.error is not None and not isinstance(conn.error, OSError):
                    raise conn.error
                if conn.eof:
                    if msg.until_eof and conn.error is None:
                        msg.complete = True
                        continue
                    if conn.error is not None:
                        raise httpcore.ReadError(str(conn.error)) from conn.error
                    raise httpcore.RemoteProtocolError(
                        "peer closed connection without sending complete message body"
                    )
                try:
                    await conn.wait(self._read)
                except TimeoutError as exc:
                    raise httpcore.ReadTimeout("read timed out") from exc
            except BaseException:
                self._abort()
                raise

    def _finish(self) -> None:
        pool = self._pool
        self._msg.release()
        if pool is not None:
            self._pool = None
            pool._release(self._conn, self._msg.complete and self._msg.keep_alive(self._close))

    def _abort(self) -> None:
        pool = self._pool
        if pool is not None:
            self._pool = None
            pool._release(self._conn, False)

    async def aclose(self) -> None:
        self._abort()

    def __del__(self) -> None:
        # Dropped unread: give the slot back; close the connection on its own loop (the
        # garbage collector may run this in any thread).
        pool = self._pool
        if pool is not None:
            self._pool = None
            pool._active -= 1
            conn = self._conn
            conn.lost = True
            try:
                conn.loop.call_soon_threadsafe(conn.close)
            except RuntimeError:
                pass  # the loop is closed: its transports are gone with it
