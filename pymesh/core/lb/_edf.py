"""Earliest-deadline-first scheduling (Envoy ``EdfScheduler``): smooth weighted choice.

Each entry has a deadline; a pick takes the entry with the earliest deadline and moves it
``1 / weight`` later, so an entry of weight ``w`` is picked ``w`` times per unit of virtual
time, interleaved rather than in blocks: weights 3:2:1 give ``a b a a b c`` (a block
schedule would give ``a a a b b c``). Ties go to the entry added first.

Two forms: :class:`EdfScheduler` (a heap; weights may change at each pick, as least-request
needs) and :func:`edf_sequence` (the whole period of a static schedule precomputed, so a
pick is one index: the fast path for weighted round robin).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Sequence

__all__ = ["EdfScheduler", "edf_sequence"]

SEQUENCE_MAX_PERIOD = 8192
"""Static schedules whose total weight (the period) is at most this are precomputed."""


class EdfScheduler:
    """EDF over entry indices ``0..n-1`` with float weights (entries of weight <= 0 never
    picked). ``pick`` re-inserts the picked entry with ``weight_of(index)`` when given
    (dynamic weights), else with its initial weight.

    Thread-safe: sync adapters pick from many threads, and a thread switch between reading
    the top and replacing it would lose or duplicate an entry, so a pick holds a lock (an
    uncontended ``Lock`` costs well under a tenth of a microsecond). The array-based pickers
    need none: a race there only repeats or skips one position.
    """

    __slots__ = ("_heap", "_inverse", "_lock", "_seq")

    def __init__(self, weights: Sequence[float]) -> None:
        self._inverse = [1.0 / w if w > 0 else 0.0 for w in weights]
        self._heap: list[tuple[float, int, int]] = [
            (inv, i, i) for i, inv in enumerate(self._inverse) if inv > 0.0
        ]
        heapq.heapify(self._heap)
        self._seq = len(weights)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._heap)

    def pick(self, weight_of: Callable[[int], float] | None = None) -> int | None:
        with self._lock:
            heap = self._heap
            if not heap:
                return None
            deadline, _, index = heap[0]
            if weight_of is None:
                step = self._inverse[index]
            else:
                weight = weight_of(index)
                step = 1.0 / weight if weight > 0 else 0.0
            if step > 0.0:
                self._seq += 1
                heapq.heapreplace(heap, (deadline + step, self._seq, index))
            else:
                heapq.heappop(heap)
            return index


def edf_sequence(weights: Sequence[int]) -> list[int]:
    """One full period of the EDF schedule of integer ``weights`` (length ``sum(weights)``).

    Entry ``i`` appears ``weights[i]`` times, at virtual times ``k / weights[i]``. The float
    keys are exact enough: two different fractions with denominators below 2**20 differ by
    far more than a float's rounding, and equal fractions round to the same float.
    """
    keyed = sorted((k / w, i) for i, w in enumerate(weights) if w > 0 for k in range(1, w + 1))
    return [i for _, i in keyed]
