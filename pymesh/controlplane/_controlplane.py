"""``ControlPlane``: the embedded control plane, started in-process on its own thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from pymesh.controlplane.ca import CertificateAuthority, add_ca_service, lazy_authority
from pymesh.controlplane.server._admin import AdminServer
from pymesh.controlplane.server._ads import AdsServicer
from pymesh.controlplane.server._backend import Backend, IstioBackend
from pymesh.controlplane.server._hub import Hub
from pymesh.errors import PymeshError

__all__ = ["ControlPlane"]

log = logging.getLogger("pymesh.controlplane")
_START_TIMEOUT = 60.0


class ControlPlane:
    """Istio config in, xDS out: ADS server, file watching, auto-registration, admin port.

    ``config_paths``: YAML files and/or directories of Istio config (watched, hot-reloaded;
    a bad change is reported and the last good config keeps serving). ``xds_address`` is
    ``HOST:PORT`` (port 0 picks a free one; see :attr:`address`) or ``unix:PATH``.
    ``admin_port`` is the admin HTTP port (``None`` disables it; 0 picks a free one).
    ``debounce`` is the quiet time merging config events into one push (at most
    ``max_debounce`` after the first); ``registration_grace`` how long an auto-registered
    workload stays after its stream ends. ``backend`` replaces the Istio config side (tests).
    ``ca``: the CA served on the xDS port (Istio's ``IstioCertificateService``): ``True``
    (default) creates/loads one in ``ca_dir`` (default :func:`pymesh.controlplane.ca.
    default_ca_dir`) at the first certificate request; a ``CertificateAuthority`` (or a
    factory of one, called at the first request) is used as is; ``False`` serves no CA.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        config_paths: Sequence[str | Path] | str | Path,
        *,
        xds_address: str = "127.0.0.1:15010",
        admin_port: int | None = 15014,
        admin_host: str = "127.0.0.1",
        debounce: float = 0.1,
        max_debounce: float = 1.0,
        registration_grace: float = 10.0,
        poll_interval: float = 0.2,
        backend: Backend | None = None,
        ca: CertificateAuthority | Callable[[], CertificateAuthority] | bool = True,
        ca_dir: str | Path | None = None,
    ) -> None:
        if isinstance(config_paths, str | Path):
            config_paths = [config_paths]
        self._paths = tuple(Path(p) for p in config_paths)
        self._xds_address = xds_address
        self._admin_port = admin_port
        self._admin_host = admin_host
        self.hub = Hub(
            backend if backend is not None else IstioBackend(),
            self._paths,
            debounce=debounce,
            max_debounce=max_debounce,
            registration_grace=registration_grace,
            poll_interval=poll_interval,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._bound: str | None = None
        self._admin: AdminServer | None = None
        self._ca: Any = None
        if isinstance(ca, CertificateAuthority) or (callable(ca) and not isinstance(ca, bool)):
            self._ca = ca
        elif ca:
            self._ca = lazy_authority(**({"state_dir": ca_dir} if ca_dir is not None else {}))

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        """Load the config, start serving xDS and the admin port; returns ``self``."""
        if self._thread is not None:
            raise PymeshError("control plane already started")
        started: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="pymesh-controlplane", daemon=True
        )
        self._thread.start()
        try:
            self._bound = started.result(_START_TIMEOUT)
        except BaseException:
            self._thread.join(timeout=5)
            self._thread = None
            raise
        if self._admin_port is not None:
            assert self._loop is not None
            try:
                self._admin = AdminServer(self.hub, self._loop, self._admin_host, self._admin_port)
            except OSError as exc:
                self.stop()
                raise PymeshError(
                    f"admin port {self._admin_host}:{self._admin_port}: {exc}"
                ) from exc
            self._admin.start()
        log.info("control plane serving xDS on %s", self._bound)
        return self

    def stop(self) -> None:
        """Stop serving (streams end), stop the admin port. Idempotent."""
        if self._admin is not None:
            self._admin.stop()
            self._admin = None
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if thread is not None:
            thread.join(timeout=15)
        self._thread = None

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- properties -----------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The xDS address actually bound (``HOST:PORT`` or ``unix:PATH``)."""
        if self._bound is None:
            raise PymeshError("control plane not started")
        return self._bound

    @property
    def admin_port(self) -> int | None:
        """The admin HTTP port actually bound (``None`` when disabled or not started)."""
        return None if self._admin is None else self._admin.port

    @property
    def admin_url(self) -> str:
        port = self.admin_port
        if port is None:
            raise PymeshError("admin port not enabled")
        return f"http://{self._admin_host}:{port}"

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the control plane's loop and return its result (status reads)."""
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # -- the loop thread ------------------------------------------------------------------

    def _run(self, started: concurrent.futures.Future[str]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            else:
                log.exception("control plane loop failed")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self, started: concurrent.futures.Future[str]) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.hub.initial_load)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
                # Find clients that vanished without closing (istiod: 30 s / 10 s), and let
                # clients keep their own keepalive pings without being told "too many pings".
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_ping_strikes", 0),
            ]
        )
        AdsServicer(self.hub).add_to_server(server)
        if self._ca is not None:
            add_ca_service(server, self._ca, aio=True)
        try:
            port = server.add_insecure_port(self._xds_address)
        except RuntimeError as exc:
            raise PymeshError(f"cannot listen for xDS on {self._xds_address}: {exc}") from exc
        if port == 0 and not self._xds_address.startswith("unix:"):
            raise PymeshError(f"cannot listen for xDS on {self._xds_address}")
        bound = self._xds_address
        if not bound.startswith("unix:"):
            host = bound.rsplit(":", 1)[0]
            bound = f"{host}:{port}"
        await server.start()
        runner = asyncio.create_task(self.hub.run())
        started.set_result(bound)
        try:
            await self._stop.wait()
        finally:
            runner.cancel()
            await server.stop(grace=0.5)
            try:
                await runner
            except asyncio.CancelledError:
                pass
