"""Per-call cost of the resilience policies (not a test): what the attempt loop pays for
retries, deadlines, faults, circuit breaking and outlier detection on a successful call.

Run: ``/work/venv/bin/python bench/resilience_bench.py`` (prints microseconds per operation,
best of 5 runs).
"""

from __future__ import annotations

import random
import timeit
from collections.abc import Callable

from pymesh.core.deadline import call_deadlines
from pymesh.core.fault import decide_fault
from pymesh.core.limits import ClusterLimits
from pymesh.core.outlier import OutlierDetector
from pymesh.core.retry import RetryState
from pymesh.core.types import Headers, Host, Outcome, RequestInfo
from pymesh.model.cluster import UNLIMITED, CircuitBreakers, OutlierDetection
from pymesh.model.common import SocketAddress
from pymesh.model.http_filters import FaultAbort, FaultConfig
from pymesh.model.route import FractionalPercent, RetryPolicy, RouteAction

# What Istio sends by default: 2 retries, previous-hosts predicate, no route timeout.
POLICY = RetryPolicy(
    retry_on=frozenset(
        {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
    ),
    num_retries=2,
    retriable_status_codes=(503,),
    retry_host_predicates=("envoy.retry_host_predicates.previous_hosts",),
    host_selection_retry_max_attempts=5,
)
ACTION = RouteAction(cluster="c", timeout=0.0, max_grpc_timeout=0.0, retry_policy=POLICY)
REQUEST = RequestInfo(
    "GET",
    "reviews:9080",
    "/reviews/0",
    Headers(
        [
            ("user-agent", "python-httpx/0.28"),
            ("accept", "*/*"),
            ("accept-encoding", "gzip, deflate"),
            ("x-request-id", "7a1f"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ]
    ),
)
OK = Outcome(status=200)


def main() -> None:
    rng = random.Random(1)
    limits = ClusterLimits(CircuitBreakers(UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED))
    hosts = [Host(SocketAddress(f"10.0.0.{i}", 9080)) for i in range(10)]
    detector = OutlierDetector(OutlierDetection(), rng=rng, hosts=hosts, now=0.0)
    fault = FaultConfig(abort=FaultAbort(FractionalPercent(0), http_status=503))

    def retry() -> None:
        state = RetryState(POLICY, REQUEST, rng=rng)
        state.record_host("10.0.0.1:9080")
        state.should_retry(OK, budget_ok=limits.try_start_retry)

    def deadlines() -> None:
        call_deadlines(ACTION, POLICY, REQUEST, now=1.0, max_stream_duration=None)

    def faults() -> None:
        decide_fault(fault, REQUEST, rng=rng, active_faults=0, cluster="c")

    def breaker() -> None:
        limits.try_start_request()
        limits.end_request()

    def outlier() -> None:
        detector.record(hosts[3], OK, 1.0)

    def everything() -> None:
        retry()
        deadlines()
        faults()
        breaker()
        outlier()

    cases: list[tuple[str, Callable[[], None]]] = [
        ("RetryState + record_host + should_retry(200)", retry),
        ("call_deadlines", deadlines),
        ("decide_fault (0% abort)", faults),
        ("ClusterLimits start+end request", breaker),
        ("OutlierDetector.record(200)", outlier),
        ("all of the above", everything),
    ]
    n = 20_000
    for name, fn in cases:
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6
        print(f"{name:48s} {best:6.2f} us")


if __name__ == "__main__":
    main()
