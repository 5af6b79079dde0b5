"""The process-wide xDS client: watches in, decoded resources out, on one background thread.

Theory of operation
===================

An :class:`XdsClient` owns one *work serializer* thread (:mod:`pymesh.xds._serializer`).
Everything that touches protocol state runs there, in order: watch registration, transport
events, timers, and the watcher callbacks, which are therefore never concurrent and need no
locks. The application's hot path never calls in here: watchers (the snapshot layer) build
immutable snapshots and swap a reference.

Resources are grouped by the xDS servers that serve them (the bootstrap's top-level
``xds_servers`` or an ``authorities`` entry's, for ``xdstp:`` names; gRFC A47). Each group
has one :class:`~pymesh.xds.ads.AdsState` (the I/O-free protocol) and at most one live
:class:`~pymesh.xds.transport.AdsStream` to one of its servers:

- The first watch of a group starts a stream to its first server.
- A stream that fails before any response (the server cannot be reached) is followed at
  once by a stream to the next server in the list, if any, provided some watched resource
  is not cached yet (gRFC A71: "does not exist" counts as cached; with everything cached the
  client keeps serving its cache and retries the primary). After the last server, or when
  nothing is missing, the group waits a jittered exponential backoff (1 s, x1.6, 20 %,
  120 s cap) and starts again from the first server; a watch of an uncached resource during
  that wait falls back at once.
- A stream that ends after a response (server restart, max connection age) is restarted at
  once with the backoff reset, primary first, and resends every subscription with the
  versions held, so the server need not resend; cached resources keep being served and
  watchers see no deletion.
- While a fallback server is in use, the primary is probed (channel connectivity only) on
  the same backoff; when it is reachable, the group switches back to it.

Watcher callbacks: ``on_resource_changed`` (a new valid value), ``on_resource_does_not_exist``
(removed, or not received 15 s after it was requested on a connected stream) and
``on_ambient_error`` (NACKed update or lost stream: keep using the last good value). A new
watcher of a resource already known gets its value (or does-not-exist) at once, posted on the
serializer. An exception raised by a watcher is logged and does not affect the others.
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pymesh.bootstrap import Bootstrap, XdsServer, load_bootstrap
from pymesh.errors import XdsError
from pymesh.xds._memory import TRIM_DELAY, TrimPolicy, release_memory
from pymesh.xds._serializer import Serializer, Timer
from pymesh.xds.ads import (
    AdsState,
    AmbientError,
    Backoff,
    Changed,
    DeltaDiscoveryRequest,
    DoesNotExist,
    Effect,
    ResourceStatus,
    Send,
)
from pymesh.xds.ads._state import DOES_NOT_EXIST, DOES_NOT_EXIST_TIMEOUT, ResourceDecoder
from pymesh.xds.clock import Clock, SystemClock
from pymesh.xds.codec import decode_resource
from pymesh.xds.codec.discovery import (
    decode_delta_response,
    decode_response,
    encode_delta_request,
    encode_request,
)
from pymesh.xds.pacing import checkpoint
from pymesh.xds.resource_types import ResourceType
from pymesh.xds.transport import AdsStream, ChannelProbe

__all__ = [
    "ConnectionState",
    "ResourceStatus",
    "ResourceWatcher",
    "XdsClient",
    "get_client",
]

log = logging.getLogger(__name__)


class ResourceWatcher(Protocol):
    """Receives the updates of one watched resource (on the work-serializer thread)."""

    def on_resource_changed(self, rtype: ResourceType, name: str, value: object) -> None:
        """A new valid value (a frozen model object from the codec)."""
        ...

    def on_resource_does_not_exist(self, rtype: ResourceType, name: str) -> None:
        """The resource was removed, or never arrived within the does-not-exist timeout."""
        ...

    def on_ambient_error(self, rtype: ResourceType, name: str, error: str) -> None:
        """Transient problem (stream down, NACKed update): keep using the last good value."""
        ...


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """The state of one group's connection to its xDS servers."""

    server_uri: str
    """The server in use or being tried."""
    connected: bool
    """True while a stream to it is up."""
    last_error: str | None
    """The last stream or connection error, if any."""
    servers: tuple[str, ...] = ()
    """Every server of the group, in fallback order."""


