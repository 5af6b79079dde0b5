"""Per-call cost of the resilience policies (not a test): what the attempt loop pays for
retries, deadlines, faults, circuit breaking and outlier detection on a successful call.

Run: ``/work/venv/bin/python bench/resilience_bench.py`` (prints microseconds per operation,
best of 5 runs).

``--xds-apply [--rounds N]``: the slow-xDS case of the resilience suite as an A/B benchmark
(tests/resilience/test_faults_xds.py asserts its outcome; this measures what pacing buys).
A ``pymesh.httpx.Client`` sends sequential requests to a local backend while its xDS client
applies a 100,000-endpoint EDS update from an ADS server in another process; rounds
alternate the xDS work thread paced (the default, ``pymesh.xds.pacing``) and unpaced (plus
``--pacing SLICE:PAUSE`` variants). Per round: request p99 idle (800 requests before and
after) and while the update is applied (until its hosts are in the runtime, plus 0.5 s),
their ratio, the apply's wall time, and RSS after a small update replaced it.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

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


def xds_apply(rounds: int, variants: list[tuple[float, float]]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import pymesh.httpx
    from pymesh.xds import _memory, pacing
    from tests.integration.httpx.conftest import Backend, Upstream
    from tests.resilience.test_faults_xds import Driver, host_count, latencies, p99, rss_mb

    driver = Driver()
    upstream = Upstream(Backend("only")).start()
    port = upstream.port
    driver.call("serve", backend=port)
    xds = driver.client()
    client = pymesh.httpx.Client(xds_client=xds, mesh_wait=10)
    settings: list[tuple[str, float | None, float]] = [
        ("paced", pacing.SLICE, pacing.PAUSE),
        ("unpaced", None, 0.0),
    ] + [(f"slice {s * 1e3:g} ms, pause {p * 1e6:g} us", s, p) for s, p in variants]
    ratios: dict[str, list[float]] = {}
    tag = 10
    try:
        latencies(client, 300)
        gc.collect()
        base = rss_mb()
        for _ in range(rounds):
            for label, slice_, pause in settings:
                xds.run_in_serializer(lambda s=slice_, p=pause: pacing.pace_current_thread(s, p))
                before, _ = latencies(client, 800)
                tag += 1
                start = time.monotonic()
                driver.call("eds", backend=port, extra=100_000, tag=tag)
                during: list[float] = []
                while host_count(xds) != 100_001:
                    during += latencies(client, 10)[0]
                    assert time.monotonic() - start < 120
                applied = time.monotonic() - start
                settle = time.monotonic() + 0.5
                while time.monotonic() < settle:
                    during += latencies(client, 10)[0]
                after, _ = latencies(client, 800)
                trims = _memory.trims
                tag += 1
                driver.call("eds", backend=port, tag=tag)
                while host_count(xds) != 1 or _memory.trims == trims:
                    latencies(client, 10)
                idle = before + after
                ratio = p99(during) / p99(idle)
                ratios.setdefault(label, []).append(ratio)
                print(
                    f"{label:28s} idle p99 {p99(idle):5.2f} ms, during the apply p99"
                    f" {p99(during):6.2f} ms ({len(during)} requests): {ratio:5.2f}x;"
                    f" applied in {applied:.2f} s; RSS after +{rss_mb() - base:.0f} MB",
                    flush=True,
                )
    finally:
        xds.run_in_serializer(pacing.pace_current_thread)
        client.close()
        xds.close()
        upstream.stop()
        driver.close()
    for label, values in ratios.items():
        print(
            f"{label:28s} p99 during / idle: median {statistics.median(values):.2f}x"
            f" ({', '.join(f'{v:.2f}' for v in values)})"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--xds-apply", action="store_true", help="the 100k-endpoint apply A/B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pacing", action="append", default=[], help="SLICE:PAUSE seconds")
    args = ap.parse_args()
    if args.xds_apply:
        xds_apply(
            args.rounds,
            [(float(v.split(":")[0]), float(v.split(":")[1])) for v in args.pacing],
        )
    else:
        main()
