"""Retry decisions for one call, as Envoy's router decides them (``RetryStateImpl``).

A :class:`RetryState` is created per call from the route's resolved
:class:`~pymesh.model.route.RetryPolicy` and the request. After every failed attempt the
attempt loop asks :meth:`RetryState.should_retry`; the answer is :class:`Retry` (wait
``delay`` seconds, then try again) or :class:`GiveUp` (with the reason). It never sleeps and
never reads a clock: the loop owns the waiting (STYLE.md #3). Randomness (back-off jitter) is
an injected ``random.Random``.

Theory of operation
-------------------

One state per call; ``remaining`` starts at ``num_retries`` (or ``x-envoy-max-retries``)::

    after an attempt      condition (checked in this order)      decision
    --------------------  -------------------------------------  -------------------------
    outcome               retry_on empty (no policy, no header)  GiveUp(no-retry-policy)
    outcome               retry_on does not cover it             GiveUp(not-retriable)
    outcome               remaining == 0                         GiveUp(retry-limit-exceeded)
    outcome (gRPC only)   pushback negative or unreadable        GiveUp(server-pushback)
    outcome               remaining -= 1, breaker/budget refuses GiveUp(retry-overflow)
    outcome (gRPC only)   pushback N ms                          Retry(N ms), back-off reset
    outcome               otherwise                              Retry(jittered back-off)

The order is Envoy's: a retry that the limit forbids does not consult the breaker, and one the
breaker refuses has still used up one of the call's retries. The back-off ceiling starts at
``base_interval`` and doubles per retry up to ``max_interval``; the delay is uniform in
``[0, ceiling)`` in whole milliseconds (Envoy's ``JitteredExponentialBackOffStrategy``).

Why not tenacity
----------------
tenacity expresses a retry *loop*: ``Retrying`` calls the function, sleeps and loops itself,
which our I/O-free generator design forbids (the attempt loop yields ``Sleep`` and is driven
by a sync or an async runner). Its reusable part would be the wait strategy, but
``wait_random_exponential`` draws from the module-global :mod:`random` (not injectable: no
seeded, reproducible tests, and shared state across threads), draws floats in a closed
interval where Envoy draws whole milliseconds in a half-open one, and every wait strategy
takes a ``RetryCallState`` whose constructor reads ``time.monotonic()`` and wants a retrying
object — too much machinery on the hot path for ``min(base * 2**n, max)``. The unit tests
check that our ceiling equals tenacity's ``wait_exponential`` for the same parameters, so the
schedules agree where they overlap.

gRPC (``is_grpc=True``) follows gRFC A44, as grpcio's own xDS client does: only the gRPC
status conditions of ``retry_on`` count (``cancelled``, ``deadline-exceeded``, ``internal``,
``resource-exhausted``, ``unavailable``; a connect failure or reset counts as
``UNAVAILABLE`` and an attempt's deadline as ``DEADLINE_EXCEEDED``, as grpcio sees them),
plus ``connect-failure`` / ``reset-before-request`` for a connect failure (beyond A44: an
attempt that never reached its endpoint is retried as for HTTP),
request headers are ignored, at most 5 attempts (gRFC A6's cap), the back-off is
``random(0, ceiling)`` in seconds, and the server's
``grpc-retry-pushback-ms`` (in ``Outcome.headers``: the trailing metadata) sets the next
delay or forbids the retry (gRFC A6).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pymesh.core.types import Headers, Outcome, RequestInfo, ResetKind
from pymesh.model.route import HeaderMatcher, RetryPolicy

__all__ = [
    "CONSUMED_REQUEST_HEADERS",
    "GRPC_RETRY_ON",
    "PREVIOUS_HOSTS_PREDICATE",
    "PUSHBACK_HEADER",
    "GiveUp",
    "Retry",
    "RetryDecision",
    "RetryState",
    "backoff_ceiling",
    "header_matches",
    "request_header_matches",
    "strip_consumed",
]

PREVIOUS_HOSTS_PREDICATE = "envoy.retry_host_predicates.previous_hosts"

GRPC_RETRY_ON: dict[str, int] = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
"""``x-envoy-retry-grpc-on`` tokens and the gRPC status code each retries."""

_HTTP_RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
    }
)

CONSUMED_REQUEST_HEADERS = (
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-upstream-rq-per-try-timeout-ms",
)
"""Retry headers Envoy consumes: the adapter removes them before forwarding upstream."""

_GRPC_MAX_ATTEMPTS = 5
_GIVE_UP_NOT_RETRIABLE = "not-retriable"
_GIVE_UP_LIMIT = "retry-limit-exceeded"
_GIVE_UP_OVERFLOW = "retry-overflow"
_GIVE_UP_DISABLED = "no-retry-policy"
_GIVE_UP_PUSHBACK = "server-pushback"
PUSHBACK_HEADER = "grpc-retry-pushback-ms"


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay`` seconds (already jittered)."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Do not retry. ``reason`` is one of ``no-retry-policy``, ``not-retriable``,
    ``retry-limit-exceeded`` (Envoy flag ``URX``), ``retry-overflow`` (``UO``: the retry
    circuit breaker or budget refused; the last outcome is what the caller sees) or, for gRPC,
    ``server-pushback`` (the server's ``grpc-retry-pushback-ms`` said not to)."""

    reason: str

    @property
    def overflow(self) -> bool:
        return self.reason == _GIVE_UP_OVERFLOW

    @property
    def limit_exceeded(self) -> bool:
        return self.reason == _GIVE_UP_LIMIT