class _Watch:
    __slots__ = ("active", "name", "rtype", "watcher")

    def __init__(self, rtype: ResourceType, name: str, watcher: ResourceWatcher) -> None:
        self.rtype = rtype
        self.name = name
        self.watcher = watcher
        self.active = True


class _Group:
    """The servers of one authority (fallback order), their stream and protocol state."""

    def __init__(self, servers: tuple[XdsServer, ...], state: AdsState) -> None:
        self.servers = servers
        self.state = state
        self.stream: AdsStream | None = None
        self.stream_id = 0
        self.index = 0  # server of the current (or last) stream
        self.saw_response = False
        self.backoff = Backoff()
        self.probe_backoff = Backoff()
        self.retry_timer: Timer | None = None
        self.probe_timer: Timer | None = None
        self.probe: ChannelProbe | None = None
        self.dne_timer: Timer | None = None
        self.conn = ConnectionState(
            server_uri=servers[0].uri,
            connected=False,
            last_error=None,
            servers=tuple(s.uri for s in servers),
        )


_ids = itertools.count(1)


def _admin_autostart() -> Callable[[Callable[[Bootstrap], XdsClient], Bootstrap], XdsClient]:
    """``pymesh.admin``'s hook for the shared client. Looked up by name: the admin endpoint
    sits above this layer (it reads the runtime), so the client only knows its entry point."""
    module = importlib.import_module("pymesh.admin._auto")
    hook: Callable[[Callable[[Bootstrap], XdsClient], Bootstrap], XdsClient]
    hook = module.shared_client
    return hook


