"""Access log lines: Envoy's default text format and a JSON form with the same fields.

Envoy's default format (what ``istioctl``'s ``accessLogFile`` gives with the default
encoding, minus Istio's extra trailing fields)::

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
    %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"

A missing value is ``-``, as Envoy writes it.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AccessLogWriter",
    "AccessRecord",
    "LogFile",
    "LogFileError",
    "agent_and_id",
    "format_json",
    "format_text",
    "text_item",
    "text_line",
]

_log = logging.getLogger("pymesh.telemetry")


@dataclass(slots=True)
class AccessRecord:
    """Everything one access log line says about one request."""

    start: float
    """Wall-clock start (``time.time()``)."""
    method: str
    path: str
    protocol: str
    """``HTTP/1.1`` / ``HTTP/2``."""
    status: int
    flags: str
    """Response flags joined by ``,`` or ``-``."""
    bytes_received: int
    bytes_sent: int
    duration_ms: int
    authority: str
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    request_id: str | None = None
    user_agent: str | None = None
    forwarded_for: str | None = None
    upstream_service_time: int | None = None
    grpc_status: int | None = None
    reporter: str = "source"
    trace_id: str | None = None


# The last second / millisecond formatted, as one (value, text) tuple each: replaced whole,
# so a thread never reads one value's text with another's.
_last_second: list[tuple[int, str]] = [(-1, "")]
_last_ms: list[tuple[int, str]] = [(-1, "")]


def _start_second(second: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a Unix second (UTC): one formatted second, reused
    (strftime is most of a line's cost)."""
    cached = _last_second[0]
    if cached[0] != second:
        cached = _last_second[0] = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return cached[1]


def _start_time(start: float) -> str:
    """``START_TIME`` of a line: UTC to the millisecond. Lines of the same millisecond
    share its text."""
    ms = int(start * 1000)
    stamp = _last_ms[0]
    if stamp[0] != ms:
        stamp = _last_ms[0] = (ms, f"{_start_second(ms // 1000)}.{ms % 1000:03d}Z")
    return stamp[1]


def format_text(r: AccessRecord) -> str:
    """One line in Envoy's default access log format (no trailing newline)."""
    return text_line(
        r.start,
        r.method,
        r.path,
        r.protocol,
        r.status,
        r.flags,
        r.bytes_received,
        r.bytes_sent,
        r.duration_ms,
        r.upstream_service_time,
        r.forwarded_for,
        r.user_agent,
        r.request_id,
        r.authority,
        r.upstream_host,
    )


def text_line(  # noqa: PLR0917 - one argument per field of the line, hot path
    start: float,
    method: str,
    path: str,
    protocol: str,
    status: int,
    flags: str,
    bytes_received: int,
    bytes_sent: int,
    duration_ms: int,
    upstream_service_time: int | None,
    forwarded_for: str | None,
    user_agent: str | None,
    request_id: str | None,
    authority: str | None,
    upstream_host: str | None,
) -> str:
    """:func:`format_text` from the fields themselves (the request path builds no record)."""
    ust = "-" if upstream_service_time is None else str(upstream_service_time)
    return (  # a missing (or empty) value is "-", quoted like the others
        f'[{_start_time(start)}] "{method} {path} {protocol}" {status} {flags} '
        f'{bytes_received} {bytes_sent} {duration_ms} {ust} "{forwarded_for or "-"}" '
        f'"{user_agent or "-"}" "{request_id or "-"}" "{authority or "-"}" '
        f'"{upstream_host or "-"}"'
    )


def format_json(r: AccessRecord) -> str:
    """One JSON object with Istio's JSON access log keys (``null`` for missing values)."""
    return json.dumps(
        {
            "start_time": _start_time(r.start),
            "method": r.method,
            "path": r.path,
            "protocol": r.protocol,
            "response_code": r.status,
            "grpc_status": r.grpc_status,
            "response_flags": r.flags,
            "bytes_received": r.bytes_received,
            "bytes_sent": r.bytes_sent,
            "duration": r.duration_ms,
            "upstream_service_time": r.upstream_service_time,
            "x_forwarded_for": r.forwarded_for,
            "user_agent": r.user_agent,
            "request_id": r.request_id,
            "authority": r.authority,
            "upstream_host": r.upstream_host,
            "upstream_cluster": r.upstream_cluster,
            "reporter": r.reporter,
            "trace_id": r.trace_id,
        },
        separators=(",", ":"),
    )


def text_item(item: tuple[Any, ...]) -> str:
    """The line of one queued text item: :func:`text_line`'s 15 fields, then the request's
    header items, where a user agent / request id not given (``None``) is looked up."""
    user_agent, request_id = item[11], item[12]
    if user_agent is None or request_id is None:
        user_agent, request_id = agent_and_id(item[15], user_agent, request_id)
    return text_line(*item[:11], user_agent, request_id, item[13], item[14])  # type: ignore[call-arg]


def agent_and_id(
    headers: Iterable[tuple[str, str]], user_agent: str | None, request_id: str | None
) -> tuple[str | None, str | None]:
    """The ``user-agent`` and ``x-request-id`` of lower-case request ``headers``, unless
    given."""
    for name, value in headers:
        if name == "x-request-id" and request_id is None:
            request_id = value
        elif name == "user-agent" and user_agent is None:
            user_agent = value
    return user_agent, request_id


class LogFileError(ValueError):
    """An access log file that cannot be opened (the message names its path)."""


