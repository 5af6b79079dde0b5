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

    after an attempt      condition                              decision
    --------------------  -------------------------------------  -------------------------
    outcome               retry_on does not cover it             GiveUp(not-retriable)
    outcome               remaining == 0                         GiveUp(retry-limit-exceeded)
    outcome               remaining -= 1, breaker/budget refuses GiveUp(retry-overflow)
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
``resource-exhausted``, ``unavailable``), request headers are ignored, at most 5 attempts
(gRFC A6's cap), and the back-off is ``random(0, ceiling)`` in seconds.
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


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay`` seconds (already jittered)."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Do not retry. ``reason`` is one of ``no-retry-policy``, ``not-retriable``,
    ``retry-limit-exceeded`` (Envoy flag ``URX``) or ``retry-overflow`` (``UO``: the retry
    circuit breaker or budget refused; the last outcome is what the caller sees)."""

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


class RetryState:
    """The retry decisions of one call (Envoy ``RetryStateImpl``; gRFC A44 for gRPC).

    ``enabled`` is False when neither the policy nor the request headers ask for retries;
    :meth:`should_retry` then always gives up. Call :meth:`record_host` with the key of each
    attempt's host; :attr:`previous_hosts` is what to exclude when picking the next one
    (non-empty only with the ``previous_hosts`` retry host predicate).
    """

    __slots__ = (
        "_base",
        "_grpc",
        "_hosts",
        "_max",
        "_predicate_previous",
        "_retriable_headers",
        "_retriable_status_codes",
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
        self._rng = rng
        self._grpc = is_grpc
        self._hosts: frozenset[str] = frozenset()
        self._retry_index = 0
        self.retries_done = 0
        headers = request.headers
        retry_on: set[str] = set(policy.retry_on) if policy is not None else set()
        remaining = policy.num_retries if policy is not None else 1
        codes: list[int] = list(policy.retriable_status_codes) if policy is not None else []
        retriable: list[HeaderMatcher] = (
            list(policy.retriable_headers) if policy is not None else []
        )
        if is_grpc:
            # A44: only the gRPC conditions, no headers; A6: at most 5 attempts.
            retry_on &= set(GRPC_RETRY_ON)
            remaining = min(remaining, _GRPC_MAX_ATTEMPTS - 1)
        else:
            retry_on |= _tokens(headers.get("x-envoy-retry-on")) & _HTTP_RETRY_ON
            retry_on |= _tokens(headers.get("x-envoy-retry-grpc-on")) & set(GRPC_RETRY_ON)
            # The route may restrict retries to requests matching one of these.
            restrict = policy.retriable_request_headers if policy is not None else ()
            if restrict and not any(request_header_matches(m, request) for m in restrict):
                retry_on = set()
            if retry_on:
                max_retries = _uint(headers.get("x-envoy-max-retries"))
                if max_retries is not None:
                    remaining = max_retries
            for token in _tokens(headers.get("x-envoy-retriable-status-codes")):
                code = _uint(token)
                if code is not None:
                    codes.append(code)
            for name in _tokens(headers.get("x-envoy-retriable-header-names")):
                retriable.append(HeaderMatcher(name=name.lower(), present_match=True))
        self.retry_on: frozenset[str] = frozenset(retry_on)
        self.remaining = remaining
        self._retriable_status_codes = frozenset(codes)
        self._retriable_headers = tuple(retriable)
        self._base = policy.base_interval if policy is not None else 0.025
        self._max = policy.max_interval if policy is not None else 10 * self._base
        self._predicate_previous = (
            policy is not None
            and not is_grpc
            and PREVIOUS_HOSTS_PREDICATE in policy.retry_host_predicates
        )
        self.host_selection_attempts = (
            policy.host_selection_retry_max_attempts
            if policy is not None and self._predicate_previous
            else 1
        )
        self.per_try_timeout = policy.per_try_timeout if policy is not None else None

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
        retry_on = self.retry_on
        if not retry_on:
            return False
        if outcome.reset is not None:
            return self._would_retry_reset(outcome.reset)
        if self._grpc:
            return self._grpc_status_retriable(outcome.grpc_status)
        headers = outcome.headers
        if "x-envoy-ratelimited" in headers:
            return "envoy-ratelimited" in retry_on
        status = outcome.status
        if status is None:
            return False
        if "5xx" in retry_on and 500 <= status <= 599:
            return True
        if "gateway-error" in retry_on and status in (502, 503, 504):
            return True
        if "retriable-4xx" in retry_on and status == 409:
            return True
        if "retriable-status-codes" in retry_on and status in self._retriable_status_codes:
            return True
        if "retriable-headers" in retry_on and any(
            header_matches(m, headers) for m in self._retriable_headers
        ):
            return True
        return self._grpc_status_retriable(outcome.grpc_status)

    def _grpc_status_retriable(self, grpc_status: int | None) -> bool:
        if grpc_status is None:
            return False
        return any(GRPC_RETRY_ON[t] == grpc_status for t in self.retry_on if t in GRPC_RETRY_ON)

    def _would_retry_reset(self, reset: ResetKind) -> bool:
        retry_on = self.retry_on
        if self._grpc:
            # A44 retries on status codes only; a per-try deadline or a reset fails the call
            # (the transport reports those as a status, e.g. UNAVAILABLE, when it has one).
            return False
        if reset is ResetKind.CONNECT_FAILURE and "connect-failure" in retry_on:
            return True
        if reset is ResetKind.REFUSED_STREAM and "refused-stream" in retry_on:
            return True
        # Envoy: any reset, including a per-try timeout, under 5xx / gateway-error / reset.
        return bool(retry_on & {"5xx", "gateway-error", "reset"})

    def should_retry(
        self, outcome: Outcome, *, budget_ok: bool | Callable[[], bool]
    ) -> RetryDecision:
        """Decide after a failed attempt. ``budget_ok`` is the retry circuit breaker / budget
        answer; pass a callable (e.g. ``limits.try_start_retry``) to have it consulted only
        when a retry is otherwise allowed, which is Envoy's order and takes the retry slot
        only when it is used."""
        if not self.retry_on:
            return GiveUp(_GIVE_UP_DISABLED)
        if not self.would_retry(outcome):
            return GiveUp(_GIVE_UP_NOT_RETRIABLE)
        if self.remaining <= 0:
            return GiveUp(_GIVE_UP_LIMIT)
        self.remaining -= 1
        ok = budget_ok() if callable(budget_ok) else budget_ok
        if not ok:
            return GiveUp(_GIVE_UP_OVERFLOW)
        self.retries_done += 1
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


def strip_consumed(headers: Headers, names: Sequence[str] = CONSUMED_REQUEST_HEADERS) -> Headers:
    """``headers`` without the retry/timeout control headers Envoy consumes."""
    if not any(name in headers for name in names):
        return headers
    return headers.without(*names)