RetryDecision = Retry | GiveUp


def backoff_ceiling(base: float, maximum: float, retry_index: int) -> float:
    """The back-off ceiling before retry number ``retry_index`` (0 for the first retry):
    ``min(base * 2**retry_index, maximum)``, Envoy's doubling with a cap."""
    if retry_index >= 64:
        return maximum
    return min(base * (1 << retry_index), maximum)


def header_matches(matcher: HeaderMatcher, headers: Headers) -> bool:
    """Envoy's ``HeaderUtility::matchHeaders`` for one matcher (values of a repeated header
    are joined with ``,``)."""
    value = headers.get(matcher.name)
    if value is None and not matcher.treat_missing_header_as_empty:
        # A missing header only matches "present: false" (or inverted "present: true").
        if matcher.present_match is None:
            return False
        return matcher.present_match if matcher.invert_match else not matcher.present_match
    if value is None:
        value = ""
    if matcher.string_match is not None:
        match = matcher.string_match.matches(value)
    elif matcher.range_match is not None:
        try:
            number = int(value, 10)
        except ValueError:
            match = False
        else:
            match = matcher.range_match.contains(number)
    elif matcher.present_match is not None:
        match = matcher.present_match
    else:
        match = True
    return match != matcher.invert_match


def request_header_matches(matcher: HeaderMatcher, request: RequestInfo) -> bool:
    """:func:`header_matches` against a request, with its pseudo-headers (``:method``,
    ``:authority``, ``:path``, ``:scheme``) visible as Envoy sees them."""
    pseudo = {
        ":method": request.method,
        ":authority": request.authority,
        ":path": request.path,
        ":scheme": request.scheme,
    }.get(matcher.name)
    if pseudo is None:
        return header_matches(matcher, request.headers)
    return header_matches(matcher, Headers([(matcher.name, pseudo)]))


def _tokens(value: str | None) -> set[str]:
    if not value:
        return set()
    return {t.strip() for t in value.split(",") if t.strip()}


