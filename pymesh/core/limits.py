"""Per-cluster circuit breaking, as Envoy's ``ResourceManagerImpl`` counts it.

One :class:`ClusterLimits` per cluster, shared by every call to that cluster (sync threads and
async tasks alike). It holds four counters — open connections, pending requests (waiting for a
connection), active requests and active retries — each against a threshold from the cluster's
``circuit_breakers``. A ``try_start_*`` that would reach past its threshold answers False and
counts an overflow; the caller then answers 503 with ``x-envoy-overloaded: true`` at once
(for connections: the request waits as pending instead, as in Envoy's pools).

Theory of operation
-------------------

Each resource is one counter ``count`` with a threshold ``max``::

    call                 condition            effect                     returns
    -------------------  -------------------  -------------------------  -------
    try_start_X()        count < max          count += 1                 True
    try_start_X()        count >= max         overflow_X += 1            False
    end_X()              count > 0            count -= 1                 None
    update(breakers)     —                    max changes, counts stay   None

The retry threshold is ``max_retries`` unless a retry budget is configured; then it is
``max(budget_percent% of (active + pending requests), min_retry_concurrency)`` computed at the
moment of the check (Envoy ``RetryBudgetImpl``). Envoy decides a retry while the failed
attempt's request still counts as active (a lone request may retry under a 100 % budget with
no floor; the Envoy oracle test checks it), so ask :meth:`ClusterLimits.try_start_retry`
before ending that attempt's request. A retry slot is held from the decision to retry until
the next decision or the end of the call (Envoy keeps it through the back-off and the retried
attempt).

Counts change under a lock: the check-and-increment must be atomic for threads, or concurrent
calls could all pass a threshold of 1. The lock is uncontended in an event loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pymesh.model.cluster import CircuitBreakers

__all__ = ["ClusterLimits", "LimitsStats"]


@dataclass(frozen=True, slots=True)
class LimitsStats:
    """A snapshot of the counters (Envoy ``upstream_rq_pending_overflow``, ...)."""

    connections: int
    pending: int
    requests: int
    retries: int
    cx_overflow: int
    pending_overflow: int
    rq_overflow: int
    retry_overflow: int


class ClusterLimits:
    """Envoy's circuit-breaker thresholds for one cluster (``DEFAULT`` priority)."""

    __slots__ = (
        "_breakers",
        "_lock",
        "connections",
        "cx_overflow",
        "pending",
        "pending_overflow",
        "requests",
        "retries",
        "retry_overflow",
        "rq_overflow",
    )

    def __init__(self, breakers: CircuitBreakers) -> None:
        self._breakers = breakers
        self._lock = threading.Lock()
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.retries = 0
        self.cx_overflow = 0
        self.pending_overflow = 0
        self.rq_overflow = 0
        self.retry_overflow = 0

    @property
    def breakers(self) -> CircuitBreakers:
        return self._breakers

    def update(self, breakers: CircuitBreakers) -> None:
        """New thresholds from CDS; the counts carry over (a lowered threshold only stops new
        work, as in Envoy)."""
        self._breakers = breakers

    # -- requests ------------------------------------------------------------------------

    def try_start_request(self) -> bool:
        """Admit one active request (``max_requests``)."""
        with self._lock:
            if self.requests >= self._breakers.max_requests:
                self.rq_overflow += 1
                return False
            self.requests += 1
            return True

    def end_request(self) -> None:
        with self._lock:
            if self.requests > 0:
                self.requests -= 1

    # -- pending -------------------------------------------------------------------------

    def try_start_pending(self) -> bool:
        """Admit one request waiting for a connection (``max_pending_requests``)."""
        with self._lock:
            if self.pending >= self._breakers.max_pending_requests:
                self.pending_overflow += 1
                return False
            self.pending += 1
            return True

    def end_pending(self) -> None:
        with self._lock:
            if self.pending > 0:
                self.pending -= 1

    # -- retries -------------------------------------------------------------------------

    def max_retries_now(self, active_requests: int | None = None) -> int:
        """The retry threshold at this moment: ``max_retries``, or the budget's share of
        ``active_requests`` (default: this cluster's active + pending requests)."""
        budget = self._breakers.retry_budget
        if budget is None:
            return self._breakers.max_retries
        active = self.requests + self.pending if active_requests is None else active_requests
        return max(int(budget.budget_percent / 100.0 * active), budget.min_retry_concurrency)

    def try_start_retry(self, active_requests: int | None = None) -> bool:
        """Admit one retry (``max_retries`` or the retry budget)."""
        with self._lock:
            if self.retries >= self.max_retries_now(active_requests):
                self.retry_overflow += 1
                return False
            self.retries += 1
            return True

    def end_retry(self) -> None:
        with self._lock:
            if self.retries > 0:
                self.retries -= 1

    # -- connections ---------------------------------------------------------------------

    def try_open_connection(self) -> bool:
        """Admit one more upstream connection (``max_connections``). On False the request
        should wait as pending for a connection to free up (Envoy counts
        ``upstream_cx_overflow`` and queues)."""
        with self._lock:
            if self.connections >= self._breakers.max_connections:
                self.cx_overflow += 1
                return False
            self.connections += 1
            return True

    def close_connection(self) -> None:
        with self._lock:
            if self.connections > 0:
                self.connections -= 1

    def stats(self) -> LimitsStats:
        with self._lock:
            return LimitsStats(
                connections=self.connections,
                pending=self.pending,
                requests=self.requests,
                retries=self.retries,
                cx_overflow=self.cx_overflow,
                pending_overflow=self.pending_overflow,
                rq_overflow=self.rq_overflow,
                retry_overflow=self.retry_overflow,
            )
