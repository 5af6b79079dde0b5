"""Fault injection, as Envoy's HTTP fault filter (``envoy.filters.http.fault``) decides it.

:func:`decide_fault` looks at the route's effective
:class:`~pymesh.model.http_filters.FaultConfig` (filter config, or the per-route override)
and the request, and answers a :class:`FaultDecision`: delay the request, abort it, both
(abort after the delay) or neither. It does no waiting: the attempt loop yields the delay.

Envoy's order, reproduced draw for draw on the injected RNG:

1. the fault applies only if ``upstream_cluster`` (when set) is the routed cluster, the
   ``x-envoy-downstream-service-node`` header is one of ``downstream_nodes`` (when set), and
   every ``headers`` matcher matches;
2. delay: drawn against the delay percentage; its duration is ``fixed_delay`` or, for header
   delays, the ``x-envoy-fault-delay-request`` milliseconds (no or bad header: no delay);
3. abort: drawn against the abort percentage; the status is ``http_status`` / ``grpc_status``
   or, for header aborts, ``x-envoy-fault-abort-request`` (200..599) or
   ``x-envoy-fault-abort-grpc-request`` (a gRPC abort answers HTTP 200 with that status);
4. header-controlled percentages (``x-envoy-fault-delay-request-percentage``,
   ``x-envoy-fault-abort-request-percentage``) replace the numerator, capped by the
   configured one, keeping its denominator;
5. ``max_active_faults``: a request that would inject a fault while that many faulted
   requests are in flight gets none (Envoy's ``faults_overflow``). One active fault is charged
   per request even when it is both delayed and aborted.

The caller owns the active-fault count (:class:`ActiveFaults` is a thread-safe counter for
it): take a slot when ``decision.active`` and release it when the request ends.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from pymesh.core.retry import request_header_matches
from pymesh.core.types import RequestInfo
from pymesh.model.http_filters import FaultConfig
from pymesh.model.route import FractionalPercent

__all__ = [
    "NO_FAULT",
    "ActiveFaults",
    "FaultDecision",
    "decide_fault",
]

HEADER_DELAY = "x-envoy-fault-delay-request"
HEADER_DELAY_PERCENTAGE = "x-envoy-fault-delay-request-percentage"
HEADER_ABORT = "x-envoy-fault-abort-request"
HEADER_ABORT_GRPC = "x-envoy-fault-abort-grpc-request"
HEADER_ABORT_PERCENTAGE = "x-envoy-fault-abort-request-percentage"
HEADER_DOWNSTREAM_NODE = "x-envoy-downstream-service-node"


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What to inject into one request.

    ``delay`` seconds before forwarding (``None`` = none); then, if ``abort_status`` is set,
    answer it locally (body ``fault filter abort``) instead of forwarding, with
    ``abort_grpc_status`` as the gRPC status when set (HTTP status 200 then).
    ``overflow`` is True when ``max_active_faults`` suppressed a fault.
    """

    delay: float | None = None
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    overflow: bool = False

    @property
    def active(self) -> bool:
        """Whether this request is a faulted one (counts against ``max_active_faults``)."""
        return self.delay is not None or self.abort_status is not None


NO_FAULT = FaultDecision()


class ActiveFaults:
    """The number of requests with an injected fault in flight, for one fault filter."""

    __slots__ = ("_count", "_lock")

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def start(self) -> None:
        with self._lock:
            self._count += 1

    def end(self) -> None:
        with self._lock:
            if self._count > 0:
                self._count -= 1


def _first(request: RequestInfo, name: str) -> str | None:
    values = request.headers.get_all(name)
    return values[0] if values else None


def _uint(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


def _percentage(
    configured: FractionalPercent, request: RequestInfo, header: str, from_header: bool
) -> FractionalPercent:
    if not from_header:
        return configured
    numerator = _uint(_first(request, header))
    if numerator is None:
        return configured
    return FractionalPercent(min(numerator, configured.numerator), configured.denominator)


def _draw(percent: FractionalPercent, rng: random.Random) -> bool:
    # Envoy: a 64-bit random value modulo the denominator, below the numerator.
    return percent.hits(rng.getrandbits(64))


def decide_fault(
    config: FaultConfig | None,
    request: RequestInfo,
    *,
    rng: random.Random,
    active_faults: int,
    cluster: str,
) -> FaultDecision:
    """Decide the fault for one request (see the module docs for Envoy's order)."""
    if config is None or (config.delay is None and config.abort is None):
        return NO_FAULT
    if config.upstream_cluster and config.upstream_cluster != cluster:
        return NO_FAULT
    if config.downstream_nodes:
        node = request.headers.get(HEADER_DOWNSTREAM_NODE)
        if node is None or node not in config.downstream_nodes:
            return NO_FAULT
    if not all(request_header_matches(m, request) for m in config.headers):
        return NO_FAULT
    room = config.max_active_faults is None or active_faults < config.max_active_faults
    overflow = False

    delay: float | None = None
    d = config.delay
    if d is not None and _draw(
        _percentage(d.percentage, request, HEADER_DELAY_PERCENTAGE, d.header_delay), rng
    ):
        if d.header_delay:
            ms = _uint(_first(request, HEADER_DELAY))
            seconds = ms / 1000.0 if ms is not None else None
        else:
            seconds = d.fixed_delay
        if seconds is not None and seconds > 0:
            if room:
                delay = seconds
            else:
                overflow = True

    abort_status: int | None = None
    abort_grpc: int | None = None
    a = config.abort
    if a is not None and _draw(
        _percentage(a.percentage, request, HEADER_ABORT_PERCENTAGE, a.header_abort), rng
    ):
        if a.header_abort:
            code = _uint(_first(request, HEADER_ABORT))
            http = code if code is not None and 200 <= code < 600 else None
            grpc = _uint(_first(request, HEADER_ABORT_GRPC))
        else:
            http, grpc = a.http_status, a.grpc_status
        # An HTTP status wins; a gRPC status alone answers HTTP 200.
        if http is not None:
            status, grpc_status = http, None
        elif grpc is not None:
            status, grpc_status = 200, grpc
        else:
            status, grpc_status = None, None
        if status is not None:
            if room or delay is not None:
                abort_status, abort_grpc = status, grpc_status
            else:
                overflow = True
    if delay is None and abort_status is None:
        return FaultDecision(overflow=overflow) if overflow else NO_FAULT
    return FaultDecision(delay, abort_status, abort_grpc, overflow)
