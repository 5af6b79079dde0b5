"""The Prometheus scrape endpoint: a stdlib HTTP server on its own daemon thread.

Istio's convention is ``:15020/stats/prometheus`` (the agent's merged metrics port); the
default binds loopback only, as an admin surface should. Any other path answers 404.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable

__all__ = ["CONTENT_TYPE", "PrometheusServer"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PrometheusServer:
    """Serves ``render()`` at ``path``; :meth:`close` stops it and joins the thread."""

    def __init__(
        self,
        render: Callable[[], str],
        *,
        host: str = "127.0.0.1",
        port: int = 15020,
        path: str = "/stats/prometheus",
    ) -> None:
        self.path = path

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != path:
                    self.send_error(404)
                    return
                try:
                    body = render().encode("utf-8")
                except Exception as exc:  # report, never kill the server thread
                    self.send_error(500, explain=str(exc))
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return None

        server_class = (
            http.server.ThreadingHTTPServer
            if ":" not in host
            else type("_V6", (http.server.ThreadingHTTPServer,), {"address_family": 10})
        )
        self._httpd = server_class((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="pymesh-prometheus", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    def close(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()
