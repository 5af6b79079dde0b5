"""One pooled grpcio channel per endpoint ("subchannel"), created lazily, closed on removal.

The mesh picks the endpoint (the policy core's load balancer); grpcio only carries the call
to it. Each endpoint ``HOST:PORT`` gets one plain grpcio channel (``grpc.insecure_channel`` or
``grpc.secure_channel`` with the mesh channel's credentials and options, ``:authority`` set to
the mesh target as a proxyless client sends it). It is created on the first attempt sent to
that endpoint and closed when EDS removes the endpoint from every cluster: the
:class:`~pymesh.core.runtime.MeshRuntime` reports removed host keys to
:meth:`SubchannelPool.hosts_removed` (any thread); the pool drops them at once (no new call
uses them) and closes each after a grace period, so calls already on it finish.

A subchannel also caches grpcio's multicallables per (shape, method, serializers): building
one per call would cost an allocation and a method-name encode on the hot path.

Connectivity: each subchannel's grpcio connectivity state is watched (``subscribe`` for
sync channels, ``wait_for_state_change`` in a task for aio) and reported to a
:class:`Reachability` shared by every mesh channel of the same
:class:`~pymesh.core.runtime.MeshRuntime`. An endpoint is *unreachable* while some
subchannel to it is in ``TRANSIENT_FAILURE`` and none is ``READY``; the runtime's balancers
then leave it out (:meth:`~pymesh.core.runtime.MeshRuntime.set_unreachable`), the way
C-core's ``round_robin`` / ``pick_first`` skip a subchannel in ``TRANSIENT_FAILURE``, until
it is ``READY`` or ``IDLE`` again (grpcio keeps reconnecting with its back-off). An attempt
that fails because the endpoint could not be connected is reported to the policies as a
connect failure.

==================================  ==========================================
subchannel state (grpcio)           endpoint for the balancers
==================================  ==========================================
IDLE, CONNECTING, READY             usable
TRANSIENT_FAILURE                   unreachable, unless another mesh channel's
                                    subchannel to it is READY
SHUTDOWN / subchannel dropped       no longer reported
==================================  ==========================================
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from pymesh.core.runtime import MeshRuntime

__all__ = ["Reachability", "Subchannel", "SubchannelPool"]

# grpc.ChannelConnectivity values, compared by name so this module stays grpcio-free.
_FAILURE = "TRANSIENT_FAILURE"
_READY = "READY"
_GONE = "SHUTDOWN"

Watch = Callable[[str, Any, Callable[[Any], None]], Callable[[], None]]
"""``watch(key, channel, report) -> cancel``: call ``report(state)`` with the channel's
connectivity now and at each change (any thread), until ``cancel()``."""


class Reachability:
    """Which endpoints of one :class:`~pymesh.core.runtime.MeshRuntime` cannot be connected
    now, from the connectivity of every subchannel reported to it (see the module table).
    One per runtime (:meth:`of`); thread-safe."""

    _by_runtime: weakref.WeakKeyDictionary[Any, Reachability] = weakref.WeakKeyDictionary()
    _by_runtime_lock = threading.Lock()

    def __init__(self, runtime: MeshRuntime) -> None:
        self._runtime = weakref.ref(runtime)
        self._lock = threading.Lock()
        self._states: dict[str, dict[int, str]] = {}  # key -> reporter id -> state name

    @classmethod
    def of(cls, runtime: MeshRuntime) -> Reachability:
        with cls._by_runtime_lock:
            found = cls._by_runtime.get(runtime)
            if found is None:
                found = cls._by_runtime[runtime] = cls(runtime)
            return found

    def report(self, sub: Subchannel[Any], state: Any) -> None:
        """Subchannel ``sub`` is in ``state`` (a ``grpc.ChannelConnectivity``; SHUTDOWN: it
        is gone). Ignored once :meth:`forget` ran for it (a late report of a watch being
        cancelled must not bring a dropped subchannel back)."""
        name = getattr(state, "name", None) or _GONE
        with self._lock:
            if not sub.watching:
                return
            self._set(sub, name)

    def forget(self, sub: Subchannel[Any]) -> None:
        """``sub`` was dropped: it reports no more."""
        with self._lock:
            sub.watching = False
            self._set(sub, _GONE)

    def _set(self, sub: Subchannel[Any], name: str) -> None:
        key = sub.key
        states = self._states.setdefault(key, {})
        if name == _GONE:
            states.pop(id(sub), None)
            if not states:
                del self._states[key]
        else:
            states[id(sub)] = name
        down = frozenset(k for k, v in self._states.items() if _unreachable(v))
        runtime = self._runtime()
        if runtime is not None:
            runtime.set_unreachable(down)  # under our lock: reports apply in order

    def unreachable(self) -> frozenset[str]:
        with self._lock:
            return frozenset(k for k, v in self._states.items() if _unreachable(v))


def _unreachable(states: dict[int, str]) -> bool:
    values = states.values()
    return _FAILURE in values and _READY not in values


C = TypeVar("C")

CLOSE_GRACE = 30.0
"""Seconds a removed endpoint's channel stays open for the calls already on it."""


