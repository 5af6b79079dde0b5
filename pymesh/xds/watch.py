"""The adapter-facing API: a shared, ref-counted handle per (client, target).

``watch_target(client, "reviews.default.svc.cluster.local:9080")`` returns the
:class:`TargetHandle` of that target, starting a :class:`~pymesh.xds.dependency.
TargetDependencyManager` the first time. Every channel or transport to the same target shares
it; each ``watch_target`` call must be paired with one ``close()``. The hot path calls
``handle.current()``: one attribute read of an immutable snapshot, no lock, never blocking on
the control plane. ``wait_ready`` is for the first call only.

State of a handle (``state()``):

=====================  =====================================================================
``None``               nothing known yet (``current()`` is ``None``; wait or fail UNAVAILABLE)
``TargetSnapshot``     usable; an ambient error leaves it in place (``last_error`` says why
                       the config may be stale)
``TargetError``        unusable until the control plane fixes it (does-not-exist, invalid,
                       no virtual host; or a transient error before any snapshot)
=====================  =====================================================================
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Generic, Protocol, Self, TypeVar, cast

from pymesh.errors import XdsError
from pymesh.model.common import SocketAddress
from pymesh.model.snapshot import ServerError, ServerSnapshot, TargetError, TargetSnapshot
from pymesh.xds.dependency import ServerDependencyManager, TargetDependencyManager, WatchClient
from pymesh.xds.pacing import checkpoint

__all__ = [
    "ServerHandle",
    "TargetHandle",
    "parse_target",
    "watch_server",
    "watch_target",
]

_log = logging.getLogger(__name__)


class _ErrorLike(Protocol):
    @property
    def ambient(self) -> bool: ...


S = TypeVar("S")
E = TypeVar("E", bound=_ErrorLike)


class _Subscription:
    __slots__ = ("active", "callback", "delivered")

    def __init__(self, callback: Callable[[Any], None]):
        self.callback = callback
        self.active = True
        self.delivered = False


class _Handle(Generic[S, E]):
    """Shared machinery of target and server handles."""

    _snapshot_type: type[S]

    def __init__(self, client: WatchClient, key: tuple[str, ...], name: str):
        self._client = client
        self._key = key
        self.name = name
        self._state: S | E | None = None
        self._last_error: E | None = None
        self._cond = threading.Condition()
        self._subs: tuple[_Subscription, ...] = ()
        self._refs = 1
        self._closed = False
        self._stop: Callable[[], None] = _noop
        self._work_thread: int | None = None  # the client's work thread, once seen

    # -- reads (any thread, lock-free) -------------------------------------------------------

    def current(self) -> S | None:
        """The current usable snapshot, or ``None`` (not ready yet, or in an error state)."""
        state = self._state
        return state if isinstance(state, self._snapshot_type) else None

    def state(self) -> S | E | None:
        """The snapshot, the error that replaced it, or ``None`` when nothing is known yet."""
        return self._state

    @property
    def last_error(self) -> E | None:
        """The latest error: the current error state, or an ambient error since the last
        snapshot (the snapshot stays in use). ``None`` after a snapshot with no error since."""
        return self._last_error

    def wait_ready(self, timeout: float) -> S:
        """Block until a snapshot is available and return it.

        Raises :class:`~pymesh.errors.XdsError` at once if the target is in a (non-transient)
        error state, or after ``timeout`` seconds with the last error seen. On the xDS
        client's work thread (inside a callback) it raises instead of waiting for itself.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                state = self._state
                if isinstance(state, self._snapshot_type):
                    return state
                if state is not None and not cast(E, state).ambient:
                    raise XdsError(str(state))
                if threading.get_ident() == self._work_thread:
                    raise XdsError(
                        f"wait_ready({self.name!r}) called on the xDS work thread before the "
                        "config is ready: it would wait for itself (use current() or "
                        "subscribe() in callbacks)"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = f": {self._last_error}" if self._last_error is not None else ""
                    raise XdsError(
                        f"no xDS configuration for {self.name!r} after {timeout:g} s{why}"
                    )
                self._cond.wait(remaining)

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe(self, callback: Callable[[S | E], None]) -> Callable[[], None]:
        """Call ``callback`` with every new snapshot or error, on the xDS work thread.

        The current state (if any) is delivered first. Returns a function that cancels the
        subscription. Callbacks must be quick and must not block.
        """
        if self._closed:
            raise XdsError(f"handle for {self.name!r} is closed")
        sub: _Subscription = _Subscription(callback)
        with self._cond:
            self._subs = (*self._subs, sub)

        def deliver_current() -> None:
            self._work_thread = threading.get_ident()
            state = self._state
            if sub.active and not sub.delivered and state is not None:
                self._call(sub, state)

        self._client.run_in_serializer(deliver_current)

        def cancel() -> None:
            sub.active = False
            with self._cond:
                self._subs = tuple(s for s in self._subs if s is not sub)

        return cancel

    def _call(self, sub: _Subscription, item: S | E) -> None:
        sub.delivered = True
        try:
            sub.callback(item)
        except Exception:
            _log.exception("xDS subscriber of %s raised", self.name)

    # -- publication (work-serializer thread) -------------------------------------------------

    def _publish(self, item: S | E) -> None:
        self._work_thread = threading.get_ident()
        if isinstance(item, self._snapshot_type):
            self._last_error = None
            self._state = item
        else:
            err = cast(E, item)
            self._last_error = err
            if not (err.ambient and isinstance(self._state, self._snapshot_type)):
                self._state = err
        with self._cond:
            self._cond.notify_all()
            subs = self._subs
        for sub in subs:
            if sub.active:
                checkpoint()  # on the paced work thread: let requests run between subscribers
                self._call(sub, item)

    # -- lifetime ----------------------------------------------------------------------------

    def _acquire(self) -> None:
        self._refs += 1

    def close(self) -> None:
        """Release this user's reference; the last one stops the watches."""
        with _REGISTRY_LOCK:
            if self._closed:
                return
            self._refs -= 1
            if self._refs > 0:
                return
            self._closed = True
            per_client = _REGISTRY.get(id(self._client))
            if per_client is not None and per_client.get(self._key) is self:
                del per_client[self._key]
                if not per_client:
                    del _REGISTRY[id(self._client)]
        for sub in self._subs:
            sub.active = False
        self._subs = ()
        self._client.run_in_serializer(self._stop)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TargetHandle(_Handle[TargetSnapshot, TargetError]):
    """The shared view of one client target: ``current()`` / ``wait_ready()`` / ``subscribe()``."""

    _snapshot_type = TargetSnapshot

    def __init__(self, client: WatchClient, key: tuple[str, ...], target: str, listener_name: str):
        super().__init__(client, key, target)
        self.target = target
        self.listener_name = listener_name
        self.authority = key[1]
        self.manager = TargetDependencyManager(
            client,
            target=target,
            listener_name=listener_name,
            authority=self.authority,
            publish=self._publish,
        )
        self._stop = self.manager.stop

    def watch_cluster(self, name: str) -> Callable[[], None]:
        """Include cluster ``name`` in this target's snapshots even if no route names it
        (for clusters chosen per request, e.g. by ``cluster_header``); returns ``cancel()``.

        The next snapshot that has it is published once the cluster (and its endpoints) is
        known, like any other update.
        """
        if self._closed:
            raise XdsError(f"handle for {self.name!r} is closed")
        manager = self.manager
        self._client.run_in_serializer(lambda: manager.add_cluster(name))
        done = False

        def cancel() -> None:
            nonlocal done
            if not done:
                done = True
                self._client.run_in_serializer(lambda: manager.remove_cluster(name))

        return cancel


class ServerHandle(_Handle[ServerSnapshot, ServerError]):
    """The shared view of one xDS-managed server's inbound listener."""

    _snapshot_type = ServerSnapshot

    def __init__(
        self,
        client: WatchClient,
        key: tuple[str, ...],
        listener_name: str,
        address: SocketAddress | None = None,
    ):
        super().__init__(client, key, listener_name)
        self.listener_name = listener_name
        self.manager = ServerDependencyManager(
            client, listener_name=listener_name, publish=self._publish, address=address
        )
        self._stop = self.manager.stop


def _noop() -> None:
    return None


_REGISTRY_LOCK = threading.Lock()
# id(client) -> key -> handle. A handle holds its client, so an id cannot be reused while an
# entry exists; the last close() removes the entry.
_REGISTRY: dict[int, dict[tuple[str, ...], _Handle[Any, Any]]] = {}


def parse_target(target: str) -> tuple[str | None, str]:
    """Split a target into (xDS authority or ``None``, ``HOST:PORT``).

    Accepts ``HOST:PORT``, ``xds:///HOST:PORT`` and ``xds://AUTHORITY/HOST:PORT`` (gRFC A47);
    the ``HOST:PORT`` part is percent-decoded, as gRPC does for the data-plane authority.
    """
    if target.startswith("xds:"):
        rest = target[len("xds:") :]
        authority: str | None = None
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
        host_port = urllib.parse.unquote(rest.lstrip("/"))
        if not host_port:
            raise XdsError(f"xDS target {target!r} has no HOST:PORT")
        return (authority or None), host_port
    if not target or "/" in target:
        raise XdsError(f"xDS target {target!r} is not HOST:PORT or xds:///HOST:PORT")
    return None, target


def watch_target(client: WatchClient, target: str) -> TargetHandle:
    """The shared handle of ``target`` on ``client`` (one more reference: ``close()`` it).

    The listener name comes from the bootstrap's templates (gRFC A47); the route's virtual host
    is selected for the ``HOST:PORT`` part of the target.
    """
    authority, host_port = parse_target(target)
    listener_name = client.bootstrap.listener_resource_name(authority, host_port)
    key = ("target", host_port, listener_name)
    with _REGISTRY_LOCK:
        per_client = _REGISTRY.setdefault(id(client), {})
        found = per_client.get(key)
        if isinstance(found, TargetHandle):
            found._acquire()
            return found
        handle = TargetHandle(client, key, target, listener_name)
        per_client[key] = handle
    client.run_in_serializer(handle.manager.start)
    return handle


def watch_server(client: WatchClient, host: str, port: int) -> ServerHandle:
    """The shared handle of the inbound listener for a server on ``host:port`` (gRFC A36).

    A listener whose ``address`` differs from ``host:port``, or that is a client listener,
    is a ``ServerError(INVALID)``: the server must not serve with it.
    """
    listener_name = client.bootstrap.server_listener_name(host, port)
    key = ("server", listener_name)
    with _REGISTRY_LOCK:
        per_client = _REGISTRY.setdefault(id(client), {})
        found = per_client.get(key)
        if isinstance(found, ServerHandle):
            found._acquire()
            return found
        handle = ServerHandle(client, key, listener_name, SocketAddress(host.strip("[]"), port))
        per_client[key] = handle
    client.run_in_serializer(handle.manager.start)
    return handle
