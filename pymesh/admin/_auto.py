"""The admin endpoint of every workload, without application code.

The first mesh use in a process builds the process-wide xDS client
(:meth:`pymesh.xds.client.XdsClient.shared`), which calls :func:`shared_client` here:

1. ``PYMESH_ADMIN_PORT`` decides: a port (default ``15000``, Istio's), ``0`` for a free
   one, ``off`` for none. ``PYMESH_ADMIN_HOST`` (default ``127.0.0.1``: loopback only).
2. The port is bound *before* the client exists; if it is taken (another workload on the
   host), a free port is bound instead and the address logged.
3. The address goes into the node metadata (``PYMESH_ADMIN_ADDRESS``) the client sends
   the control plane, so ``pymesh proxy-status`` lists it and ``pymesh proxy-config KIND
   WORKLOAD`` finds it by the workload's name.
4. The client is built and the endpoint served for it on a daemon thread.
5. With ``PYMESH_TELEMETRY=on`` (and no telemetry installed by the application), telemetry is
   configured from the environment for this workload (:func:`pymesh.telemetry.
   configure_from_env`: the Prometheus endpoint, access logs, tracing).

Nothing here may fail the application: any error is logged and the client is returned
without an admin endpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from pymesh.admin._server import AdminServer
    from pymesh.bootstrap import Bootstrap

__all__ = ["ADMIN_ADDRESS_KEY", "DEFAULT_PORT", "shared_client", "with_admin_address"]

_log = logging.getLogger("pymesh.admin")

ADMIN_ADDRESS_KEY = "PYMESH_ADMIN_ADDRESS"
"""Node metadata key carrying the workload's admin endpoint ``HOST:PORT``."""
DEFAULT_PORT = 15000

C = TypeVar("C")


def _setting(env: dict[str, str] | os._Environ[str]) -> tuple[str, int] | None:
    """``(host, port)`` from the environment, ``None`` when turned off. Raises ValueError."""
    raw = env.get("PYMESH_ADMIN_PORT", "").strip().lower()
    if raw in ("off", "none", "false", "disabled"):  # as pymesh.admin.start_from_env
        return None
    port = DEFAULT_PORT if raw == "" else int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"PYMESH_ADMIN_PORT={raw!r} is out of range")
    host = env.get("PYMESH_ADMIN_HOST", "").strip() or "127.0.0.1"
    return host, port


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # No SO_REUSEADDR: a port another live process listens on must be seen as taken.
        sock.bind((host.strip("[]"), port))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


def _bind(host: str, port: int) -> socket.socket:
    try:
        return _listen(host, port)
    except OSError as exc:
        if port == 0:
            raise
        sock = _listen(host, 0)
        _log.warning(
            "admin endpoint: %s:%d unavailable (%s); serving on %s:%d instead",
            host,
            port,
            exc.strerror or exc,
            host,
            sock.getsockname()[1],
        )
        return sock


_requested: tuple[str, int] | None = None
"""``(host, port)`` of an explicit :func:`pymesh.admin.start` building the shared client."""


def request(setting: tuple[str, int] | None) -> None:
    """Use ``setting`` instead of the environment for the next shared client (``None``:
    back to the environment). Called by :func:`pymesh.admin.start` under its lock."""
    global _requested
    _requested = setting


def with_admin_address(bootstrap: Bootstrap, address: str) -> Bootstrap:
    """``bootstrap`` whose node metadata also says where the admin endpoint listens."""
    node = bootstrap.node
    metadata = MappingProxyType({**node.metadata, ADMIN_ADDRESS_KEY: address})
    return dataclasses.replace(bootstrap, node=dataclasses.replace(node, metadata=metadata))


def shared_client(
    make: Callable[[Bootstrap], C],
    bootstrap: Bootstrap,
    *,
    env: dict[str, str] | None = None,
) -> C:
    """``make(bootstrap)``, with the process's admin endpoint started for it (see the
    module doc). Registers the endpoint as :func:`pymesh.admin.current`."""
    from pymesh import admin

    environ = os.environ if env is None else env
    try:
        setting = _requested or _setting(environ)
    except ValueError as exc:
        _log.warning("admin endpoint not started: %s", exc)
        return _with_telemetry(make(bootstrap), environ)
    if setting is None or admin.current() is not None:
        return _with_telemetry(make(bootstrap), environ)
    host, port = setting
    try:
        sock = _bind(host, port)
    except OSError as exc:
        _log.warning("admin endpoint not started: cannot listen on %s: %s", host, exc)
        return make(bootstrap)
    bound = sock.getsockname()
    address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
    client = _with_telemetry(make(with_admin_address(bootstrap, address)), environ)
    try:
        server = _serve(client, sock, environ)
    except Exception:
        sock.close()
        _log.exception("admin endpoint not started")
        return client
    if not admin._adopt(server):  # another thread started one meanwhile
        server.stop()
        return client
    _log.info("admin endpoint on http://%s", address)
    _stop_with(client, server)
    return client


def _with_telemetry(client: C, env: Mapping[str, str]) -> C:
    """Telemetry from the environment for this workload (``PYMESH_TELEMETRY=on``: metrics
    endpoint, access logs, tracing as ``pymesh.telemetry.configure_from_env`` reads them),
    unless the application installed its own. Never fails the application."""
    if env.get("PYMESH_TELEMETRY", "off").strip().lower() not in ("on", "1", "true"):
        return client  # OpenTelemetry is not even imported
    try:
        from pymesh import telemetry

        if telemetry.current() is None:
            tel = telemetry.configure_from_env(client.bootstrap.node, env)  # type: ignore[attr-defined]
            if tel is not None:
                tel.watch_xds_client(client)  # type: ignore[arg-type]
    except Exception:
        _log.exception("telemetry from the environment not started")
    return client


def _stop_with(client: object, server: AdminServer) -> None:
    """The endpoint lives as long as the shared client: closing the client stops it."""
    from pymesh import admin

    close = getattr(client, "close", None)
    if close is None:
        return

    def close_both() -> None:
        try:
            close()
        finally:
            admin._release(server)

    try:
        client.close = close_both  # type: ignore[attr-defined]
    except AttributeError:  # a client class with slots: the endpoint stays until exit
        pass


def _serve(
    client: object, sock: socket.socket, env: dict[str, str] | os._Environ[str]
) -> AdminServer:
    from pymesh.admin._server import AdminServer

    csds_raw = env.get("PYMESH_CSDS_PORT", "").strip()
    csds = int(csds_raw) if csds_raw else None
    return AdminServer(client, listener=sock, csds_port=csds).start()  # type: ignore[arg-type]
