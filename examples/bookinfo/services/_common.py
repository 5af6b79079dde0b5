"""What every Bookinfo service shares: its identity agent, header propagation, a tiny ASGI
toolkit (no web framework: the services are small), request counters, and the process loop.

A service process is started by the launcher (:mod:`examples.bookinfo.launcher`) with
``GRPC_XDS_BOOTSTRAP`` naming its bootstrap (node labels ``app``/``version``, its service
account, its ports, a ``file_watcher`` certificate provider on ``--cert-dir``) and a token for
the control plane's CA. Before serving, :class:`IdentityAgent` does what Istio's agent does for
a proxyless workload: it gets a certificate for the workload's SPIFFE identity from the CA
(CSR + token), writes Istio's three files into the cert dir and rewrites them at every renewal.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pymesh.security import CaClientProvider, CertificateBundle, SpiffeId

__all__ = [
    "FORWARD_HEADERS",
    "IdentityAgent",
    "Request",
    "Stats",
    "forward_headers",
    "json_response",
    "respond",
    "run_until_signalled",
]

log = logging.getLogger("bookinfo")
access_log = logging.getLogger("bookinfo.access")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

FORWARD_HEADERS = (
    # The headers Bookinfo's services propagate (productpage.py getForwardHeaders, the
    # reviews service's headers_to_propagate), in their order.
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "sw8",
    "end-user",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
)


def forward_headers(
    headers: Mapping[str, str], names: Iterable[str] = FORWARD_HEADERS
) -> dict[str, str]:
    """The incoming headers a service passes on to the services it calls."""
    return {name: headers[name] for name in names if name in headers}


class Request:
    """The parts of an ASGI HTTP request the services read."""

    def __init__(self, scope: Scope, body: bytes) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: str = scope.get("query_string", b"").decode("latin-1")
        self.headers: dict[str, str] = {}
        for key, value in scope.get("headers", ()):
            name = key.decode("latin-1").lower()
            text = value.decode("latin-1")
            self.headers[name] = f"{self.headers[name]}, {text}" if name in self.headers else text
        self.body = body

    @classmethod
    async def read(cls, scope: Scope, receive: Receive) -> Request:
        chunks = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return cls(scope, b"".join(chunks))


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def json_response(send: Send, status: int, value: object) -> None:
    await respond(send, status, json.dumps(value).encode(), "application/json")


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class Stats:
    """Requests served by this process, per path, written to ``path`` (JSON) after every
    request, so the launcher (and tests) can read them without going through the mesh,
    whatever its policies are."""

    def __init__(self, path: Path | None, name: str) -> None:
        self.path = path
        self.name = name
        self.total = 0
        self.by_path: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.last_headers: dict[str, str] = {}
        self._lock = threading.Lock()

    def count(self, path: str, status: int, headers: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self.total += 1
            self.by_path[path] += 1
            self.by_status[status] += 1
            if headers is not None:
                self.last_headers = forward_headers(headers)
            try:
                self._write_locked()
            except OSError:
                pass

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict[str, object]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "time": time.time(),
            "requests": self.total,
            "paths": dict(self.by_path),
            "statuses": {str(k): v for k, v in self.by_status.items()},
            "last_headers": dict(self.last_headers),
        }

    def write(self) -> None:
        with self._lock:
            self._write_locked()

    def _write_locked(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._snapshot_locked()))
        os.replace(tmp, self.path)

    def start(self) -> None:
        self.write()

    def stop(self) -> None:
        try:
            self.write()
        except OSError:
            pass


def counted(app: Callable[[Scope, Receive, Send], Awaitable[None]], stats: Stats) -> Any:
    """Wrap an ASGI app so that every HTTP response is counted in ``stats``."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        counted_already = False

        def count(status: int) -> None:
            # before the response goes out: whoever got the answer can read the count
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            stats.count(scope["path"], status, headers)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    '"%s %s" %d end-user=%s x-request-id=%s',
                    scope["method"],
                    scope["path"],
                    status,
                    headers.get("end-user", "-"),
                    headers.get("x-request-id", "-"),
                )

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal counted_already
            if message["type"] == "http.response.start" and not counted_already:
                counted_already = True
                count(message["status"])
            await send(message)

        try:
            await app(scope, receive, counting_send)
        finally:
            if not counted_already:
                count(500)

    return wrapper


class IdentityAgent:
    """Istio's agent for this workload: certificates from the CA, written as Istio's files."""

    def __init__(
        self, ca_address: str, identity: SpiffeId, token_file: Path, cert_dir: Path, ttl: float
    ) -> None:
        self.cert_dir = cert_dir
        self._lock = threading.Lock()
        self._written: CertificateBundle | None = None
        cert_dir.mkdir(parents=True, exist_ok=True)
        self.provider = CaClientProvider(ca_address, identity, token=token_file, ttl=ttl)
        self.provider.subscribe(self._write)

    def start(self, timeout: float = 20.0) -> None:
        bundle = self.provider.wait_ready(timeout)
        self._write(bundle)

    def _write(self, bundle: CertificateBundle) -> None:
        # the subscriber (renewals) and start() may both write: once per bundle, one at a time
        with self._lock:
            if self._written is bundle:
                return
            # key first, then the chain: the file watcher skips a chain not matching its key
            for name, data in (
                ("key.pem", bundle.key_pem),
                ("root-cert.pem", bundle.roots_pem),
                ("cert-chain.pem", bundle.chain_pem),
            ):
                tmp = self.cert_dir / f".{name}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.cert_dir / name)
            self._written = bundle

    def close(self) -> None:
        self.provider.close()


def run_until_signalled(stop: Callable[[], None], parent_pid: int | None = None) -> None:
    """Block the main thread until SIGTERM/SIGINT (or the parent process is gone), then call
    ``stop``. Services run their servers on threads, so this is the whole main loop."""
    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not done.wait(0.5):
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("launcher %d is gone: stopping", parent_pid)
            break
    stop()
