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

Connectivity: grpcio fails a call fast (``UNAVAILABLE`` at once) while its channel is in
``TRANSIENT_FAILURE``; the adapter turns that into a connect failure, which the retry policy
(previous-hosts predicate) and outlier detection act on. The load balancer itself does not
see grpcio's connectivity states (a known gap: it learns from failed attempts instead).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["Subchannel", "SubchannelPool"]

C = TypeVar("C")

CLOSE_GRACE = 30.0
"""Seconds a removed endpoint's channel stays open for the calls already on it."""


class Subchannel(Generic[C]):
    """One endpoint's grpcio channel and its cached multicallables."""

    __slots__ = ("calls", "channel", "key")

    def __init__(self, key: str, channel: C) -> None:
        self.key = key
        self.channel = channel
        self.calls: dict[Hashable, Any] = {}

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
    ) -> None:
        self._open = open_channel
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
            if found is None:
                found = Subchannel(key, self._open(key))
                self._subchannels[key] = found
            retired = self._due_retired()
        self._close_all(retired)
        return found

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
            for key in gone:
                sub = self._subchannels.pop(key)
                self._retired.append((now + self._grace, sub.channel))
            retired = self._due_retired()
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
            channels = [s.channel for s in self._subchannels.values()]
            channels += [c for _, c in self._retired]
            self._subchannels.clear()
            self._retired = []
            timers, self._timers = self._timers, []
        for cancel in timers:
            cancel()
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
