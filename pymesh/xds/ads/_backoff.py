"""gRPC connection backoff (``doc/connection-backoff.md``): a policy, it never sleeps."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Jittered exponential backoff: 1 s initial, x1.6, +/-20 % jitter, 120 s cap.

    :meth:`next_delay` answers how long to wait before the next attempt; :meth:`reset` is
    called once an attempt succeeded (for ADS: a response was received on the stream).
    """

    def __init__(
        self,
        *,
        initial: float = 1.0,
        multiplier: float = 1.6,
        jitter: float = 0.2,
        maximum: float = 120.0,
    ) -> None:
        self.initial = initial
        self.multiplier = multiplier
        self.jitter = jitter
        self.maximum = maximum
        self._current = initial

    def next_delay(self, rng: random.Random) -> float:
        """The delay before the next attempt; grows the base for the one after."""
        delay = self._current * (1.0 + rng.uniform(-self.jitter, self.jitter))
        self._current = min(self._current * self.multiplier, self.maximum)
        return min(delay, self.maximum)

    def reset(self) -> None:
        self._current = self.initial
