"""Push debouncing, as istiod does it (``PILOT_DEBOUNCE_AFTER`` / ``PILOT_DEBOUNCE_MAX``).

Theory of operation
-------------------
Config events (a file changed, a workload connected or left) arrive in bursts. Pushing on each
one would make every client churn, so events are merged: a push fires once the events have
been *quiet* for ``quiet`` seconds, or once ``max_delay`` seconds have passed since the first
event of the burst, whichever comes first.

=========  ==================  =====================================================
state      event               result
=========  ==================  =====================================================
idle       ``event(now)``      pending; first = last = now
pending    ``event(now)``      pending; last = now
pending    ``due(now)``        True when now >= min(last + quiet, first + max_delay)
pending    ``fire()``          idle; returns how many events were merged
=========  ==================  =====================================================

No I/O and no clock of its own: the caller passes ``now`` and sleeps until ``deadline()``.
"""

from __future__ import annotations

__all__ = ["Debouncer"]


class Debouncer:
    """Merges bursts of events into one push."""

    __slots__ = ("_count", "_first", "_last", "max_delay", "quiet")

    def __init__(self, quiet: float = 0.1, max_delay: float = 1.0) -> None:
        if quiet < 0 or max_delay < quiet:
            raise ValueError("need 0 <= quiet <= max_delay")
        self.quiet = quiet
        self.max_delay = max_delay
        self._first: float | None = None
        self._last = 0.0
        self._count = 0

    @property
    def pending(self) -> bool:
        return self._first is not None

    def event(self, now: float) -> None:
        """Record one event at ``now``."""
        if self._first is None:
            self._first = now
        self._last = now
        self._count += 1

    def deadline(self) -> float | None:
        """When the pending burst becomes due, or ``None`` when idle."""
        if self._first is None:
            return None
        return min(self._last + self.quiet, self._first + self.max_delay)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def fire(self) -> int:
        """Close the burst; return the number of events it merged."""
        count = self._count
        self._first = None
        self._count = 0
        return count