class Subchannel(Generic[C]):
    """One endpoint's grpcio channel and its cached multicallables."""

    __slots__ = ("__weakref__", "calls", "channel", "key", "state", "unwatch", "watching")

    def __init__(self, key: str, channel: C) -> None:
        self.key = key
        self.channel = channel
        self.calls: dict[Hashable, Any] = {}
        self.state: Any = None
        """The channel's last reported connectivity (``None`` until the first report)."""
        self.unwatch: Callable[[], None] | None = None
        self.watching = False
        """Its connectivity is reported (set before the watch starts, cleared when dropped)."""

    def multicallable(self, spec: Hashable, make: Callable[[C], Any]) -> Any:
        found = self.calls.get(spec)
        if found is None:
            found = self.calls[spec] = make(self.channel)
        return found


class SubchannelPool(Generic[C]):
    """Endpoint key -> :class:`Subchannel`, thread-safe; ``close_channel`` closes one grpcio
    channel (sync ``close()``; for aio the adapter schedules ``await close()``)."""

    def __init__(
        self,
        open_channel: Callable[[str], C],
        close_channel: Callable[[C], None],
        *,
        grace: float = CLOSE_GRACE,
        clock: Callable[[], float] = time.monotonic,
        schedule: Callable[[float, Callable[[], None]], Callable[[], None]] | None = None,
        watch: Watch | None = None,
        reachability: Reachability | None = None,
    ) -> None:
        self._open = open_channel
        self._watch = watch
        self._reachability = reachability
        self._close = close_channel
        self._grace = grace
        self._clock = clock
        self._subchannels: dict[str, Subchannel[C]] = {}
        self._retired: list[tuple[float, C]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._schedule = schedule or _timer
        self._timers: list[Callable[[], None]] = []  # cancel functions of pending sweeps
        self.epoch = 0
        """Bumped whenever a subchannel is dropped (removed endpoint, close): caches of
        multicallables keyed by endpoint are valid for one epoch."""

    def get(self, key: str) -> Subchannel[C]:
        """The subchannel of endpoint ``key`` (``HOST:PORT``), opened on first use."""
        found = self._subchannels.get(key)
        if found is not None:
            return found
        with self._lock:
            if self._closed:
                raise RuntimeError("channel closed")
            found = self._subchannels.get(key)
            created = found is None
            if found is None:
                found = Subchannel(key, self._open(key))
                self._subchannels[key] = found
            retired = self._due_retired()
        self._close_all(retired)
        if created and self._watch is not None:
            self._start_watch(found)
        return found

    def _start_watch(self, sub: Subchannel[C]) -> None:
        assert self._watch is not None
        ref = weakref.ref(sub)
        reachability = self._reachability

        def report(state: Any) -> None:
            s = ref()
            if s is None:
                return
            s.state = state
            if reachability is not None:
                reachability.report(s, state)

        sub.watching = True
        try:
            sub.unwatch = self._watch(sub.key, sub.channel, report)
        except Exception:  # watching is best effort: calls still fail over on errors
            sub.unwatch = None

    def _stop_watch(self, sub: Subchannel[C]) -> None:
        unwatch, sub.unwatch = sub.unwatch, None
        if unwatch is not None:
            try:
                unwatch()
            except Exception:
                pass
        if self._reachability is not None and sub.watching:
            self._reachability.forget(sub)
        sub.watching = False

    def endpoint_keys(self) -> Sequence[str]:
        """The endpoints with an open subchannel now."""
        return tuple(self._subchannels)

    def hosts_removed(self, keys: frozenset[str]) -> None:
        """EDS removed ``keys`` from every cluster: retire their channels (closed by a timer
        after the grace period, or earlier at :meth:`close`)."""
        now = self._clock()
        with self._lock:
            gone = keys & self._subchannels.keys()
            if gone:
                self.epoch += 1
            subs = [self._subchannels.pop(key) for key in gone]
            for sub in subs:
                self._retired.append((now + self._grace, sub.channel))
            retired = self._due_retired()
        for sub in subs:
            self._stop_watch(sub)
        self._close_all(retired)
        if gone:
            cancel = self._schedule(self._grace, self.sweep)
            with self._lock:
                self._timers = [*self._timers[-8:], cancel]

    def sweep(self) -> None:
        """Close the retired channels whose grace period is over."""
        with self._lock:
            retired = self._due_retired()
        self._close_all(retired)

    def close(self, *, close_channels: bool = True) -> list[C]:
        """Forget every channel (the mesh channel is closing) and close them unless
        ``close_channels`` is false (the aio adapter awaits their closing itself). Returns
        them."""
        with self._lock:
            self._closed = True
            self.epoch += 1
            subs = list(self._subchannels.values())
            channels = [s.channel for s in subs]
            channels += [c for _, c in self._retired]
            self._subchannels.clear()
            self._retired = []
            timers, self._timers = self._timers, []
        for cancel in timers:
            cancel()
        for sub in subs:
            self._stop_watch(sub)
        if close_channels:
            self._close_all(channels)
        return channels

    def _due_retired(self) -> list[C]:
        if not self._retired:
            return []
        now = self._clock()
        due = [c for t, c in self._retired if t <= now]
        self._retired = [(t, c) for t, c in self._retired if t > now]
        return due

    def _close_all(self, channels: list[C]) -> None:
        for channel in channels:
            try:
                self._close(channel)
            except Exception:  # closing must never break a call or an update
                pass


def _timer(delay: float, fn: Callable[[], None]) -> Callable[[], None]:
    timer = threading.Timer(delay + 0.01, fn)
    timer.daemon = True
    timer.start()
    return timer.cancel
