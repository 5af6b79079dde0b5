"""Cooperative pacing: long xDS work gives the GIL to the application's threads.

A huge xDS update (say 100,000 endpoints) costs the work-serializer thread about a second
of CPU: decoding, then building hosts and balancers. CPython hands the GIL to a waiting
thread only after the holder ran for ``sys.getswitchinterval()`` (5 ms), so while such an
update is applied every request thread that wakes from I/O waits up to 5 ms for the GIL, at
each of its several wake-ups per request: request latency p99 rose from ~1 ms to ~24 ms.

Loops over endpoints or hosts call :func:`checkpoint` every ~0.1 ms of work. On a thread
that opted in (the xDS client's work serializer, through :func:`paced`), once the thread
has run a slice since its last pause it sleeps :data:`PAUSE` seconds: the sleep releases
the GIL long enough for a waiting thread to take it (``time.sleep(0)`` is not enough: the
sleeper takes the GIL back before the woken waiter gets to it). A request thread then
waits at most about one slice per wake-up, and the xDS thread runs only while the
application's threads are blocked in I/O or have had their turn. Slices adapt: a pause
that took clearly longer than asked means another thread ran, and the next slice is
:data:`SLICE` (0.2 ms); otherwise each slice doubles, up to :data:`MAX_SLICE`, so that
pacing costs little when no one is waiting. On any other thread (a benchmark, a test, a
CLI decoding a file) ``checkpoint`` costs one attribute lookup and never sleeps.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = [
    "CONTENDED",
    "MAX_SLICE",
    "PAUSE",
    "PAUSE_TIMER_SLACK_NS",
    "SLICE",
    "checkpoint",
    "is_paced",
    "pace_current_thread",
    "paced",
    "paced_items",
    "restart",
]

T = TypeVar("T")

SLICE = 0.0002
"""Seconds of work between two pauses on a paced thread. A request thread waking from I/O
waits up to this long for the GIL (bench/resilience_bench.py --xds-apply compares values)."""
PAUSE = 0.00002
"""Seconds a paced thread sleeps at a pause (the wake-up adds ~25 us here)."""

MAX_SLICE = 0.002
"""The longest slice: while no other thread takes the GIL at the pauses, each slice is
twice the previous one, up to this (pacing then costs ~3% instead of ~30%)."""
CONTENDED = 0.0001
"""A pause that lasted this much longer than asked: another thread ran meanwhile (or the
OS was slow to wake us: treated the same), so the next slice is :data:`SLICE` again."""

_local = threading.local()
_perf = time.perf_counter
_sleep = time.sleep


def checkpoint() -> None:
    """Pause if the current thread is paced and its slice is used up (else: nothing)."""
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is None:
        return
    now = _perf()
    if now < deadline:
        return
    pause = _local.pause
    _sleep(pause)
    after = _perf()
    if after - now > pause + CONTENDED:  # someone took the GIL: short slices
        current = _local.slice
    else:  # nobody waiting: longer slices, fewer pauses
        current = min(2 * _local.current, MAX_SLICE)
    _local.current = current
    _local.deadline = after + current


def paced_items(items: Iterable[T]) -> Iterable[T]:
    """``items``, with a :func:`checkpoint` every 256 of them on a paced thread (on any
    other thread ``items`` itself: no cost). For a loop or comprehension over hosts that
    may run on the xDS thread."""
    if getattr(_local, "deadline", None) is None:
        return items
    return _paced(items)


def _paced(items: Iterable[T]) -> Iterator[T]:
    for i, item in enumerate(items):
        if not i & 255:
            checkpoint()
        yield item


def restart() -> None:
    """Start a new, short slice on the current thread (a task begins after the thread
    waited for work)."""
    if getattr(_local, "deadline", None) is not None:
        _local.current = _local.slice
        _local.deadline = _perf() + _local.slice


def pace_current_thread(slice_: float | None = SLICE, pause: float = PAUSE) -> None:
    """Pace the current thread's :func:`checkpoint` calls (``slice_=None``: stop)."""
    if slice_ is None:
        _local.deadline = None
        return
    _local.slice = _local.current = slice_
    _local.pause = pause
    _local.deadline = _perf() + slice_


def is_paced() -> bool:
    """Whether the current thread is paced."""
    return getattr(_local, "deadline", None) is not None


_PR_SET_TIMERSLACK = 29
_PR_GET_TIMERSLACK = 30
PAUSE_TIMER_SLACK_NS = 1000
"""The paced thread's timer slack (Linux, per thread): its pauses last ~45 us instead of
~100 us with the default 50 us slack, so pacing costs a 10,000-endpoint update less."""


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def _timer_slack(ns: int | None) -> int | None:
    """Set the current thread's timer slack (best effort); the previous value."""
    if _PRCTL is None:
        return None
    previous = _PRCTL(_PR_GET_TIMERSLACK, 0, 0, 0, 0)
    if ns is not None:
        _PRCTL(_PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0)
    return previous if previous > 0 else None


@contextmanager
def paced(slice_: float = SLICE, pause: float = PAUSE) -> Iterator[None]:
    """Pace the current thread's :func:`checkpoint` calls within the block (and shorten
    its timer slack: :data:`PAUSE_TIMER_SLACK_NS`)."""
    saved = (getattr(_local, "slice", None), getattr(_local, "pause", PAUSE))
    was_paced = is_paced()
    slack = _timer_slack(PAUSE_TIMER_SLACK_NS)
    pace_current_thread(slice_, pause)
    try:
        yield
    finally:
        pace_current_thread(saved[0] if was_paced else None, saved[1])
        if slack is not None:
            _timer_slack(slack)
