"""Time as an input: the xDS client reads time only through a :class:`Clock`.

Timers (the 15 s resource-does-not-exist timer, reconnect backoff, fallback probes) are
driven by the client's work-serializer thread, which asks the clock what time it is and how
long to block. :class:`SystemClock` is real time; :class:`FakeClock` only moves when a test
calls :meth:`FakeClock.advance`, which synchronously runs every timer that became due (the
listeners it calls post the timer work to the serializer and wait for it), so timing tests
are deterministic and never sleep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock"]


class Clock(Protocol):
    """A monotonic time source that can wake those waiting on it."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale (only differences matter)."""
        ...

    def wait_timeout(self, deadline: float) -> float | None:
        """How many *real* seconds a waiter for ``deadline`` should block before re-checking.

        ``None`` means "until woken": a fake clock's time moves only through ``advance``,
        which calls the listeners.
        """
        ...

    def add_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` whenever time jumps; returns a function that removes it."""
        ...


class SystemClock:
    """Real time (``time.monotonic``)."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wait_timeout(self, deadline: float) -> float | None:
        return max(0.0, deadline - time.monotonic())

    def add_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        return _noop


def _noop() -> None:
    return None


class FakeClock:
    """Test time: starts at ``start`` and moves only when :meth:`advance` is called."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def wait_timeout(self, deadline: float) -> float | None:
        return None

    def add_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def advance(self, seconds: float) -> None:
        """Move time forward and run the listeners (each fires the timers now due).

        Returns once every listener returned: an :class:`~pymesh.xds.client.XdsClient` on
        this clock has then run its due timers and the watcher callbacks they caused.
        """
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        with self._lock:
            self._now += seconds
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