def _uint(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        return None
    return int(value)


class _Compiled:
    """What a :class:`RetryPolicy` says, precomputed once per policy object (the hot path
    builds a :class:`RetryState` per call)."""

    __slots__ = (
        "base",
        "codes",
        "grpc_retry_on",
        "host_selection_attempts",
        "max",
        "num_retries",
        "per_try_timeout",
        "policy",
        "predicate_previous",
        "restrict",
        "retriable_headers",
        "retry_on",
    )

    def __init__(self, policy: RetryPolicy | None) -> None:
        self.policy = policy
        if policy is None:
            self.retry_on: frozenset[str] = frozenset()
            self.num_retries = 1
            self.codes: frozenset[int] = frozenset()
            self.retriable_headers: tuple[HeaderMatcher, ...] = ()
            self.restrict: tuple[HeaderMatcher, ...] = ()
            self.base = 0.025
            self.max = 0.25
            self.predicate_previous = False
            self.host_selection_attempts = 1
            self.per_try_timeout: float | None = None
        else:
            self.retry_on = policy.retry_on
            self.num_retries = policy.num_retries
            self.codes = frozenset(policy.retriable_status_codes)
            self.retriable_headers = policy.retriable_headers
            self.restrict = policy.retriable_request_headers
            self.base = policy.base_interval
            self.max = policy.max_interval
            self.predicate_previous = PREVIOUS_HOSTS_PREDICATE in policy.retry_host_predicates
            self.host_selection_attempts = (
                policy.host_selection_retry_max_attempts if self.predicate_previous else 1
            )
            self.per_try_timeout = policy.per_try_timeout
        self.grpc_retry_on = self.retry_on & (_GRPC_TOKENS | _CONNECT_TOKENS)


_GRPC_TOKENS = frozenset(GRPC_RETRY_ON)
_CONNECT_TOKENS = frozenset({"connect-failure", "reset-before-request"})
"""The transport conditions a gRPC call also honours: its adapter reports an attempt whose
endpoint could not be connected as ``ResetKind.CONNECT_FAILURE`` (nothing was sent)."""
_COMPILED: dict[int, _Compiled] = {}
_COMPILED_MAX = 4096
_NO_POLICY = _Compiled(None)


def _compiled(policy: RetryPolicy | None) -> _Compiled:
    if policy is None:
        return _NO_POLICY
    c = _COMPILED.get(id(policy))
    if c is None or c.policy is not policy:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.clear()  # bounded: config churn must not grow it forever
        c = _COMPILED[id(policy)] = _Compiled(policy)
    return c


_Flags = tuple[bool, bool, bool, bool, bool, bool, bool, frozenset[int]]
_FLAGS: dict[frozenset[str], _Flags] = {}


def _flags(retry_on: frozenset[str]) -> _Flags:
    """What ``retry_on`` turns on, as :class:`RetryState` keeps it; memoized per set (a
    handful of distinct sets exist: the policies' and the request headers' combinations)."""
    found = _FLAGS.get(retry_on)
    if found is None:
        if len(_FLAGS) >= _COMPILED_MAX:
            _FLAGS.clear()  # bounded, as _COMPILED
        found = _FLAGS[retry_on] = (
            "5xx" in retry_on,
            "gateway-error" in retry_on,
            "retriable-4xx" in retry_on,
            "retriable-status-codes" in retry_on,
            "retriable-headers" in retry_on,
            "envoy-ratelimited" in retry_on,
            bool(retry_on & _RESET_TOKENS),
            frozenset(GRPC_RETRY_ON[t] for t in retry_on & _GRPC_TOKENS),
        )
    return found


def _control_headers(headers: Headers) -> dict[str, str] | None:
    """The request's ``x-envoy-*`` headers (repeated values joined with ``,``), or None.
    Istio's metadata exchange headers (``x-envoy-peer-metadata[-id]``, on every request
    while telemetry is on) control nothing: skipped, so they keep the fast path."""
    found: dict[str, str] | None = None
    for name, value in headers:
        if name.startswith("x-envoy-") and not name.startswith("x-envoy-peer-metadata"):
            if found is None:
                found = {}
            found[name] = f"{found[name]},{value}" if name in found else value
    return found


class RetryState:
    """The retry decisions of one call (Envoy ``RetryStateImpl``; gRFC A44 for gRPC).

    ``enabled`` is False when neither the policy nor the request headers ask for retries;
    :meth:`should_retry` then always gives up. Call :meth:`record_host` with the key of each
    attempt's host; :attr:`previous_hosts` is what to exclude when picking the next one
    (non-empty only with the ``previous_hosts`` retry host predicate).
    """

    __slots__ = (
        "_base",
        "_codes",
        "_grpc",
        "_grpc_codes",
        "_hosts",
        "_max",
        "_on_5xx",
        "_on_409",
        "_on_codes",
        "_on_gateway",
        "_on_headers",
        "_on_ratelimited",
        "_on_reset",
        "_predicate_previous",
        "_retriable_headers",
        "_retry_index",
        "_rng",
        "host_selection_attempts",
        "per_try_timeout",
        "remaining",
        "retries_done",
        "retry_on",
    )

    def __init__(
        self,
        policy: RetryPolicy | None,
        request: RequestInfo,
        *,
        rng: random.Random,
        is_grpc: bool = False,
    ) -> None:
        c = _compiled(policy)
        self._rng = rng
        self._grpc = is_grpc
        self._hosts: frozenset[str] = frozenset()
        self._retry_index = 0
        self.retries_done = 0
        self._base = c.base
        self._max = c.max
        self.per_try_timeout = c.per_try_timeout
        retry_on = c.retry_on
        remaining = c.num_retries
        codes = c.codes
        retriable = c.retriable_headers
        if is_grpc:
            # A44: only the gRPC conditions, no headers; A6: at most 5 attempts.
            retry_on = c.grpc_retry_on
            remaining = min(remaining, _GRPC_MAX_ATTEMPTS - 1)
            self._predicate_previous = False
            self.host_selection_attempts = 1
        else:
            self._predicate_previous = c.predicate_previous
            self.host_selection_attempts = c.host_selection_attempts
            ctl = _control_headers(request.headers)
            if ctl is not None:
                retry_on = (
                    retry_on
                    | (_tokens(ctl.get("x-envoy-retry-on")) & _HTTP_RETRY_ON)
                    | (_tokens(ctl.get("x-envoy-retry-grpc-on")) & _GRPC_TOKENS)
                )
            # The route may restrict retries to requests matching one of these.
            if c.restrict and not any(request_header_matches(m, request) for m in c.restrict):
                retry_on = frozenset()
            if ctl is not None:
                if retry_on:
                    max_retries = _uint(ctl.get("x-envoy-max-retries"))
                    if max_retries is not None:
                        remaining = max_retries
                extra_codes = [
                    code
                    for code in map(_uint, _tokens(ctl.get("x-envoy-retriable-status-codes")))
                    if code is not None
                ]
                if extra_codes:
                    codes = codes | frozenset(extra_codes)
                names = _tokens(ctl.get("x-envoy-retriable-header-names"))
                if names:
                    retriable = retriable + tuple(
                        HeaderMatcher(name=n.lower(), present_match=True) for n in sorted(names)
                    )
        self.retry_on: frozenset[str] = retry_on
        self.remaining = remaining
        self._codes = codes
        self._retriable_headers = retriable
        (
            self._on_5xx,
            self._on_gateway,
            self._on_409,
            self._on_codes,
            self._on_headers,
            self._on_ratelimited,
            self._on_reset,
            self._grpc_codes,
        ) = _flags(retry_on)

    @property
    def enabled(self) -> bool:
        return bool(self.retry_on)

    @property
    def previous_hosts(self) -> frozenset[str]:
        """Keys of hosts already tried, when the ``previous_hosts`` predicate is on."""
        return self._hosts

    def record_host(self, key: str) -> None:
        """Note the host an attempt went to (for the ``previous_hosts`` predicate)."""
        if self._predicate_previous:
            self._hosts = self._hosts | {key}

    def would_retry(self, outcome: Outcome) -> bool:
        """Whether ``retry_on`` covers this outcome (ignoring the retry count and budget)."""
        if not self.retry_on:
            return False
        reset = outcome.reset
        if reset is not None:
            if self._grpc:
                # A44 retries on status codes only. grpcio sees a failed connection or a
                # reset stream as UNAVAILABLE and an attempt's deadline as DEADLINE_EXCEEDED,
                # and retries them when those codes are retriable: so do we. A connect
                # failure is also retried under connect-failure / reset-before-request, as
                # for HTTP (the request never left).
                if reset is ResetKind.CONNECT_FAILURE and not self.retry_on.isdisjoint(
                    _CONNECT_TOKENS
                ):
                    return True
                code = 4 if reset is ResetKind.PER_TRY_TIMEOUT else 14
                return code in self._grpc_codes
            if reset is ResetKind.CONNECT_FAILURE and (
                "connect-failure" in self.retry_on or "reset-before-request" in self.retry_on
            ):
                # A connect failure is also a reset before any request byte went upstream.
                return True
            if reset is ResetKind.REFUSED_STREAM and "refused-stream" in self.retry_on:
                return True
            # Envoy: any reset, including a per-try timeout, under 5xx / gateway-error / reset.
            return self._on_reset
        grpc_status = outcome.grpc_status
        if self._grpc:
            return grpc_status is not None and grpc_status in self._grpc_codes
        status = outcome.status
        would = False
        if status is not None:
            if status >= 500:
                would = self._on_5xx or (self._on_gateway and status in (502, 503, 504))
            if not would and status == 409:
                would = self._on_409
            if not would and self._on_codes:
                would = status in self._codes
            if not would and self._on_headers:
                headers = outcome.headers
                would = any(header_matches(m, headers) for m in self._retriable_headers)
        if not would and grpc_status is not None:
            would = grpc_status in self._grpc_codes
        # Envoy checks this first: a response from an upstream Envoy's rate limiter is
        # retried only under ``envoy-ratelimited``, whatever else applies.
        if (would or self._on_ratelimited) and "x-envoy-ratelimited" in outcome.headers:
            return self._on_ratelimited
        return would

    def should_retry(
        self, outcome: Outcome, *, budget_ok: bool | Callable[[], bool]
    ) -> RetryDecision:
        """Decide after a failed attempt. ``budget_ok`` is the retry circuit breaker / budget
        answer; pass a callable (e.g. ``limits.try_start_retry``) to have it consulted only
        when a retry is otherwise allowed, which is Envoy's order and takes the retry slot
        only when it is used."""
        if not self.retry_on:
            return _DISABLED
        if not self.would_retry(outcome):
            return _NOT_RETRIABLE
        if self.remaining <= 0:
            return _LIMIT
        pushback: float | None = None
        if self._grpc:
            # gRFC A6: the server may set the next delay, or forbid the retry (a negative
            # or unreadable value); after a pushback the back-off starts over.
            value = outcome.headers.get(PUSHBACK_HEADER)
            if value is not None:
                millis = _uint(value)
                if millis is None:
                    return _PUSHBACK
                pushback = millis / 1000.0
        self.remaining -= 1
        ok = budget_ok() if callable(budget_ok) else budget_ok
        if not ok:
            return _OVERFLOW
        self.retries_done += 1
        if pushback is not None:
            self._retry_index = 0
            return Retry(pushback)
        return Retry(self._next_delay())

    def _next_delay(self) -> float:
        ceiling = backoff_ceiling(self._base, self._max, self._retry_index)
        self._retry_index += 1
        if self._grpc:
            return self._rng.uniform(0.0, ceiling)
        ceiling_ms = int(ceiling * 1000)
        if ceiling_ms <= 0:
            return 0.0
        return self._rng.randrange(ceiling_ms) / 1000.0


_RESET_TOKENS = frozenset({"5xx", "gateway-error", "reset"})
_DISABLED = GiveUp(_GIVE_UP_DISABLED)
_NOT_RETRIABLE = GiveUp(_GIVE_UP_NOT_RETRIABLE)
_LIMIT = GiveUp(_GIVE_UP_LIMIT)
_OVERFLOW = GiveUp(_GIVE_UP_OVERFLOW)
_PUSHBACK = GiveUp(_GIVE_UP_PUSHBACK)


def strip_consumed(headers: Headers, names: Sequence[str] = CONSUMED_REQUEST_HEADERS) -> Headers:
    """``headers`` without the retry/timeout control headers Envoy consumes."""
    if not any(name in headers for name in names):
        return headers
    return headers.without(*names)
