"""Call timeouts, as Envoy's router and connection manager compute them.

:func:`call_deadlines` turns the route's timeouts, the retry policy and the request's timeout
headers into :class:`Deadlines`: an overall monotonic deadline across all attempts and
back-offs, and a per-attempt timeout. When the overall deadline passes, the call answers
504 ``upstream request timeout`` (Envoy's router) — or, when the stream duration limit is the
one that fired, 504 ``downstream duration timeout`` with gRPC ``DEADLINE_EXCEEDED``. A
per-try timeout is an attempt outcome (``ResetKind.PER_TRY_TIMEOUT``) the retry policy may
retry.

The router's timeout (``FilterUtility::finalTimeout``):

* the route's ``timeout`` — ``None`` means Envoy's default of 15 s, ``0`` means none (Istio
  sends 0 unless a VirtualService sets a timeout); for a gRPC request with
  ``max_grpc_timeout`` set (Istio sets it on sidecar routes), the ``grpc-timeout`` header
  minus ``grpc_timeout_offset`` capped by ``max_grpc_timeout`` (0 = uncapped; no header =
  the cap) instead. Routes with a ``max_stream_duration`` block use the stream duration
  below instead (Envoy's "new timeouts");
* ``x-envoy-upstream-rq-timeout-ms`` replaces it (0 = none);
* per try: the retry policy's ``per_try_timeout``, replaced by
  ``x-envoy-upstream-rq-per-try-timeout-ms``; ignored when it is not below a non-zero
  router timeout.

The stream duration limit (connection manager, ``refreshDurationTimeout``): with a
``grpc-timeout`` header and ``grpc_timeout_header_max`` set, the header value capped by that
max (0 = uncapped) minus ``grpc_timeout_header_offset``; otherwise the route's
``max_stream_duration`` (0 = none), else the listener's ``max_stream_duration``.

The overall deadline is the earlier of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymesh.core.types import Headers, RequestInfo, slot_setter
from pymesh.model.route import DEFAULT_ROUTE_TIMEOUT, RetryPolicy, RouteAction

__all__ = [
    "CONSUMED_REQUEST_HEADERS",
    "Deadlines",
    "call_deadlines",
    "format_grpc_timeout",
    "parse_grpc_timeout",
]

DEFAULT_STREAM_IDLE_TIMEOUT = 300.0
"""Envoy's HCM ``stream_idle_timeout`` when unset (seconds)."""
HEADER_RQ_TIMEOUT = "x-envoy-upstream-rq-timeout-ms"
HEADER_PER_TRY_TIMEOUT = "x-envoy-upstream-rq-per-try-timeout-ms"
CONSUMED_REQUEST_HEADERS = (HEADER_RQ_TIMEOUT, HEADER_PER_TRY_TIMEOUT)
"""Timeout headers Envoy consumes: the adapter removes them before forwarding upstream."""

_GRPC_UNITS = {"H": 3600_000_000_000, "M": 60_000_000_000, "S": 1_000_000_000,
               "m": 1_000_000, "u": 1_000, "n": 1}  # fmt: skip


