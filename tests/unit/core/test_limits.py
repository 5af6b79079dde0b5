"""ClusterLimits: Envoy circuit-breaker thresholds, overflow counts, budgets, updates."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.core.limits import ClusterLimits
from pymesh.model.cluster import UNLIMITED, CircuitBreakers, RetryBudget


def test_request_overflow_counts() -> None:
    limits = ClusterLimits(CircuitBreakers(max_requests=3))
    admitted = [limits.try_start_request() for _ in range(5)]
    assert admitted == [True, True, True, False, False]
    assert limits.requests == 3 and limits.rq_overflow == 2
    limits.end_request()
    assert limits.try_start_request()
    assert not limits.try_start_request()
    assert limits.stats().rq_overflow == 3


def test_pending_and_connections() -> None:
    limits = ClusterLimits(CircuitBreakers(max_pending_requests=1, max_connections=2))
    assert limits.try_start_pending() and not limits.try_start_pending()
    limits.end_pending()
    assert limits.try_start_pending()
    assert [limits.try_open_connection() for _ in range(3)] == [True, True, False]
    limits.close_connection()
    assert limits.try_open_connection()
    s = limits.stats()
    assert (s.pending, s.pending_overflow, s.connections, s.cx_overflow) == (1, 1, 2, 1)


def test_zero_threshold_refuses_everything() -> None:
    limits = ClusterLimits(CircuitBreakers(max_requests=0, max_retries=0))
    assert not limits.try_start_request()
    assert not limits.try_start_retry()


def test_end_never_goes_negative() -> None:
    limits = ClusterLimits(CircuitBreakers())
    limits.end_request()
    limits.end_pending()
    limits.end_retry()
    limits.close_connection()
    s = limits.stats()
    assert (s.requests, s.pending, s.retries, s.connections) == (0, 0, 0, 0)


def test_envoy_defaults_and_istio_unlimited() -> None:
    limits = ClusterLimits(CircuitBreakers())
    assert sum(limits.try_start_request() for _ in range(1100)) == 1024
    assert sum(limits.try_start_retry() for _ in range(5)) == 3
    unlimited = ClusterLimits(CircuitBreakers(UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED))
    assert all(unlimited.try_start_request() for _ in range(5000))


def test_retry_budget_scales_with_active_requests() -> None:
    limits = ClusterLimits(
        CircuitBreakers(
            max_retries=1, retry_budget=RetryBudget(budget_percent=20.0, min_retry_concurrency=3)
        )
    )
    # Few active requests: min_retry_concurrency (3) wins over max_retries (ignored).
    assert [limits.try_start_retry() for _ in range(4)] == [True, True, True, False]
    # 50 active + pending requests: 20% = 10 concurrent retries.
    for _ in range(40):
        limits.try_start_request()
    for _ in range(10):
        limits.try_start_pending()
    assert limits.max_retries_now() == 10
    assert sum(limits.try_start_retry() for _ in range(20)) == 7
    assert limits.retries == 10 and limits.retry_overflow == 14
    # An explicit active-request count (e.g. from the caller) is honoured.
    assert limits.max_retries_now(active_requests=100) == 20
    assert limits.try_start_retry(active_requests=100)


def test_update_keeps_counts() -> None:
    limits = ClusterLimits(CircuitBreakers(max_requests=5))
    for _ in range(4):
        assert limits.try_start_request()
    limits.update(CircuitBreakers(max_requests=2))
    assert limits.requests == 4
    assert not limits.try_start_request()
    for _ in range(3):
        limits.end_request()
    assert limits.try_start_request()  # 1 -> 2
    assert not limits.try_start_request()
    limits.update(CircuitBreakers(max_requests=10))
    assert limits.try_start_request() and limits.breakers.max_requests == 10


def test_threads_never_exceed_threshold() -> None:
    """Concurrent check-and-increment is atomic: at most max_requests are ever active."""
    limits = ClusterLimits(CircuitBreakers(max_requests=7))
    peak = [0]
    admitted = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(2000):
            if limits.try_start_request():
                with lock:
                    admitted[0] += 1
                    peak[0] = max(peak[0], limits.requests)
                limits.end_request()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(not t.is_alive() for t in threads)
    assert peak[0] <= 7
    assert limits.requests == 0
    assert admitted[0] + limits.rq_overflow == 16000


@settings(max_examples=100, deadline=None)
@given(
    max_requests=st.integers(0, 5),
    max_pending=st.integers(0, 5),
    ops=st.lists(st.sampled_from(["rq+", "rq-", "pd+", "pd-", "rt+", "rt-"]), max_size=80),
)
def test_counts_follow_a_simple_model(max_requests: int, max_pending: int, ops: list[str]) -> None:
    limits = ClusterLimits(
        CircuitBreakers(max_requests=max_requests, max_pending_requests=max_pending, max_retries=2)
    )
    model = {"rq": 0, "pd": 0, "rt": 0}
    caps = {"rq": max_requests, "pd": max_pending, "rt": 2}
    overflow = {"rq": 0, "pd": 0, "rt": 0}
    start = {
        "rq": limits.try_start_request,
        "pd": limits.try_start_pending,
        "rt": limits.try_start_retry,
    }
    end = {"rq": limits.end_request, "pd": limits.end_pending, "rt": limits.end_retry}
    for op in ops:
        kind, sign = op[:2], op[2]
        if sign == "+":
            ok = start[kind]()
            assert ok == (model[kind] < caps[kind])
            if ok:
                model[kind] += 1
            else:
                overflow[kind] += 1
        else:
            end[kind]()
            model[kind] = max(0, model[kind] - 1)
    s = limits.stats()
    assert (s.requests, s.pending, s.retries) == (model["rq"], model["pd"], model["rt"])
    assert (s.rq_overflow, s.pending_overflow, s.retry_overflow) == (
        overflow["rq"],
        overflow["pd"],
        overflow["rt"],
    )


def test_resilience_public_surface_is_pinned() -> None:
    """The resilience modules' public names (STYLE.md #12): changing them is a decision."""
    import pymesh.core.deadline
    import pymesh.core.fault
    import pymesh.core.limits
    import pymesh.core.outlier
    import pymesh.core.retry

    pinned = {
        pymesh.core.retry: {
            "CONSUMED_REQUEST_HEADERS",
            "GRPC_RETRY_ON",
            "GiveUp",
            "PREVIOUS_HOSTS_PREDICATE",
            "PUSHBACK_HEADER",
            "Retry",
            "RetryDecision",
            "RetryState",
            "backoff_ceiling",
            "header_matches",
            "request_header_matches",
            "strip_consumed",
        },
        pymesh.core.limits: {"ClusterLimits", "LimitsStats", "PendingTicket"},
        pymesh.core.outlier: {
            "EjectionType",
            "OutlierDetector",
            "OutlierListener",
            "OutlierStats",
            "grpc_to_http_status",
        },
        pymesh.core.fault: {"ActiveFaults", "FaultDecision", "NO_FAULT", "decide_fault"},
        pymesh.core.deadline: {
            "CONSUMED_REQUEST_HEADERS",
            "Deadlines",
            "call_deadlines",
            "format_grpc_timeout",
            "parse_grpc_timeout",
        },
    }
    for module, names in pinned.items():
        assert set(module.__all__) == names, module.__name__
        assert all(hasattr(module, n) for n in names), module.__name__
