"""Byte forwarders next to grpcio: the gRPC client's TLS tunnel and the gRPC server's
PERMISSIVE front listener, all on one epoll thread (``pymesh-tunnel``).

grpcio's C-core owns its sockets, and Python cannot hook its TLS (no URI SAN check on the
client, no ClientHello detection on the server). Both gaps are closed by putting a small
pymesh-owned hop next to grpcio:

- :class:`TlsTunnel` (client): grpcio speaks plaintext HTTP/2 to a Unix socket in a private
  directory (mode 0700: no other local user can borrow the workload identity through it); each
  accepted connection opens one TLS connection to the endpoint with a
  :class:`~pymesh.security.MeshSSLContext` (chain against the trust bundle, URI SAN against
  ``match_subject_alt_names``, rotation). One grpcio connection = one TLS connection.
- :class:`PermissiveFront` (server): the public port. It reads the first bytes of each
  connection, TLS (a ClientHello record, ``0x16``) or not, asks ``admit`` whether that
  transport may be served now (STRICT refuses plaintext, DISABLE refuses TLS), and forwards
  the raw bytes to one of two internal grpcio ports on loopback (TLS is terminated by grpcio
  itself, so ``auth_context`` carries the client certificate). It records which internal
  connection came from which client (:meth:`PermissiveFront.origin`) so that RBAC sees the
  real peer address.

Why a hand-written epoll loop: plain non-blocking sockets and ``SSLSocket`` reads/writes run
in C, much less Python per message than asyncio's SSL protocol and transports (measured:
about 30 µs per unary call less for the tunnel); the rest of the cost is the extra local hop
itself (socket calls and thread wake-ups, see docs/mtls.md).

Bounds: ``max_connections`` per listener (more are closed at once), a connect (and, for the
front, first-byte) timeout, and flow control between the two sides: nothing is read from a
side until the other side is connected, and each direction holds at most one unsent chunk,
during which its source is not read. Closing a listener closes its connections; the loop
thread ends when the last listener closes.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ForwardStats", "PermissiveFront", "TlsTunnel"]

_log = logging.getLogger("pymesh.security")

CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 1024
TLS_RECORD_HANDSHAKE = 0x16


class ForwardStats:
    """Counters of one forwarder (read without a lock: monotonic ints)."""

    __slots__ = ("accepted", "active", "last_error", "plaintext", "refused", "tls")

    def __init__(self) -> None:
        self.accepted = 0
        self.active = 0
        self.refused = 0  # connections closed before forwarding (policy, limit, failed connect)
        self.tls = 0
        self.plaintext = 0
        self.last_error = ""


class _Pipe:
    """One tunnel connection on the selector thread: ``down`` (grpcio's Unix socket) and
    ``up`` (the TLS socket to the endpoint). Each direction keeps at most one unsent chunk;
    while it is pending its source is not read (flow control)."""

    __slots__ = ("deadline", "down", "ev_down", "ev_up", "out_down", "out_up", "state", "up")

    def __init__(self, down: socket.socket, up: Any, deadline: float) -> None:
        self.down = down
        self.up = up  # the raw socket while connecting, then its SSLSocket
        self.state = "connect"  # connect -> handshake -> open
        self.out_up = b""  # from down, not yet written to up
        self.out_down = b""  # from up, not yet written to down
        self.deadline = deadline
        self.ev_up = -1  # the selector events registered now (-1: unknown)
        self.ev_down = -1


class _TunnelLoop:
    """The selector thread of every :class:`TlsTunnel` (refcounted, like :class:`_Loop`).

    Plain non-blocking sockets and ``SSLSocket`` reads/writes in C: much less Python per
    byte than asyncio's SSL protocol, which matters on a per-RPC path."""

    _lock = threading.Lock()
    _instance: _TunnelLoop | None = None
    _users = 0

    @classmethod
    def acquire(cls) -> _TunnelLoop:
        with cls._lock:
            if cls._instance is None:
                cls._instance = _TunnelLoop()
            cls._users += 1
            return cls._instance

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users > 0 or cls._instance is None:
                return
            loop, cls._instance = cls._instance, None
        loop.stop()

    READ = select.EPOLLIN
    WRITE = select.EPOLLOUT

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fds: dict[int, tuple[socket.socket, int, Any, Any]] = {}  # fd -> sock, ev, h, arg
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._calls: list[Callable[[], None]] = []
        self._calls_lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="pymesh-tunnel", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the selector thread."""
        with self._calls_lock:
            self._calls.append(fn)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def call_wait(self, fn: Callable[[], None], timeout: float = 5.0) -> None:
        if threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self.call(run)
        done.wait(timeout)

    def stop(self) -> None:
        def halt() -> None:
            self._running = False

        self.call(halt)
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    # -- the loop (selector thread only) -------------------------------------------------

    def register(self, sock: socket.socket, events: int, data: Any) -> None:
        fd = sock.fileno()
        if fd < 0:
            return
        handler, arg = data
        found = self._fds.get(fd)
        self._fds[fd] = (sock, events, handler, arg)
        try:
            if found is None:
                self._epoll.register(fd, events)
            elif found[1] != events:
                self._epoll.modify(fd, events)
        except FileExistsError:  # a stale entry (closed without unregister): take it over
            self._epoll.modify(fd, events)
        except FileNotFoundError:
            self._epoll.register(fd, events)

    def pipe_interest(self, pipe: Any, on_up: Any, on_down: Any) -> None:
        """Register both sockets of an open pipe (a tunnel's or the PERMISSIVE front's) for
        what they wait for now: a side is read only while nothing from it waits to be
        written to the other side; registrations change only when the events do."""
        read, write = self.READ, self.WRITE
        ev = (0 if pipe.out_down else read) | (write if pipe.out_up else 0)
        if ev != pipe.ev_up:
            pipe.ev_up = ev
            if ev:
                self.register(pipe.up, ev, (on_up, pipe))
            else:
                self.unregister(pipe.up)
        ev = (0 if pipe.out_up else read) | (write if pipe.out_down else 0)
        if ev != pipe.ev_down:
            pipe.ev_down = ev
            if ev:
                self.register(pipe.down, ev, (on_down, pipe))
            else:
                self.unregister(pipe.down)

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._fds.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def _run_calls(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            try:
                fn()
            except Exception:
                _log.exception("tunnel loop call failed")

    def _run(self) -> None:
        import time

        wake = self._wake_r.fileno()
        fds = self._fds
        errors = select.EPOLLERR | select.EPOLLHUP
        both = self.READ | self.WRITE
        next_sweep = time.monotonic() + 1.0
        while self._running:
            try:
                events = self._epoll.poll(1.0)
            except OSError:
                continue
            for fd, mask in events:
                if fd == wake:
                    self._run_calls()
                    continue
                found = fds.get(fd)
                if found is None:
                    continue
                sock, _ev, handler, arg = found
                if mask & errors:
                    mask |= both  # let the handler meet the error in recv/send/SO_ERROR
                try:
                    handler(arg, sock, mask)
                except Exception:
                    _log.exception("tunnel loop handler failed")
            now = time.monotonic()
            if now >= next_sweep:  # connect / handshake timeouts, once a second
                next_sweep = now + 1.0
                for _sock, _ev, handler, arg in list(fds.values()):
                    if (
                        isinstance(arg, _Pipe | _FrontPipe)
                        and arg.state in ("connect", "handshake", "peek")
                        and now > arg.deadline
                    ):
                        handler.__self__.fail(arg, TimeoutError("connect / first byte timed out"))
        for sock, _ev, _h, _a in list(fds.values()):
            sock.close()
        fds.clear()
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()


class TlsTunnel:
    """A Unix socket (``target`` for ``grpc.insecure_channel``) whose connections are
    forwarded over TLS to ``host:port`` with ``context`` (see the module doc).

    ``context()`` is called per connection: a :class:`~pymesh.security.MeshSSLContext`
    answers the current certificate. ``server_hostname`` is sent as SNI (``None``: none).
    """

    def __init__(
        self,
        host: str,
        port: int,
        context: Callable[[], ssl.SSLContext],
        *,
        server_hostname: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.name = f"grpc TLS tunnel to {host}:{port}"
        self.endpoint = (host, port)
        self.stats = ForwardStats()
        self.peer_certificates: collections.deque[bytes] = collections.deque(maxlen=64)
        """DER of the server certificates of the latest verified handshakes."""
        self._host, self._port = host, port
        self._context = context
        self._sni = server_hostname
        self._max = max_connections
        self._pipes: set[_Pipe] = set()
        self._closed = False
        self._dir = tempfile.mkdtemp(prefix="pymesh-grpc-")  # 0700
        self.path = os.path.join(self._dir, "tunnel.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            self._listener.listen(128)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._loop = _TunnelLoop.acquire()
        self._READ, self._WRITE = _TunnelLoop.READ, _TunnelLoop.WRITE
        self._loop.call(
            lambda: self._loop.register(self._listener, self._READ, (self._accept, None))
        )

    @property
    def target(self) -> str:
        """The grpcio target of the tunnel (``unix:PATH``)."""
        return f"unix:{self.path}"

    # -- selector thread ----------------------------------------------------------------

    def _accept(self, _: Any, sock: Any, mask: int) -> None:
        import time

        for _i in range(64):
            try:
                down, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.stats.accepted += 1
            if self._closed or len(self._pipes) >= self._max:
                self.stats.refused += 1
                down.close()
                continue
            down.setblocking(False)
            try:
                raw = socket.socket(
                    socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM
                )
                raw.setblocking(False)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    raw.connect((self._host, self._port))
                except BlockingIOError:
                    pass
                up = raw
            except (OSError, ValueError) as exc:
                down.close()
                self.stats.refused += 1
                self.stats.last_error = str(exc)
                continue
            pipe = _Pipe(down, up, time.monotonic() + CONNECT_TIMEOUT)
            self._pipes.add(pipe)
            self.stats.active = len(self._pipes)
            self._loop.register(up, self._WRITE, (self._on_up, pipe))

    def fail(self, pipe: _Pipe, exc: BaseException) -> None:
        if pipe.state != "open":
            self.stats.refused += 1
            self.stats.last_error = str(exc) or type(exc).__name__
            _log.warning("%s: connection refused: %s", self.name, self.stats.last_error)
        self._drop(pipe)

    def _drop(self, pipe: _Pipe) -> None:
        self._pipes.discard(pipe)  # bookkeeping first (see PermissiveFront._drop)
        self.stats.active = len(self._pipes)
        pipe.state = "closed"
        for sock in (pipe.down, pipe.up):
            self._loop.unregister(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _interest(self, pipe: _Pipe) -> None:
        """Register both sockets for what they wait for now (open state)."""
        if pipe.state != "open":
            return
        self._loop.pipe_interest(pipe, self._on_up, self._on_down)

    def _on_up(self, pipe: _Pipe, sock: Any, mask: int) -> None:
        if pipe.state == "closed":
            return
        if pipe.state == "connect":
            err = pipe.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(pipe, OSError(err, os.strerror(err)))
                return
            self._loop.unregister(pipe.up)
            try:
                pipe.up = self._context().wrap_socket(
                    pipe.up, server_hostname=self._sni, do_handshake_on_connect=False
                )
            except Exception as exc:  # no usable context: refuse, never connect in clear
                pipe.up.close()
                self.fail(pipe, exc)
                return
            pipe.state = "handshake"
        if pipe.state == "handshake":
            try:
                pipe.up.do_handshake()
            except ssl.SSLWantReadError:
                self._loop.register(pipe.up, self._READ, (self._on_up, pipe))
                return
            except ssl.SSLWantWriteError:
                self._loop.register(pipe.up, self._WRITE, (self._on_up, pipe))
                return
            except (ssl.SSLError, OSError, ValueError) as exc:
                self.fail(pipe, exc)
                return
            pipe.state = "open"
            self.stats.tls += 1
            der = pipe.up.getpeercert(True)
            if der:
                self.peer_certificates.append(der)
            self._interest(pipe)
            return
        try:
            if mask & self._WRITE and pipe.out_up:
                n = pipe.up.send(pipe.out_up)
                pipe.out_up = pipe.out_up[n:]
            if mask & self._READ and not pipe.out_down:
                chunks: list[bytes] = []
                while True:
                    data = pipe.up.recv(262144)
                    if not data:
                        if not chunks:
                            self._drop(pipe)
                            return
                        break
                    chunks.append(data)
                    if not pipe.up.pending():
                        break
                self._write_down(pipe, b"".join(chunks))
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except (ssl.SSLError, OSError, ValueError):
            self._drop(pipe)
            return
        self._interest(pipe)

    def _write_down(self, pipe: _Pipe, data: bytes) -> None:
        try:
            n = pipe.down.send(data)
        except BlockingIOError:
            n = 0
        pipe.out_down = data[n:]

    def _on_down(self, pipe: _Pipe, sock: Any, mask: int) -> None:
        if pipe.state != "open":
            return
        try:
            if mask & self._WRITE and pipe.out_down:
                n = pipe.down.send(pipe.out_down)
                pipe.out_down = pipe.out_down[n:]
                if not pipe.out_down and pipe.up.pending():  # TLS data already decrypted
                    self._on_up(pipe, None, self._READ)
                    return
            if mask & self._READ and not pipe.out_up:
                data = pipe.down.recv(262144)
                if not data:
                    self._drop(pipe)
                    return
                try:
                    n = pipe.up.send(data)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    n = 0
                pipe.out_up = data[n:]
        except BlockingIOError:
            pass
        except (ssl.SSLError, OSError, ValueError):
            self._drop(pipe)
            return
        self._interest(pipe)

    # -- any thread ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting and close every tunnel connection."""
        if self._closed:
            return
        self._closed = True

        def stop() -> None:
            self._loop.unregister(self._listener)
            self._listener.close()
            for pipe in list(self._pipes):
                self._drop(pipe)

        self._loop.call_wait(stop)
        _TunnelLoop.release()
        shutil.rmtree(self._dir, ignore_errors=True)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket: ``""`` binds the dual-stack wildcard (one port for IPv4 and
    IPv6) where the system has it, else the IPv4 one."""
    if host:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=1024)
    if socket.has_dualstack_ipv6():
        return socket.create_server(
            ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=1024
        )
    return socket.create_server(("", port), backlog=1024)


def _unmap(address: Any) -> tuple[str, int]:
    """(IP, port) of a socket address; IPv4-mapped IPv6 addresses as IPv4."""
    ip, port = str(address[0]), int(address[1])
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[len("::ffff:") :]
    return ip, port


Admit = Callable[[str, tuple[str, int], tuple[str, int]], bool]
"""``admit(transport, client_address, local_address)``: may a connection of this transport
(``"tls"`` / ``"raw_buffer"``) be served now?"""


class _FrontPipe:
    """One connection through the epoll front: ``down`` (the client), ``up`` (grpcio's
    internal port, once chosen). Same flow control as :class:`_Pipe`."""

    __slots__ = (
        "deadline",
        "down",
        "ev_down",
        "ev_up",
        "origin_key",
        "out_down",
        "out_up",
        "state",
        "up",
    )

    def __init__(self, down: socket.socket, deadline: float) -> None:
        self.down = down
        self.up: socket.socket | None = None
        self.state = "peek"  # peek -> connect -> open
        self.out_up = b""
        self.out_down = b""
        self.deadline = deadline
        self.ev_up = -1
        self.ev_down = -1
        self.origin_key: int | None = None


class PermissiveFront:
    """The public port of a PERMISSIVE gRPC server (see the module doc), on the tunnels'
    epoll thread (plain sockets both sides).

    ``tls_port`` / ``plain_port``: the internal grpcio ports on ``internal_host``.
    :meth:`origin` maps an internal connection's local port (grpcio's ``context.peer()``) to
    the client's address and transport.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls_port: int,
        plain_port: int,
        internal_host: str = "127.0.0.1",
        admit: Admit | None = None,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.stats = ForwardStats()
        self.timeout = timeout
        self._ports = {"tls": tls_port, "raw_buffer": plain_port}
        self._internal = internal_host
        self._admit = admit
        self._max = max_connections
        self._origins: dict[int, tuple[str, int, str]] = {}
        self._pipes: set[_FrontPipe] = set()
        self._closed = False
        self._accepting = True
        self._listener = _listen(host, port)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.name = f"PERMISSIVE front :{self.port}"
        self._loop = _TunnelLoop.acquire()
        self._R, self._W = _TunnelLoop.READ, _TunnelLoop.WRITE
        self._loop.call_wait(
            lambda: self._loop.register(self._listener, self._R, (self._accept, None))
        )

    def origin(self, local_port: int) -> tuple[str, int, str] | None:
        """(client IP, client port, transport) of the internal connection from
        ``local_port``; ``None`` for a connection not made by this front."""
        return self._origins.get(local_port)

    # -- epoll thread ---------------------------------------------------------------------

    def _accept(self, _: Any, sock: Any, mask: int) -> None:
        import time

        for _i in range(64):
            try:
                down, _addr = self._listener.accept()
            except OSError:
                return
            self.stats.accepted += 1
            if self._closed or len(self._pipes) >= self._max:
                self.stats.refused += 1
                down.close()
                continue
            down.setblocking(False)
            try:
                down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            pipe = _FrontPipe(down, time.monotonic() + self.timeout)
            self._pipes.add(pipe)
            self.stats.active = len(self._pipes)
            self._loop.register(down, self._R, (self._on_down, pipe))

    def fail(self, pipe: Any, exc: BaseException) -> None:
        self.stats.refused += 1
        self.stats.last_error = str(exc) or type(exc).__name__
        _log.warning("%s: connection refused: %s", self.name, self.stats.last_error)
        self._drop(pipe)

    def _drop(self, pipe: _FrontPipe) -> None:
        # bookkeeping first: a peer that sees the close may read the stats at once
        if pipe.origin_key is not None:
            self._origins.pop(pipe.origin_key, None)
        self._pipes.discard(pipe)
        self.stats.active = len(self._pipes)
        pipe.state = "closed"
        for s in (pipe.down, pipe.up):
            if s is not None:
                self._loop.unregister(s)
                try:
                    s.close()
                except OSError:
                    pass

    def _peek(self, pipe: _FrontPipe) -> None:
        try:
            first = pipe.down.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pipe)
            return
        if not first:
            self._drop(pipe)
            return
        transport = "tls" if first[0] == TLS_RECORD_HANDSHAKE else "raw_buffer"
        try:
            client = _unmap(pipe.down.getpeername())
            local = _unmap(pipe.down.getsockname())
        except OSError:
            self._drop(pipe)
            return
        if self._admit is not None and not self._admit(transport, client, local):
            try:  # read what was sent, so that closing sends a FIN, not a reset
                pipe.down.recv(65536)
            except OSError:
                pass
            self.fail(pipe, ConnectionRefusedError(f"{transport} not allowed by the listener"))
            return
        self._loop.unregister(pipe.down)  # not read until the internal side is connected
        pipe.ev_down = -1
        up = socket.socket(
            socket.AF_INET6 if ":" in self._internal else socket.AF_INET, socket.SOCK_STREAM
        )
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe.up = up
        pipe.state = "connect"
        try:
            up.connect((self._internal, self._ports[transport]))
        except BlockingIOError:
            pass
        except OSError as exc:
            self.fail(pipe, exc)
            return
        try:
            key = up.getsockname()[1]
        except OSError as exc:
            self.fail(pipe, exc)
            return
        self._origins[key] = (client[0], client[1], transport)
        pipe.origin_key = key
        if transport == "tls":
            self.stats.tls += 1
        else:
            self.stats.plaintext += 1
        self._loop.register(up, self._W, (self._on_up, pipe))

    def _interest(self, pipe: _FrontPipe) -> None:
        if pipe.state != "open" or pipe.up is None:
            return
        self._loop.pipe_interest(pipe, self._on_up, self._on_down)

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> bytes:
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        return data[n:]

    def _on_up(self, pipe: _FrontPipe, sock: Any, mask: int) -> None:
        up = pipe.up
        if pipe.state == "closed" or up is None:
            return
        if pipe.state == "connect":
            err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(pipe, OSError(err, os.strerror(err)))
                return
            pipe.state = "open"
            self._interest(pipe)
            return
        try:
            if mask & self._W and pipe.out_up:
                pipe.out_up = self._send(up, pipe.out_up)
            if mask & self._R and not pipe.out_down:
                data = up.recv(262144)
                if not data:
                    self._drop(pipe)
                    return
                pipe.out_down = self._send(pipe.down, data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(pipe)
            return
        self._interest(pipe)

    def _on_down(self, pipe: _FrontPipe, sock: Any, mask: int) -> None:
        if pipe.state == "peek":
            self._peek(pipe)
            return
        up = pipe.up
        if pipe.state != "open" or up is None:
            return
        try:
            if mask & self._W and pipe.out_down:
                pipe.out_down = self._send(pipe.down, pipe.out_down)
            if mask & self._R and not pipe.out_up:
                data = pipe.down.recv(262144)
                if not data:
                    self._drop(pipe)
                    return
                pipe.out_up = self._send(up, data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(pipe)
            return
        self._interest(pipe)

    # -- any thread -----------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Close the listening socket; connections already forwarded go on."""
        if not self._accepting or self._closed:
            return
        self._accepting = False

        def stop() -> None:
            self._loop.unregister(self._listener)
            self._listener.close()

        self._loop.call_wait(stop)

    def close(self) -> None:
        """Stop accepting and close every forwarded connection."""
        if self._closed:
            return
        self._closed = True

        def stop() -> None:
            if self._accepting:
                self._accepting = False
                self._loop.unregister(self._listener)
                self._listener.close()
            for pipe in list(self._pipes):
                self._drop(pipe)

        self._loop.call_wait(stop)
        _TunnelLoop.release()