@dataclass(frozen=True, slots=True, init=False)
class Deadlines:
    """``overall``: monotonic deadline of the whole call (``None`` = none). ``per_try``:
    seconds allowed to each attempt (``None`` = none; the overall deadline still applies).
    ``per_try_idle``: the retry policy's per-try idle timeout. ``stream_duration`` is True
    when ``overall`` comes from the stream duration limit rather than the router timeout
    (the local reply then says ``downstream duration timeout``)."""

    overall: float | None
    per_try: float | None
    per_try_idle: float | None = None
    stream_duration: bool = False
    idle: float | None = None
    """Seconds the stream may stay without activity: the route's ``idle_timeout``, else the
    listener's ``stream_idle_timeout`` (Envoy's default 300 s); 0 = none. When it passes
    before the response starts, Envoy answers 504 ``stream timeout``."""
    router_timeout: float | None = None
    """The router's own timeout (route, ``x-envoy-upstream-rq-timeout-ms`` or gRPC
    ``max_grpc_timeout``), seconds; ``None`` = none."""
    rewrite_grpc_timeout: bool = False
    """A gRPC request on a ``max_grpc_timeout`` route: each attempt's ``grpc-timeout`` header
    is rewritten to the time it has (Envoy's router does so)."""

    def __init__(  # noqa: PLR0917 - the dataclass's field order
        self,
        overall: float | None,
        per_try: float | None,
        per_try_idle: float | None = None,
        stream_duration: bool = False,
        idle: float | None = None,
        router_timeout: float | None = None,
        rewrite_grpc_timeout: bool = False,
    ) -> None:
        # Built per call: slot stores instead of the frozen dataclass's object.__setattr__
        # (see pymesh.core.types).
        _dl_overall(self, overall)
        _dl_per_try(self, per_try)
        _dl_per_try_idle(self, per_try_idle)
        _dl_stream_duration(self, stream_duration)
        _dl_idle(self, idle)
        _dl_router_timeout(self, router_timeout)
        _dl_rewrite_grpc_timeout(self, rewrite_grpc_timeout)

    def starting_at(self, now: float) -> Deadlines:
        """These deadlines computed for a call starting at 0, for one starting at ``now``."""
        if self.overall is None:
            return self  # immutable, the same at any ``now``
        return Deadlines(
            now + self.overall,
            self.per_try,
            self.per_try_idle,
            self.stream_duration,
            self.idle,
            self.router_timeout,
            self.rewrite_grpc_timeout,
        )

    def attempt_headers(
        self, elapsed: float, *, expected_timeout_header: bool = True
    ) -> tuple[tuple[str, str], ...]:
        """Headers to set on an attempt starting ``elapsed`` seconds into the call, as
        Envoy's router sets them (``setTimeoutHeaders``): ``x-envoy-expected-rq-timeout-ms``
        (the per-try timeout, else the router timeout, capped by what is left of the router
        timeout; omitted when the router config has ``suppress_envoy_headers``), and the
        rewritten ``grpc-timeout`` (see :attr:`rewrite_grpc_timeout`)."""
        global_ms = round(self.router_timeout * 1000) if self.router_timeout else 0
        expected = round(self.per_try * 1000) if self.per_try else 0
        if expected == 0:
            expected = global_ms
        if expected <= 0:
            return ()
        if global_ms > 0:
            used = int(elapsed * 1000)
            expected = 1 if used >= global_ms else min(expected, global_ms - used)
        out: list[tuple[str, str]] = []
        if expected_timeout_header:
            out.append(("x-envoy-expected-rq-timeout-ms", str(expected)))
        if self.rewrite_grpc_timeout:
            out.append(("grpc-timeout", format_grpc_timeout(expected)))
        return tuple(out)

    def attempt_deadline(self, now: float) -> float | None:
        """The monotonic deadline of an attempt starting at ``now``."""
        if self.per_try is None:
            return self.overall
        end = now + self.per_try
        return end if self.overall is None else min(end, self.overall)

    def expired(self, now: float) -> bool:
        return self.overall is not None and now >= self.overall

    @property
    def timeout_grpc_status(self) -> int:
        """The gRPC status of that local reply to a gRPC request: ``DEADLINE_EXCEEDED`` (4)
        for the stream duration limit, else the router's 504 mapped to ``UNAVAILABLE`` (14)."""
        return 4 if self.stream_duration else 14

    @property
    def timeout_body(self) -> str:
        """The body of Envoy's local 504 when ``overall`` passes."""
        return "downstream duration timeout" if self.stream_duration else "upstream request timeout"


def format_grpc_timeout(millis: int) -> str:
    """A ``grpc-timeout`` header value for ``millis`` ms as Envoy writes it: milliseconds,
    or (truncating) seconds, minutes, hours when more than 8 digits are needed."""
    value, unit = max(0, millis), "m"
    if value > _GRPC_MAX_VALUE:
        value, unit = value // 1000, "S"
    while value > _GRPC_MAX_VALUE:
        if unit == "H":
            value = _GRPC_MAX_VALUE
        else:
            value, unit = value // 60, "M" if unit == "S" else "H"
    return f"{value}{unit}"


_GRPC_MAX_VALUE = 99_999_999