class LogFile:
    """An access log file, written a batch of lines at a time (Istio's ``accessLogFile``):
    ``/dev/stdout`` and ``/dev/stderr`` write to the process's ``sys.stdout`` /
    ``sys.stderr`` as they are at each write; any other path is opened once, in append
    mode (an error names the path)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: Any = None
        self._std = self.path in ("/dev/stdout", "/dev/stderr")
        if not self._std:
            try:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise LogFileError(f"access log file {self.path}: {exc.strerror or exc}") from None

    def write_lines(self, lines: list[str]) -> None:
        """The lines, each ended by a newline, in one write, then flushed."""
        if self._std:
            out = sys.stdout if self.path == "/dev/stdout" else sys.stderr
        elif self._file is None:
            raise ValueError(f"access log file {self.path} is closed")
        else:
            out = self._file
        out.write("\n".join(lines) + "\n")
        out.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


FLUSH_INTERVAL = 0.1
"""Seconds between the writer thread's flushes (Envoy: ``access_log_flush_interval``)."""

MAX_PENDING = 100_000
"""Queued lines at most; further lines are dropped and counted (never blocks a request)."""


class AccessLogWriter:
    """Access log lines off the request path, as Envoy buffers its access logs and flushes
    them on a timer: a request appends its fields (a tuple or an :class:`AccessRecord`) to a
    bounded queue; a daemon thread formats and writes them every ``interval`` seconds, in
    order: one ``sink(line)`` call per line, or one ``write_lines(lines)`` call per batch (a
    :class:`LogFile`'s). A full queue drops the line and counts it in
    :attr:`dropped` rather than block the request. :meth:`flush` writes everything queued
    (called at :meth:`close` and at interpreter exit)."""

    def __init__(
        self,
        render: Callable[[list[Any]], list[str]],
        sink: Callable[[str], None] | None = None,
        *,
        write_lines: Callable[[list[str]], None] | None = None,
        interval: float = FLUSH_INTERVAL,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if (sink is None) == (write_lines is None):
            raise ValueError("give one of sink (a call per line) and write_lines (per batch)")
        self._render = render
        self._sink = sink
        self._write_lines = write_lines
        self._interval = interval
        self._max = max_pending
        self._pending: collections.deque[Any] = collections.deque()
        # One flush at a time, so lines stay in order; re-entrant, so a sink that reads
        # metrics (which drains this queue first) continues the flush instead of deadlocking.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.dropped = 0
        """Lines dropped because the queue was full."""

    def put(self, item: Any) -> None:
        """Queue one line's fields (the request path: an append, no formatting, no I/O)."""
        pending = self._pending
        if len(pending) >= self._max:
            self.dropped += 1
            return
        pending.append(item)
        if self._thread is None:
            self._start()

    def offer(self, item: Any) -> bool:
        """Queue ``item`` unless the queue is full (``False``: not queued, not counted:
        the caller handles it, see :meth:`Telemetry._queue`)."""
        pending = self._pending
        if len(pending) >= self._max:
            return False
        pending.append(item)
        if self._thread is None:
            self._start()
        return True

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None or self._stop.is_set():
                return
            thread = threading.Thread(
                target=_run, args=(weakref.ref(self), self._stop, self._interval),
                name="pymesh-access-log", daemon=True,
            )  # fmt: skip
            self._thread = thread
            _writers.add(self)
            thread.start()

    def flush(self) -> None:
        """Format and write every queued line now (in the caller's thread), in one go: a
        batch holds the GIL about 2 µs per line, and one hand-over per batch is cheaper for
        a busy request thread than many (pacing the batch, tried, cost more CPU per line
        with an event loop that never waits). The batch is rendered by one ``render``
        call (the telemetry's :meth:`~pymesh.telemetry.Telemetry._render`: metrics under
        one lock, lines in order)."""
        with self._lock:
            pending = self._pending
            popleft = pending.popleft
            # what is queued now (a re-entrant flush, from the sink, takes what follows)
            batch = [popleft() for _ in range(len(pending))]
            if not batch:
                return
            try:
                lines = self._render(batch)
            except Exception:  # one bad record: the others are still counted and written
                lines = []
                for item in batch:
                    try:
                        lines += self._render([item])
                    except Exception:
                        _log.exception("access log: rendering a record failed")
            if not lines:
                return
            if self._write_lines is not None:  # a file: one write a batch
                try:
                    self._write_lines(lines)
                except Exception:  # a broken file must never fail a request
                    _log.exception("access log: writing %d lines failed", len(lines))
                return
            sink = self._sink
            assert sink is not None
            for line in lines:
                try:
                    sink(line)
                except Exception:  # a broken sink must never fail a request
                    _log.exception("access log sink failed")

    def close(self) -> None:
        """Stop the thread and write what is left."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self.flush()
        _writers.discard(self)


def _run(ref: weakref.ref[AccessLogWriter], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        writer = ref()
        if writer is None:
            return
        writer.flush()
        del writer


_writers: weakref.WeakSet[AccessLogWriter] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for writer in list(_writers):
        writer.flush()


def _after_fork_in_child() -> None:
    """A forked child (a pre-fork server's worker) has no writer thread: forget it, so the
    child's first line starts its own, and drop the lines copied from the parent (the
    parent writes those)."""
    for writer in list(_writers):
        writer._lock = threading.RLock()
        writer._start_lock = threading.Lock()
        writer._pending.clear()
        writer._thread = None
        _writers.discard(writer)


os.register_at_fork(after_in_child=_after_fork_in_child)
