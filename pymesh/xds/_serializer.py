"""The work serializer: one thread that runs every task and timer of the xDS client in order.

All protocol state and every watcher callback live on this thread, so none of them need a
lock (gRPC's ``WorkSerializer``). Other threads hand work over with :meth:`post` (fire and
forget) or :meth:`run_sync` (wait for the result). Timers are read from the injected
:class:`~pymesh.xds.clock.Clock`; with a :class:`~pymesh.xds.clock.FakeClock`, ``advance``
runs the due timers synchronously through :meth:`_on_clock_jump`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from pymesh.errors import XdsError
from pymesh.xds.clock import Clock
from pymesh.xds.pacing import paced, restart

__all__ = ["Serializer", "Timer"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_SYNC_TIMEOUT = 30.0


class Timer:
    """A scheduled call; :meth:`cancel` is idempotent (and only meaningful on the thread)."""

    __slots__ = ("cancelled", "deadline", "fn")

    def __init__(self, deadline: float, fn: Callable[[], None]) -> None:
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Serializer:
    """A single worker thread with a task queue and timers (see the module docstring)."""

    def __init__(
        self,
        clock: Clock,
        *,
        name: str = "pymesh-xds",
        after_task: Callable[[], None] | None = None,
    ) -> None:
        self._clock = clock
        self._after_task = after_task
        self._cv = threading.Condition()
        self._tasks: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._remove_listener = clock.add_listener(self._on_clock_jump)
        self._thread.start()

    @property
    def in_thread(self) -> bool:
        """True when called from the serializer's own thread."""
        return threading.current_thread() is self._thread

    @property
    def closed(self) -> bool:
        return self._closed

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` later on the thread (dropped silently once closed)."""
        with self._cv:
            if self._closed:
                return
            self._tasks.append(fn)
            self._cv.notify()

    def run_sync(self, fn: Callable[[], T], timeout: float = _SYNC_TIMEOUT) -> T:
        """Run ``fn`` on the thread and return its result (inline if already on it)."""
        if self.in_thread:
            return fn()
        done = threading.Event()
        box: list[T] = []
        errors: list[BaseException] = []

        def task() -> None:
            try:
                box.append(fn())
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        with self._cv:
            if self._closed:
                raise XdsError("the xDS client is closed")
            self._tasks.append(task)
            self._cv.notify()
        if not done.wait(timeout):
            raise XdsError(f"the xDS work serializer did not answer within {timeout} s")
        if errors:
            raise errors[0]
        return box[0]

    def call_at(self, deadline: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` on the thread once the clock reaches ``deadline``."""
        timer = Timer(deadline, fn)
        with self._cv:
            heapq.heappush(self._timers, (deadline, next(self._seq), timer))
            self._cv.notify()
        return timer

    def close(self) -> None:
        """Stop the thread after the task at hand; pending tasks and timers are dropped."""
        self._remove_listener()
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._tasks.clear()
            self._timers.clear()
            self._cv.notify()
        if not self.in_thread:
            self._thread.join(_SYNC_TIMEOUT)

    # -- internals -------------------------------------------------------------------------

    def _on_clock_jump(self) -> None:
        # Called by FakeClock.advance: the no-op goes after the timers now due, so once it
        # ran, they ran too.
        if self._closed:
            return
        if self.in_thread:
            self._run_due_timers()
            return
        try:
            self.run_sync(lambda: None)
        except XdsError:
            pass

    def _pop_due(self) -> list[Timer]:
        now = self._clock.monotonic()
        due: list[Timer] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                due.append(timer)
        return due

    def _run_due_timers(self) -> None:
        with self._cv:
            due = self._pop_due()
        for timer in due:
            if not timer.cancelled:
                self._execute(timer.fn)

    def _execute(self, fn: Callable[[], None]) -> None:
        restart()
        try:
            fn()
        except Exception:
            log.exception("xDS client task failed")
        if self._after_task is not None and not self._closed:
            try:
                self._after_task()
            except Exception:
                log.exception("xDS client after-task hook failed")

    def _run(self) -> None:
        # Long tasks (a huge update) give the GIL to the application's threads every few
        # hundred microseconds: see pymesh.xds.pacing.
        with paced():
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closed:
                        return
                    due = self._pop_due()
                    if due or self._tasks:
                        break
                    while self._timers and self._timers[0][2].cancelled:
                        heapq.heappop(self._timers)
                    timeout = self._clock.wait_timeout(self._timers[0][0]) if self._timers else None
                    self._cv.wait(timeout)
                task = self._tasks.popleft() if self._tasks and not due else None
            for timer in due:
                if self._closed:
                    return
                if not timer.cancelled:
                    self._execute(timer.fn)
            if task is not None and not self._closed:
                self._execute(task)
