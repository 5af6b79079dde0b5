"""The per-workload admin endpoint (Istio's 15000-style): config dump, clusters, stats,
readiness and certificates, on loopback, off the application's ports.

One per process, started automatically with the process-wide xDS client (the first mesh
use: ``pymesh.httpx``, ``pymesh.grpc``, ``pymesh.serve`` without an explicit client), see
:mod:`pymesh.admin._auto`. Environment: ``PYMESH_ADMIN_PORT`` (default ``15000``; a taken
port falls back to a free one, logged; ``0``: a free port; ``off``: none),
``PYMESH_ADMIN_HOST`` (default ``127.0.0.1``), ``PYMESH_CSDS_PORT`` (also serve CSDS over
gRPC on that port). Explicitly::

    import pymesh.admin
    pymesh.admin.start(port=15000)          # for the process-wide xDS client
    pymesh.admin.current()                  # the running one (auto-started or not)

or an :class:`AdminServer` per explicit :class:`~pymesh.xds.client.XdsClient` (tests, several
clients in one process). ``pymesh proxy-config KIND WORKLOAD`` reads it (by ``HOST:PORT``, or
by the workload's name through the control plane, which the address is reported to).
"""

from __future__ import annotations

import os
import threading

from pymesh.admin._server import ENDPOINTS, AdminServer
from pymesh.errors import ConfigError

__all__ = ["ENDPOINTS", "AdminServer", "current", "start", "start_from_env", "stop"]

_lock = threading.RLock()
_OFF = frozenset({"off", "none", "false", "disabled"})
_server: AdminServer | None = None


def start(
    *, port: int = 15000, host: str = "127.0.0.1", csds_port: int | None = None
) -> AdminServer:
    """Start the process's admin endpoint for the process-wide xDS client (idempotent: a
    second call returns the running one, as does a call after the shared client started
    one itself)."""
    global _server
    with _lock:
        if _server is None:
            from pymesh.admin import _auto
            from pymesh.xds.client import XdsClient

            # Building the shared client now starts the endpoint on this host and port
            # (and reports it to the control plane); one built earlier does not.
            _auto.request((host, port))
            try:
                client = XdsClient.shared()
            finally:
                _auto.request(None)
            if _server is not None and csds_port is not None and _server.csds_port is None:
                _server._start_csds(host, csds_port)
            if _server is None:
                _server = AdminServer(client, host=host, port=port, csds_port=csds_port).start()
        return _server


def _adopt(server: AdminServer) -> bool:
    """Make ``server`` the process's endpoint unless one is running already."""
    global _server
    with _lock:
        if _server is not None:
            return False
        _server = server
        return True


def _env_port(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a port number", field=name) from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}={value!r} is out of range", field=name)
    return port


def start_from_env() -> AdminServer | None:
    """:func:`start` if ``PYMESH_ADMIN_PORT`` is set to a port, else ``None`` (``off``:
    none; a running endpoint, e.g. auto-started by the shared client, is returned)."""
    if os.environ.get("PYMESH_ADMIN_PORT", "").strip().lower() in _OFF:
        return None
    port = _env_port("PYMESH_ADMIN_PORT")
    if port is None:
        return None
    host = os.environ.get("PYMESH_ADMIN_HOST", "").strip() or "127.0.0.1"
    return start(port=port, host=host, csds_port=_env_port("PYMESH_CSDS_PORT"))


def _release(server: AdminServer) -> None:
    """Stop ``server``; forget it if it is the process's endpoint."""
    global _server
    with _lock:
        if _server is server:
            _server = None
    server.stop()


def current() -> AdminServer | None:
    """The process's admin endpoint, if started."""
    return _server


def stop() -> None:
    """Stop the process's admin endpoint (if any)."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is not None:
        server.stop()
