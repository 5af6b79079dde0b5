"""Load-balancer micro-benchmark (a script, not a test): ``pick`` on the hot path, side by side.

Each row is one variant, timed over ``--picks`` picks (best of ``--repeat`` runs), with its
cost relative to the baseline row (``random.Random().random()`` plus a tuple index: the
least any randomised pick can cost in Python). Build times (what an EDS update or an
ejection costs) follow for the same host counts.

    /work/venv/bin/python bench/lb_bench.py [--hosts 10] [--picks 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from pymesh.core.hashing import request_hash
from pymesh.core.lb import build_hosts, build_load_balancer
from pymesh.core.lb._edf import EdfScheduler, edf_sequence
from pymesh.core.lb._hash import _maglev_layout, _ring_layout
from pymesh.core.types import Headers, LoadBalancer, PickContext, RequestInfo
from pymesh.model.cluster import (
    Cluster,
    ClusterKind,
    CommonLbConfig,
    LbPolicy,
    LeastRequest,
    Maglev,
    Random,
    RingHash,
    RoundRobin,
)
from pymesh.model.common import Locality, SocketAddress
from pymesh.model.endpoint import (
    ClusterLoadAssignment,
    HealthStatus,
    LbEndpoint,
    LocalityLbEndpoints,
)
from pymesh.model.route import CookieHash, HeaderHash


def _assignment(
    n: int, *, weighted: bool = False, priorities: int = 1, zones: int = 1
) -> ClusterLoadAssignment:
    localities = []
    for p in range(priorities):
        for z in range(zones):
            eps = []
            for i in range(n // (priorities * zones) or 1):
                # in multi-priority layouts P0 is half unhealthy so both levels take load
                unhealthy = priorities > 1 and p == 0 and i % 2 == 1
                eps.append(
                    LbEndpoint(
                        SocketAddress(f"10.{p}.{z}.{i}", 8080),
                        load_balancing_weight=(i % 5) + 1 if weighted else 1,
                        health_status=HealthStatus.UNHEALTHY if unhealthy else HealthStatus.HEALTHY,
                    )
                )
            localities.append(
                LocalityLbEndpoints(
                    Locality("r", f"z{z}"),
                    priority=p,
                    load_balancing_weight=z + 1,
                    endpoints=tuple(eps),
                )
            )
    return ClusterLoadAssignment("c", tuple(localities))


def _time(fn: Callable[[int], None], picks: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(picks)
        best = min(best, time.perf_counter() - t)
    return best / picks * 1e6


def _pick_loop(lb_pick: Callable[[PickContext], object], ctx: PickContext) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            lb_pick(ctx)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--picks", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n, picks, repeat = args.hosts, args.picks, args.repeat

    rng = random.Random(1)
    hosts_t = tuple(range(n))
    rand = rng.random

    def baseline(k: int) -> None:
        for _ in range(k):
            hosts_t[int(rand() * n)]

    rows: list[tuple[str, float]] = [
        ("baseline: rng.random() + index", _time(baseline, picks, repeat))
    ]

    def lb_for(
        policy: LbPolicy, a: ClusterLoadAssignment, *, locality_weighted: bool = False
    ) -> LoadBalancer:
        hosts = build_hosts(a, {})
        c = Cluster(
            "c",
            ClusterKind.EDS,
            lb_policy=policy,
            common_lb_config=CommonLbConfig(locality_weighted=locality_weighted),
        )
        return build_load_balancer(c, list(hosts.values()), a, now=0.0, rng=random.Random(2))

    plain = _assignment(n)
    weighted = _assignment(n, weighted=True)
    ctx = PickContext(now=0.0)
    variants: list[tuple[str, LoadBalancer, PickContext]] = [
        ("round robin, equal weights (rotation)", lb_for(RoundRobin(), plain), ctx),
        ("round robin, weights 1..5 (EDF period table)", lb_for(RoundRobin(), weighted), ctx),
        ("least request P2C, equal weights", lb_for(LeastRequest(), plain), ctx),
        ("least request, weights 1..5 (dynamic EDF heap)", lb_for(LeastRequest(), weighted), ctx),
        ("random", lb_for(Random(), plain), ctx),
        (
            "round robin, 2 priorities (P0 half down)",
            lb_for(RoundRobin(), _assignment(n, priorities=2)),
            ctx,
        ),
        (
            "round robin, 2 localities weighted (locality EDF)",
            lb_for(RoundRobin(), _assignment(n, zones=2), locality_weighted=True),
            ctx,
        ),
        ("ring hash, given hash", lb_for(RingHash(), plain), PickContext(now=0.0, hash_key=12345)),
        ("maglev, given hash", lb_for(Maglev(), plain), PickContext(now=0.0, hash_key=12345)),
        ("ring hash, no hash (random)", lb_for(RingHash(), plain), ctx),
        (
            "round robin, previous host excluded (retry)",
            lb_for(RoundRobin(), plain),
            PickContext(now=0.0, excluded=frozenset({"10.0.0.0:8080"}), host_selection_attempts=5),
        ),
    ]
    for name, lb, c in variants:
        rows.append((name, _time(_pick_loop(lb.pick, c), picks, repeat)))

    # the scheduler alone: the heap (locked, as used) against the precomputed period table
    weights = [float((i % 5) + 1) for i in range(n)]
    heap = EdfScheduler(weights)
    table = edf_sequence([int(w) for w in weights])
    period = len(table)

    def heap_run(k: int) -> None:
        pick = heap.pick
        for _ in range(k):
            pick()

    position = [0]

    def table_run(k: int) -> None:
        i = position[0]
        for _ in range(k):
            table[i]
            i = i + 1 if i + 1 < period else 0
        position[0] = i

    rows.append(("EDF scheduler alone: heap + lock", _time(heap_run, picks, repeat)))
    rows.append(("EDF scheduler alone: period table", _time(table_run, picks, repeat)))

    request = RequestInfo(
        "GET", "svc", "/p?q=1", Headers([("x-user", "alice"), ("cookie", "a=1; sess=abc")])
    )
    for name, policies in (
        ("request_hash: one header", (HeaderHash("x-user"),)),
        ("request_hash: header + cookie", (HeaderHash("x-user"), CookieHash("sess"))),
    ):

        def run(k: int, policies: tuple[HeaderHash | CookieHash, ...] = policies) -> None:
            for _ in range(k):
                request_hash(policies, request)

        rows.append((name, _time(run, picks // 4, repeat)))

    base = rows[0][1]
    print(f"pick cost, {n} hosts, best of {repeat} x {picks} picks (Python {_pyver()})")
    print(f"{'variant':<52} {'us/pick':>8} {'x baseline':>10}")
    for name, us in rows:
        print(f"{name:<52} {us:8.3f} {us / base:10.1f}")

    print()
    print("build cost (ms): what an EDS update or an ejection start/end costs")
    print("(ring/maglev: first build, then a rebuild of the same membership from the cache)")
    print(
        f"{'hosts':>6} {'round robin':>12} {'least req':>10} {'ring hash':>10} "
        f"{'ring again':>10} {'maglev':>8} {'maglev again':>12}"
    )
    for count in (3, 10, 100, 1000):
        a = _assignment(count)
        hosts = list(build_hosts(a, {}).values())
        _ring_layout.cache_clear()
        _maglev_layout.cache_clear()
        cells = []
        for policy in (RoundRobin(), LeastRequest(), RingHash(), RingHash(), Maglev(), Maglev()):
            cl = Cluster("c", ClusterKind.EDS, lb_policy=policy)
            t = time.perf_counter()
            build_load_balancer(cl, hosts, a, now=0.0, rng=random.Random(0))
            cells.append((time.perf_counter() - t) * 1e3)
        print(
            f"{count:>6} {cells[0]:>12.2f} {cells[1]:>10.2f} {cells[2]:>10.2f} "
            f"{cells[3]:>10.2f} {cells[4]:>8.2f} {cells[5]:>12.2f}"
        )


def _pyver() -> str:
    import sys

    return sys.version.split()[0]


if __name__ == "__main__":
    main()
