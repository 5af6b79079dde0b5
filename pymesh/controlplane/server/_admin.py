"""Admin HTTP server (Istio's monitoring port 15014 by default), stdlib only, on a thread.

Endpoints:

- ``GET /ready``: 200 once a good config is loaded, else 503.
- ``GET /debug/syncz``: JSON list of connected ADS streams, per type: subscription, version
  and nonce sent, version ACKed, last NACK (version, nonce, client's error message).
- ``GET /debug/configz``: JSON: config version, files, issues of the last load, last reload
  errors, auto-registered workloads, the loaded config.
- ``GET /metrics``: Prometheus text.
- ``POST /debug/health?proxy=NODE_ID&status=HEALTHY|UNHEALTHY|DRAINING``: set the health of an
  auto-registered workload (404 if the node has no registration).

Handlers read the hub's state on the control plane's event loop (never from this thread), so
they see a consistent picture.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from pymesh.controlplane.server._hub import Hub

__all__ = ["AdminServer"]

T = TypeVar("T")
_TIMEOUT = 5.0


class AdminServer:
    """Serves the admin endpoints for ``hub`` whose loop is ``loop``."""

    def __init__(self, hub: Hub, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self._hub = hub
        self._loop = loop
        admin = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pymesh-controlplane"

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                admin._dispatch(self, "GET")

            def do_POST(self) -> None:
                admin._dispatch(self, "POST")

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="pymesh-cp-admin", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(_TIMEOUT)

    def _dispatch(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(req.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        hub = self._hub
        try:
            if method == "GET" and url.path == "/ready":
                ready = self._on_loop(lambda: hub.ready)
                _send(
                    req,
                    200 if ready else 503,
                    "text/plain",
                    b"ready\n" if ready else b"not ready\n",
                )
            elif method == "GET" and url.path == "/debug/syncz":
                _send_json(req, 200, self._on_loop(hub.syncz))
            elif method == "GET" and url.path == "/debug/configz":
                _send_json(req, 200, self._on_loop(hub.configz))
            elif method == "GET" and url.path == "/metrics":
                text = self._on_loop(hub.metrics.render)
                _send(req, 200, "text/plain; version=0.0.4", text.encode())
            elif method == "POST" and url.path == "/debug/health":
                self._health(req, query)
            else:
                _send_json(req, 404, {"error": f"no endpoint {method} {url.path}"})
        except Exception as exc:  # an admin request must never take the server down
            _send_json(req, 500, {"error": str(exc)})

    def _health(self, req: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        proxy, status = query.get("proxy", ""), query.get("status", "")
        try:
            changed = self._on_loop(lambda: self._hub.set_health(proxy, status))
        except ValueError as exc:
            _send_json(req, 400, {"error": str(exc)})
        except KeyError:
            _send_json(req, 404, {"error": f"no auto-registered workload for proxy {proxy!r}"})
        else:
            _send_json(req, 200, {"proxy": proxy, "status": status.upper(), "changed": changed})


def _send(req: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes) -> None:
    req.send_response(code)
    req.send_header("Content-Type", ctype)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def _send_json(req: BaseHTTPRequestHandler, code: int, value: object) -> None:
    body = json.dumps(value, indent=2, sort_keys=True, default=str).encode()
    _send(req, code, "application/json", body)