class XdsClient:
    """One ADS client for the whole process (see the module docstring).

    Build one explicitly (tests) or use :meth:`shared` / :func:`get_client` (the process-wide
    instance from :func:`~pymesh.bootstrap.load_bootstrap`). ``delta`` forces Delta (True) or
    SotW (False) for every server; by default each group uses Delta when its first server
    lists the ``pymesh.delta`` server feature.
    """

    _shared: XdsClient | None = None
    _shared_lock = threading.Lock()

    def __init__(
        self,
        bootstrap: Bootstrap,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        decoder: ResourceDecoder = decode_resource,
        delta: bool | None = None,
        does_not_exist_timeout: float = DOES_NOT_EXIST_TIMEOUT,
    ) -> None:
        self.bootstrap = bootstrap
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._decoder = decoder
        self._delta = delta
        self._dne_timeout = does_not_exist_timeout
        self._groups: dict[tuple[XdsServer, ...], _Group] = {}
        self._watches: dict[tuple[ResourceType, str], list[_Watch]] = {}
        self._closed = False
        self._serializer = Serializer(
            self._clock, name=f"pymesh-xds-{next(_ids)}", after_task=self._flush
        )
        self._trim_policy = TrimPolicy()

    # -- process-wide instance -------------------------------------------------------------

    @classmethod
    def shared(cls) -> XdsClient:
        """The process-wide client, built on first use from ``load_bootstrap()``.

        It is closed at interpreter exit (streams cancelled before grpcio shuts down).
        Raises :class:`~pymesh.errors.BootstrapError` if the bootstrap is missing or bad.
        """
        with cls._shared_lock:
            if cls._shared is None or cls._shared._closed:
                # With the workload's admin endpoint (pymesh.admin; never fails the app).
                client = _admin_autostart()(cls, load_bootstrap())
                atexit.register(client.close)
                cls._shared = client
            return cls._shared

    # -- public API ------------------------------------------------------------------------

    def watch(self, rtype: ResourceType, name: str, watcher: ResourceWatcher) -> Callable[[], None]:
        """Watch one resource; returns ``cancel()``. Thread-safe.

        The first watcher of a name subscribes to it, the last ``cancel`` unsubscribes. A
        watcher of a resource already known gets its value (or does-not-exist) at once,
        posted on the work serializer. No callback is made after ``cancel()`` returned
        (except one already running on another thread).
        """
        if self._closed:
            raise XdsError("the xDS client is closed")
        servers = self.bootstrap.servers_for_resource(name)  # BootstrapError if unknown
        w = _Watch(rtype, name, watcher)
        self._on_serializer(lambda: self._add_watch(w, servers))

        def cancel() -> None:
            if not w.active:
                return
            w.active = False
            self._on_serializer(lambda: self._remove_watch(w))

        return cancel

    def run_in_serializer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` later on the work-serializer thread (where callbacks run)."""
        self._serializer.post(fn)

    def resource_statuses(self) -> list[ResourceStatus]:
        """The status of every subscribed resource (for CSDS and ``proxy-status``)."""
        if self._closed:
            return []
        return self._serializer.run_sync(
            lambda: [s for g in self._groups.values() for s in g.state.statuses()]
        )

    def connection_state(self) -> ConnectionState:
        """The state of the connection to the top-level ``xds_servers``."""
        group = self._groups.get(self.bootstrap.xds_servers)
        if group is not None:
            return group.conn
        return ConnectionState(
            server_uri=self.bootstrap.xds_servers[0].uri,
            connected=False,
            last_error=None,
            servers=tuple(s.uri for s in self.bootstrap.xds_servers),
        )

    def connection_states(self) -> list[ConnectionState]:
        """The state of every group of servers in use."""
        return [g.conn for g in list(self._groups.values())]

    def close(self) -> None:
        """Stop: cancel every stream and timer, join the work thread. Idempotent."""
        if self._closed:
            return
        atexit.unregister(self.close)
        try:
            self._serializer.run_sync(self._shutdown)
        except XdsError:
            pass
        self._closed = True
        self._serializer.close()

    def __enter__(self) -> XdsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- on the serializer -----------------------------------------------------------------

    def _on_serializer(self, fn: Callable[[], None]) -> None:
        # On the thread (a watcher calling watch()/cancel() from a callback) the change is
        # made now, but its request goes out when the current task ends (the after-task
        # flush): the ACK of the response being handled must be sent first, else that ACK
        # (built with the names wanted before the callback) would narrow the subscription
        # back.
        if self._serializer.in_thread:
            fn()
        else:
            self._serializer.post(fn)

    def _group(self, servers: tuple[XdsServer, ...]) -> _Group:
        group = self._groups.get(servers)
        if group is None:
            delta = self._delta if self._delta is not None else servers[0].supports_delta
            state = AdsState(
                decoder=self._decoder,
                delta=delta,
                ignore_resource_deletion=servers[0].ignore_resource_deletion,
                does_not_exist_timeout=self._dne_timeout,
            )
            group = _Group(servers, state)
            self._groups[servers] = group
        return group

    def _add_watch(self, w: _Watch, servers: tuple[XdsServer, ...]) -> None:
        if not w.active or self._closed:
            return
        key = (w.rtype, w.name)
        self._watches.setdefault(key, []).append(w)
        group = self._group(servers)
        group.state.subscribe(w.rtype, w.name)
        if group.stream is None and group.retry_timer is None:
            self._start_stream(group, 0)
        elif (
            group.stream is None
            and group.index == 0
            and len(group.servers) > 1
            and group.state.has_unanswered()
        ):
            # The primary is unreachable (we are waiting out its backoff) and this resource
            # is not cached: that is when gRFC A71 falls back.
            assert group.retry_timer is not None
            group.retry_timer.cancel()
            self._start_stream(group, 1)
        status = group.state.status(w.rtype, w.name)
        effect: Effect | None = None
        if status is not None and status.raw is not None:
            effect = Changed(w.rtype, w.name, status.value)
        elif status is not None and status.status == DOES_NOT_EXIST:
            effect = DoesNotExist(w.rtype, w.name)
        elif not group.conn.connected and group.conn.last_error:
            # The servers are unreachable right now: say so at once rather than leave the
            # new watcher waiting for the next failed attempt.
            effect = AmbientError(w.rtype, w.name, f"xDS stream error: {group.conn.last_error}")
        if effect is not None:
            delivered = effect
            self._serializer.post(lambda: self._deliver(w, delivered))

    def _remove_watch(self, w: _Watch) -> None:
        key = (w.rtype, w.name)
        watches = self._watches.get(key)
        if not watches or w not in watches:
            return
        watches.remove(w)
        if watches:
            return
        del self._watches[key]
        for group in self._groups.values():
            if group.state.unsubscribe(w.rtype, w.name):
                self._rearm_dne(group)

    def _flush(self) -> None:
        now = self._clock.monotonic()
        for group in self._groups.values():
            effects = group.state.flush(now)
            if effects:
                self._apply(group, effects)  # re-arms the does-not-exist timer

    def _apply(self, group: _Group, effects: list[Effect]) -> None:
        for effect in effects:
            checkpoint()  # on the paced work thread: between effects, let requests run
            if isinstance(effect, Send):
                self._send(group, effect)
            else:
                for w in list(self._watches.get((effect.rtype, effect.name), ())):
                    self._deliver(w, effect)
        self._rearm_dne(group)

    def _send(self, group: _Group, effect: Send) -> None:
        if group.stream is None:
            return
        request = effect.request
        if request.error_detail is not None:
            log.warning(
                "xDS server %s: rejecting %s update: %s",
                group.servers[group.index].uri,
                request.type_url.rsplit(".", 1)[-1],
                request.error_detail,
            )
        node = self.bootstrap.node
        if isinstance(request, DeltaDiscoveryRequest):
            data = encode_delta_request(request, node)
        else:
            data = encode_request(request, node)
        group.stream.send(data)

    def _deliver(self, w: _Watch, effect: Effect) -> None:
        if not w.active:
            return
        try:
            if isinstance(effect, Changed):
                w.watcher.on_resource_changed(effect.rtype, effect.name, effect.value)
            elif isinstance(effect, DoesNotExist):
                w.watcher.on_resource_does_not_exist(effect.rtype, effect.name)
            elif isinstance(effect, AmbientError):
                w.watcher.on_ambient_error(effect.rtype, effect.name, effect.error)
        except Exception:
            log.exception("xDS watcher of %s %r failed", w.rtype.short_name, w.name)

    def _rearm_dne(self, group: _Group) -> None:
        deadline = group.state.next_deadline()
        current = group.dne_timer
        if current is not None and not current.cancelled and current.deadline == deadline:
            return
        if current is not None:
            current.cancel()
            group.dne_timer = None
        if deadline is not None:
            group.dne_timer = self._serializer.call_at(deadline, lambda: self._on_dne(group))

    def _on_dne(self, group: _Group) -> None:
        group.dne_timer = None
        self._apply(group, group.state.tick(self._clock.monotonic()))

    # -- streams ---------------------------------------------------------------------------

    def _set_conn(self, group: _Group, *, connected: bool, error: str | None = None) -> None:
        last_error = error if error is not None else group.conn.last_error
        group.conn = ConnectionState(
            server_uri=group.servers[group.index].uri,
            connected=connected,
            last_error=last_error,
            servers=group.conn.servers,
        )

    def _start_stream(self, group: _Group, index: int) -> None:
        if self._closed:
            return
        group.retry_timer = None
        group.index = index
        group.saw_response = False
        group.stream_id += 1
        sid = group.stream_id
        server = group.servers[index]
        group.state.ignore_resource_deletion = server.ignore_resource_deletion
        self._set_conn(group, connected=False)
        post = self._serializer.post

        def on_connected() -> None:
            post(lambda: self._on_connected(group, sid))

        def on_response(data: bytes) -> None:
            post(lambda: self._on_response(group, sid, data))

        def on_closed(error: str) -> None:
            post(lambda: self._on_closed(group, sid, error))

        group.stream = AdsStream(
            server,
            delta=group.state.delta,
            on_connected=on_connected,
            on_response=on_response,
            on_closed=on_closed,
        )
        group.stream.start()

    def _on_connected(self, group: _Group, sid: int) -> None:
        if sid != group.stream_id or group.stream is None:
            return
        self._set_conn(group, connected=True)
        server = group.servers[group.index]
        self._apply(group, group.state.connected(self._clock.monotonic(), server))

    def _on_response(self, group: _Group, sid: int, data: bytes) -> None:
        if sid != group.stream_id or group.stream is None:
            return
        try:
            message = decode_delta_response(data) if group.state.delta else decode_response(data)
        except XdsError as exc:
            log.warning("xDS server %s: %s", group.servers[group.index].uri, exc)
            self._set_conn(group, connected=True, error=str(exc))
            return
        if not group.saw_response:
            group.saw_response = True
            group.backoff.reset()
            if group.index > 0:
                self._schedule_probe(group)
            else:
                group.probe_backoff.reset()
        now = self._clock.monotonic()
        checkpoint()
        self._apply(group, group.state.response(message, now))
        if self._trim_policy.on_response(message.type_url, len(data)):
            # A huge update was just replaced: give its memory back (pymesh.xds._memory).
            self._serializer.call_at(now + TRIM_DELAY, release_memory)

    def _on_closed(self, group: _Group, sid: int, error: str) -> None:
        if sid != group.stream_id or group.stream is None:
            return
        log.info("xDS stream to %s ended: %s", group.servers[group.index].uri, error)
        stream, group.stream = group.stream, None
        stream.close()
        group.stream_id += 1
        self._set_conn(group, connected=False, error=error)
        self._apply(group, group.state.disconnected(self._clock.monotonic(), error))
        if self._closed:
            return
        if group.saw_response:
            group.backoff.reset()
            self._start_stream(group, 0)
        elif group.index + 1 < len(group.servers) and group.state.has_unanswered():
            self._start_stream(group, group.index + 1)
        else:
            delay = group.backoff.next_delay(self._rng)
            when = self._clock.monotonic() + delay
            group.retry_timer = self._serializer.call_at(when, lambda: self._retry(group))

    def _retry(self, group: _Group) -> None:
        group.retry_timer = None
        if group.stream is None:
            self._start_stream(group, 0)

    def _schedule_probe(self, group: _Group) -> None:
        if group.probe_timer is not None or group.probe is not None:
            return
        when = self._clock.monotonic() + group.probe_backoff.next_delay(self._rng)
        group.probe_timer = self._serializer.call_at(when, lambda: self._start_probe(group))

    def _start_probe(self, group: _Group) -> None:
        group.probe_timer = None
        if self._closed or group.index == 0:
            return
        post = self._serializer.post

        def on_result(ok: bool) -> None:
            post(lambda: self._on_probe(group, probe, ok))

        probe = ChannelProbe(group.servers[0], on_result)
        group.probe = probe
        probe.start()

    def _on_probe(self, group: _Group, probe: ChannelProbe, ok: bool) -> None:
        if group.probe is not probe:
            return
        group.probe = None
        if self._closed or group.index == 0:
            return
        if not ok:
            self._schedule_probe(group)
            return
        # probe_backoff is reset only once the primary answers on a stream: a primary that
        # accepts connections but fails its streams is probed less and less often.
        log.info("xDS server %s is reachable again: switching back", group.servers[0].uri)
        if group.stream is not None:
            stream, group.stream = group.stream, None
            group.stream_id += 1
            stream.close()
            self._apply(
                group, group.state.disconnected(self._clock.monotonic(), "switching to primary")
            )
        if group.retry_timer is not None:
            group.retry_timer.cancel()
        self._start_stream(group, 0)

    def _shutdown(self) -> None:
        self._closed = True
        for group in self._groups.values():
            for timer in (group.retry_timer, group.probe_timer, group.dne_timer):
                if timer is not None:
                    timer.cancel()
            if group.probe is not None:
                group.probe.close()
                group.probe = None
            if group.stream is not None:
                group.stream_id += 1
                group.stream.close()
                group.stream = None
            self._set_conn(group, connected=False)
        self._watches.clear()


def get_client() -> XdsClient:
    """The process-wide :class:`XdsClient` (built on first use from ``load_bootstrap()``)."""
    return XdsClient.shared()
