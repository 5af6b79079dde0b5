"""Cooperative pacing: long xDS work gives the GIL to the application's threads.

A huge xDS update (say 100,000 endpoints) costs the work-serializer thread about a second
of CPU: decoding, then building hosts and balancers. CPython hands the GIL to a waiting
thread only after the holder ran for ``sys.getswitchinterval()`` (5 ms), so while such an
update is applied every request thread that wakes from I/O waits up to 5 ms for the GIL, at
each of its several wake-ups per request: request latency p99 rose from ~1 ms to ~24 ms.

Loops over endpoints or hosts call :func:`checkpoint` every ~0.1 ms of work. On a thread
that opted in (the xDS client's work serializer, through :func:`paced`), once the thread
has run :data:`SLICE` seconds since its last pause it sleeps :data:`PAUSE` seconds: the
sleep releases the GIL long enough for a waiting thread to take it (``time.sleep(0)`` is
not enough: the sleeper takes the GIL back before the woken waiter gets to it). A request
thread then
waits at most about one slice per wake-up, and the xDS thread runs only while the
application's threads are blocked in I/O or have had their turn. The price: the pauses
(~100 us each) lengthen the thread's wall time, ~1.5x for a 10,000-endpoint update
(bench/xds_client_bench.py); slices that grew while no one waited were tried
and dropped, as neither the pause's length nor the process's CPU time tells reliably
whether a request thread was waiting. On any other thread (a benchmark, a test, a
CLI decoding a file) ``checkpoint`` costs one attribute lookup and never sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import TypeVar

__all__ = [
    "PAUSE",
    "SLICE",
    "checkpoint",
    "is_paced",
    "pace_current_thread",
    "paced",
    "paced_items",
    "restart",
]

T = TypeVar("T")

SLICE = 0.0001
"""Seconds of work between two pauses on a paced thread. A request thread waking from I/O
waits up to this long for the GIL (bench/resilience_bench.py --xds-apply compares values)."""
PAUSE = 0.00002
"""Seconds a paced thread asks to sleep at a pause; Linux's default timer slack (50 us) and
the wake-up make it ~100 us, which a waiting thread needs to take the GIL (with the slack
cut to 1 us the pause was ~45 us, too short: requests were barely helped)."""

_local = threading.local()
_perf = time.perf_counter
_sleep = time.sleep


def checkpoint() -> None:
    """Pause if the current thread is paced and its slice is used up (else: nothing)."""
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is None or _perf() < deadline:
        return
    _sleep(_local.pause)
    _local.deadline = _perf() + _local.slice


def paced_items(items: Iterable[T]) -> Iterable[T]:
    """``items``, with a :func:`checkpoint` every 256 of them on a paced thread (on any
    other thread ``items`` itself: no cost). For a loop or comprehension over hosts that
    may run on the xDS thread."""
    if getattr(_local, "deadline", None) is None:
        return items
    if isinstance(items, Sized) and len(items) <= 256:
        checkpoint()  # what _paced would do at its first item, without a generator
        return items
    return _paced(items)


def _paced(items: Iterable[T]) -> Iterator[T]:
    for i, item in enumerate(items):
        if not i & 255:
            checkpoint()
        yield item


def restart() -> None:
    """Start a new slice on the current thread (a task begins after the thread waited for
    work)."""
    if getattr(_local, "deadline", None) is not None:
        _local.deadline = _perf() + _local.slice


def pace_current_thread(slice_: float | None = SLICE, pause: float = PAUSE) -> None:
    """Pace the current thread's :func:`checkpoint` calls (``slice_=None``: stop)."""
    if slice_ is None:
        _local.deadline = None
        return
    _local.slice = slice_
    _local.pause = pause
    _local.deadline = _perf() + slice_


def is_paced() -> bool:
    """Whether the current thread is paced."""
    return getattr(_local, "deadline", None) is not None


@contextmanager
def paced(slice_: float = SLICE, pause: float = PAUSE) -> Iterator[None]:
    """Pace the current thread's :func:`checkpoint` calls within the block."""
    saved = (getattr(_local, "slice", None), getattr(_local, "pause", PAUSE))
    was_paced = is_paced()
    pace_current_thread(slice_, pause)
    try:
        yield
    finally:
        pace_current_thread(saved[0] if was_paced else None, saved[1])