def parse_grpc_timeout(value: str | None) -> float | None:
    """A ``grpc-timeout`` header (1-8 digits and a unit ``HMSmun``) in seconds, rounded up
    to whole milliseconds as Envoy does; ``None`` when absent or malformed."""
    if not value or len(value) < 2 or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1]
    if not digits.isdigit() or unit not in _GRPC_UNITS:
        return None
    nanos = int(digits) * _GRPC_UNITS[unit]
    millis = -(-nanos // 1_000_000)
    return millis / 1000.0


def _ms(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) / 1000.0 if value.isdigit() else None


def _timeout_headers(headers: Headers) -> tuple[str | None, str | None, str | None]:
    """First values of the router timeout, per-try timeout and ``grpc-timeout`` headers, in
    one pass over the request's headers (names are stored lower-case)."""
    rq = per_try = grpc = None
    for name, value in headers:
        if name == HEADER_RQ_TIMEOUT:
            rq = value if rq is None else rq
        elif name == HEADER_PER_TRY_TIMEOUT:
            per_try = value if per_try is None else per_try
        elif name == "grpc-timeout":
            grpc = value if grpc is None else grpc
    return rq, per_try, grpc


def _router_timeout(action: RouteAction | None, grpc: bool, grpc_timeout: float | None) -> float:
    """Envoy's ``global_timeout_`` in seconds (0 = none), before the request header."""
    if action is None:
        return DEFAULT_ROUTE_TIMEOUT
    if grpc and action.max_grpc_timeout is not None:
        timeout = grpc_timeout or 0.0
        offset = action.grpc_timeout_offset
        if offset is not None and offset < timeout:
            timeout -= offset
        cap = action.max_grpc_timeout
        if cap != 0 and (timeout == 0 or timeout > cap):
            timeout = cap
        return timeout
    return DEFAULT_ROUTE_TIMEOUT if action.timeout is None else action.timeout


_dl_overall = slot_setter(Deadlines, "overall")
_dl_per_try = slot_setter(Deadlines, "per_try")
_dl_per_try_idle = slot_setter(Deadlines, "per_try_idle")
_dl_stream_duration = slot_setter(Deadlines, "stream_duration")
_dl_idle = slot_setter(Deadlines, "idle")
_dl_router_timeout = slot_setter(Deadlines, "router_timeout")
_dl_rewrite_grpc_timeout = slot_setter(Deadlines, "rewrite_grpc_timeout")


def _stream_duration(
    action: RouteAction | None, grpc_timeout: float | None, listener_max: float | None
) -> float | None:
    """Envoy's stream duration limit in seconds (``None`` = none)."""
    header_max = action.grpc_timeout_header_max if action is not None else None
    if grpc_timeout is None or header_max is None:
        if action is not None and action.max_stream_duration is not None:
            return action.max_stream_duration or None
        return listener_max or None
    timeout = grpc_timeout
    if header_max != 0 and timeout > header_max:
        timeout = header_max
    offset = action.grpc_timeout_header_offset if action is not None else None
    if timeout != 0 and offset is not None:
        timeout = timeout - offset if offset < timeout else 0.0
    # A zero here fires at once (Envoy arms the timer with 0).
    return timeout


def call_deadlines(
    action: RouteAction | None,
    retry: RetryPolicy | None,
    request: RequestInfo,
    *,
    now: float,
    max_stream_duration: float | None,
    stream_idle_timeout: float | None = None,
) -> Deadlines:
    """The deadlines of a call starting at ``now`` (monotonic seconds).

    ``action`` is the matched route's action (``None``: Envoy's defaults), ``retry`` the
    resolved retry policy, ``max_stream_duration`` and ``stream_idle_timeout`` the
    listener's (HCM) settings (``None`` = unset).
    """
    rq_header, per_try_header, grpc_header = _timeout_headers(request.headers)
    if rq_header is None and per_try_header is None and grpc_header is None:
        # No timeout header: the deadlines depend on the config alone, plus ``now``.
        key = (id(action), id(retry), request.grpc, max_stream_duration, stream_idle_timeout)
        memo = _MEMO.get(key)
        if memo is None or memo[0] is not action or memo[1] is not retry:
            if len(_MEMO) >= _MEMO_MAX:
                _MEMO.clear()  # bounded: config churn must not grow it forever
            template = _deadlines(
                action,
                retry,
                request.grpc,
                None,
                None,
                None,
                0.0,
                max_stream_duration,
                stream_idle_timeout,
            )
            memo = _MEMO[key] = (action, retry, template)
        return memo[2].starting_at(now)
    return _deadlines(
        action,
        retry,
        request.grpc,
        rq_header,
        per_try_header,
        grpc_header,
        now,
        max_stream_duration,
        stream_idle_timeout,
    )


_MEMO: dict[tuple[int, int, bool, float | None, float | None], tuple[object, object, Deadlines]]
_MEMO = {}
_MEMO_MAX = 4096


def _deadlines(  # noqa: PLR0917
    action: RouteAction | None,
    retry: RetryPolicy | None,
    is_grpc: bool,
    rq_header: str | None,
    per_try_header: str | None,
    grpc_header: str | None,
    now: float,
    max_stream_duration: float | None,
    stream_idle_timeout: float | None,
) -> Deadlines:
    grpc_timeout = parse_grpc_timeout(grpc_header)
    new_timeouts = action is not None and (
        action.max_stream_duration is not None
        or action.grpc_timeout_header_max is not None
        or action.grpc_timeout_header_offset is not None
    )
    router = 0.0 if new_timeouts else _router_timeout(action, is_grpc, grpc_timeout)
    header_timeout = _ms(rq_header)
    if header_timeout is not None:
        router = header_timeout
    per_try = retry.per_try_timeout if retry is not None else None
    header_per_try = _ms(per_try_header)
    if header_per_try is not None:
        per_try = header_per_try
    if per_try is not None and (per_try == 0 or (router != 0 and per_try >= router)):
        per_try = None
    stream = _stream_duration(action, grpc_timeout, max_stream_duration)
    overall: float | None = None
    from_stream = False
    if router > 0:
        overall = now + router
    if stream is not None and (overall is None or now + stream < overall):
        overall = now + stream
        from_stream = True
    per_try_idle = retry.per_try_idle_timeout if retry is not None else None
    idle = action.idle_timeout if action is not None else None
    if idle is None:
        idle = DEFAULT_STREAM_IDLE_TIMEOUT if stream_idle_timeout is None else stream_idle_timeout
    rewrite = (
        is_grpc and not new_timeouts and action is not None and action.max_grpc_timeout is not None
    )
    return Deadlines(
        overall,
        per_try,
        per_try_idle or None,
        from_stream,
        idle or None,
        router or None,
        rewrite,
    )
