"""The workload's admin HTTP endpoint (Istio's 15000-style), stdlib only, on a daemon thread.

Endpoints (all ``GET``):

- ``/ready``: 200 ``LIVE`` once every subscribed xDS resource got its first answer, else 503.
- ``/config_dump``: JSON: node, xDS connections, every subscribed resource with status,
  version, last NACK and its config as Envoy JSON.
- ``/clusters``: JSON: per cluster, endpoints with health, outlier ejection, active requests,
  and the circuit breaker's thresholds and counters.
- ``/stats``: ``name: value`` text counters (Prometheus lives with telemetry).
- ``/certs``: JSON: per certificate provider, the workload certificate (SPIFFE ID, serial,
  validity) and the trust bundle.
- ``/``: the list of endpoints.

It listens on loopback by default, off the application's ports, answers each request on its
own daemon thread, and :meth:`AdminServer.stop` shuts it down and joins its thread. Bounds:
at most :data:`MAX_CONCURRENT` requests are answered at once (more get a quick 503), a
client that sends nothing for :data:`SOCKET_TIMEOUT` seconds is dropped, and reading the xDS
client's state is bounded by its work serializer's own timeout.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pymesh.admin._views import (
    StatusSource,
    certs_view,
    clusters_view,
    config_dump_view,
    ready,
    stats_text,
)
from pymesh.core.runtime import MeshRuntime
from pymesh.errors import ConfigError, PymeshError, XdsError

if TYPE_CHECKING:  # pymesh.security (cryptography) loads when a certificate provider exists
    from pymesh.security import CertificateProvider

__all__ = ["ENDPOINTS", "MAX_CONCURRENT", "SOCKET_TIMEOUT", "AdminServer"]

MAX_CONCURRENT = 8
"""Requests answered at once; more are refused with 503 at once."""
SOCKET_TIMEOUT = 10.0
"""Seconds a connection may stay silent before it is dropped."""

ENDPOINTS = {
    "/ready": "readiness: 200 once the first xDS config arrived, else 503",
    "/config_dump": "decoded xDS config per resource, with status and version (JSON)",
    "/clusters": "clusters, endpoints, health, outlier ejection, circuit breakers (JSON)",
    "/stats": "text counters",
    "/certs": "workload certificate and trust bundle (JSON)",
}


def _bootstrap_providers(client: StatusSource) -> dict[str, CertificateProvider]:
    """A non-polling ``file_watcher`` provider per bootstrap instance (re-read on demand)."""
    out: dict[str, CertificateProvider] = {}
    for name, instance in client.bootstrap.certificate_providers.items():
        config = instance.file_watcher
        if config is None:
            continue
        from pymesh.security import FileWatcherProvider

        try:
            out[name] = FileWatcherProvider.from_config(config, start=False)
        except ConfigError:
            continue
    return out


class AdminServer:
    """The admin endpoint of one xDS client (and its :class:`MeshRuntime`).

    ``runtime`` defaults to ``MeshRuntime.for_client(client)`` (the one the adapters share);
    ``providers`` to the bootstrap's ``file_watcher`` certificate providers (re-read at each
    ``/certs``). ``port=0`` picks a free port (see :attr:`port`); ``listener``: a socket
    already bound and listening to serve on instead (``host`` / ``port`` ignored).
    ``csds_port`` also serves the CSDS gRPC service for ``client`` on ``host:csds_port``
    (0: a free port, see :attr:`csds_port`).
    """

    def __init__(
        self,
        client: StatusSource,
        *,
        host: str = "127.0.0.1",
        port: int = 15000,
        runtime: MeshRuntime | None = None,
        providers: Mapping[str, CertificateProvider] | None = None,
        csds_port: int | None = None,
        clock: Callable[[], float] = time.time,
        listener: socket.socket | None = None,
    ) -> None:
        self._client = client
        if runtime is None:
            from pymesh.xds.client import XdsClient

            if isinstance(client, XdsClient):
                runtime = MeshRuntime.for_client(client)
        self._runtime = runtime
        self._own_providers = providers is None
        self._providers: Mapping[str, CertificateProvider] = (
            _bootstrap_providers(client) if providers is None else providers
        )
        self._clock = clock
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        admin = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pymesh-admin"
            timeout = SOCKET_TIMEOUT

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                admin._dispatch(self)

        if listener is not None:  # already bound and listening (see pymesh.admin._auto)
            self._httpd = ThreadingHTTPServer(
                listener.getsockname()[:2], Handler, bind_and_activate=False
            )
            self._httpd.socket.close()
            self._httpd.socket = listener
            self._httpd.server_address = listener.getsockname()
        else:
            try:
                self._httpd = ThreadingHTTPServer((host, port), Handler)
            except OSError as exc:
                raise PymeshError(f"admin endpoint: cannot listen on {host}:{port}: {exc}") from exc
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="pymesh-admin", daemon=True
        )
        self._grpc_server: Any = None
        self._csds_port: int | None = None
        if csds_port is not None:
            self._start_csds(host, csds_port)
        self._started = False
        self._stopped = False

    def _start_csds(self, host: str, port: int) -> None:
        from pymesh.xds.transport.csds import serve_csds

        try:
            self._grpc_server, self._csds_port = serve_csds(self._client, host, port)
        except XdsError as exc:
            self._httpd.server_close()
            raise PymeshError(f"admin endpoint: {exc}") from exc

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the admin endpoint (what ``pymesh proxy-config`` takes; an IPv6
        host in brackets)."""
        host = self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def csds_port(self) -> int | None:
        return self._csds_port

    def start(self) -> AdminServer:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and join the thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            self._httpd.shutdown()
        self._httpd.server_close()
        if self._started:
            self._thread.join(timeout=5)
        if self._grpc_server is not None:
            self._grpc_server.stop(None).wait(5)
        if self._own_providers:
            for p in self._providers.values():
                p.close()

    def __enter__(self) -> AdminServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests -------------------------------------------------------------------------

    def _certs(self) -> list[dict[str, Any]]:
        from pymesh.security import FileWatcherProvider

        for p in self._providers.values():
            if self._own_providers and isinstance(p, FileWatcherProvider):
                p.poll()
        return certs_view(self._providers, self._clock())

    def _dispatch(self, req: BaseHTTPRequestHandler) -> None:
        if not self._slots.acquire(blocking=False):
            _send_json(req, 503, {"error": "busy: too many admin requests at once"})
            return
        try:
            self._answer(req)
        finally:
            self._slots.release()

    def _answer(self, req: BaseHTTPRequestHandler) -> None:
        path = urlsplit(req.path).path.rstrip("/") or "/"
        try:
            if path == "/ready":
                ok, text = ready(self._client)
                _send(req, 200 if ok else 503, "text/plain", f"{text}\n".encode())
            elif path == "/config_dump":
                _send_json(req, 200, config_dump_view(self._client))
            elif path == "/clusters":
                runtime = self._runtime
                _send_json(req, 200, clusters_view(runtime) if runtime is not None else [])
            elif path == "/stats":
                _send(req, 200, "text/plain", stats_text(self._client, self._runtime).encode())
            elif path == "/certs":
                _send_json(req, 200, self._certs())
            elif path == "/":
                _send_json(req, 200, ENDPOINTS)
            else:
                _send_json(req, 404, {"error": f"no endpoint {path}", "endpoints": ENDPOINTS})
        except Exception as exc:  # an admin request must never take the server down
            _send_json(req, 500, {"error": f"{type(exc).__name__}: {exc}"})


def _send(req: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes) -> None:
    req.send_response(code)
    req.send_header("Content-Type", ctype)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def _send_json(req: BaseHTTPRequestHandler, code: int, value: object) -> None:
    _send(req, code, "application/json", json.dumps(value, indent=2, default=str).encode())
