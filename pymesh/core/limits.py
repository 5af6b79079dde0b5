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

HTTP/1.1 connections and the pending queue (Envoy's connection pool): a request in flight
on HTTP/1.1 holds a connection (one request per connection at a time). Past
``max_connections`` it waits in the cluster's FIFO pending queue, bounded by
``max_pending_requests`` (beyond it: overflow). A connection given back goes to the oldest
waiter instead of closing (the ``connections`` count stays); the waiter's pending slot ends
then. A waiter that gives up (its deadline, a cancelled call) leaves the queue. The core
never blocks: :meth:`ClusterLimits.queue_pending` returns a :class:`PendingTicket`, the
runner waits for its ``wake`` callback (called outside the lock, from whichever thread gave
the connection back) and then asks :meth:`ClusterLimits.leave_queue`::

    call / event            state                      effect
    ----------------------  -------------------------  ----------------------------------
    try_open_connection()   connections < max          connections += 1, True
    try_open_connection()   connections >= max         cx_overflow += 1, False
    queue_pending()         pending < max_pending      pending += 1, ticket queued (FIFO)
    queue_pending()         pending >= max_pending     pending_overflow += 1, None
    close_connection()      a ticket queued            oldest ticket granted, pending -= 1,
                                                       connections unchanged, wake()
    close_connection()      queue empty                connections -= 1
    leave_queue(ticket)     granted                    True (the caller holds a connection)
    leave_queue(ticket)     still queued               dequeued, pending -= 1, False
    update(breakers)        max_connections raised     queued tickets granted up to it

Counts change under a lock: the check-and-increment must be atomic for threads, or concurrent
calls could all pass a threshold of 1. The lock is uncontended in an event loop.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pymesh.model.cluster import CircuitBreakers

__all__ = ["ClusterLimits", "LimitsStats", "PendingTicket"]


class PendingTicket:
    """One request waiting in a cluster's pending queue for an HTTP/1.1 connection.

    ``granted`` turns True (under the limits' lock) when a connection is handed to it; then
    ``wake`` (if set) is called once, outside the lock. A runner sets ``wake`` with
    :meth:`ClusterLimits.arm` (which tells it if the grant already happened)."""

    __slots__ = ("granted", "wake")

    def __init__(self) -> None:
        self.granted = False
        self.wake: Callable[[], None] | None = None


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
        "_queue",
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
        self._queue: collections.deque[PendingTicket] = collections.deque()
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
        work, as in Envoy). A raised ``max_connections`` lets queued requests go."""
        woken: list[PendingTicket] = []
        with self._lock:
            self._breakers = breakers
            queue = self._queue
            while queue and self.connections < breakers.max_connections:
                ticket = queue.popleft()
                ticket.granted = True
                self.pending -= 1
                self.connections += 1
                woken.append(ticket)
        for ticket in woken:
            if ticket.wake is not None:
                ticket.wake()

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
        """Give a connection back: to the oldest queued request if one waits (FIFO), else
        the count drops."""
        with self._lock:
            queue = self._queue
            if not queue or self.connections > self._breakers.max_connections:
                # nobody waits, or CDS lowered the threshold below the connections in use
                if self.connections > 0:
                    self.connections -= 1
                return
            ticket = queue.popleft()
            ticket.granted = True
            if self.pending > 0:
                self.pending -= 1
            wake = ticket.wake
        if wake is not None:
            wake()

    # -- the pending queue ---------------------------------------------------------------

    def queue_pending(self) -> PendingTicket | None:
        """Queue one request for the next connection given back (``max_pending_requests``
        bounds the queue; None: overflow, counted)."""
        with self._lock:
            if self.pending >= self._breakers.max_pending_requests:
                self.pending_overflow += 1
                return None
            self.pending += 1
            ticket = PendingTicket()
            self._queue.append(ticket)
            return ticket

    def arm(self, ticket: PendingTicket, wake: Callable[[], None]) -> bool:
        """Set the callback a grant calls; True if the ticket is already granted (then
        ``wake`` will not be called)."""
        with self._lock:
            if ticket.granted:
                return True
            ticket.wake = wake
            return False

    def leave_queue(self, ticket: PendingTicket) -> bool:
        """The waiter stops waiting: True if it was granted a connection (it holds one now,
        to give back with :meth:`close_connection`), else it leaves the queue."""
        with self._lock:
            if ticket.granted:
                return True
            ticket.wake = None
            try:
                self._queue.remove(ticket)
            except ValueError:
                return False
            if self.pending > 0:
                self.pending -= 1
            return False

    def queued(self) -> int:
        """Requests waiting in the queue now."""
        return len(self._queue)

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
