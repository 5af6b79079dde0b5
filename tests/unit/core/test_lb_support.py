"""Helpers shared by the load-balancing tests (no tests here)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence

from pymesh.core.lb import build_hosts, build_load_balancer
from pymesh.core.types import Host, LoadBalancer, PickContext
from pymesh.model.cluster import Cluster, ClusterKind, CommonLbConfig, LbPolicy, RoundRobin
from pymesh.model.common import Locality, SocketAddress
from pymesh.model.endpoint import (
    ClusterLoadAssignment,
    HealthStatus,
    LbEndpoint,
    LocalityLbEndpoints,
)

# 0.999 quantiles of chi-square for small degrees of freedom (tables): a correct sampler
# fails one of these 1 time in 1,000; every test uses a fixed seed, so never flaky.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 9: 27.88}


def ep(
    port: int, *, weight: int = 1, health: HealthStatus = HealthStatus.HEALTHY, ip: str = "10.0.0.1"
) -> LbEndpoint:
    return LbEndpoint(SocketAddress(ip, port), health_status=health, load_balancing_weight=weight)


def loc(
    *endpoints: LbEndpoint, zone: str = "z1", priority: int = 0, weight: int | None = None
) -> LocalityLbEndpoints:
    return LocalityLbEndpoints(
        Locality("r1", zone), priority=priority, load_balancing_weight=weight, endpoints=endpoints
    )


def cla(*localities: LocalityLbEndpoints, factor: int = 140) -> ClusterLoadAssignment:
    return ClusterLoadAssignment("c", localities, overprovisioning_factor=factor)


def cluster(
    policy: LbPolicy | None = None,
    *,
    panic: float = 50.0,
    locality_weighted: bool = False,
) -> Cluster:
    return Cluster(
        "c",
        ClusterKind.EDS,
        lb_policy=policy if policy is not None else RoundRobin(),
        common_lb_config=CommonLbConfig(
            healthy_panic_threshold=panic, locality_weighted=locality_weighted
        ),
    )


def balancer(
    c: Cluster, a: ClusterLoadAssignment, *, seed: int = 1, now: float = 0.0
) -> tuple[LoadBalancer, dict[str, Host]]:
    hosts = build_hosts(a, {})
    lb = build_load_balancer(c, list(hosts.values()), a, now=now, rng=random.Random(seed))
    return lb, hosts


def port_of(host: Host | None) -> int | None:
    return None if host is None else host.address.port


def counts(lb: LoadBalancer, n: int, *, now: float = 0.0) -> Counter[int | None]:
    ctx = PickContext(now=now)
    return Counter(port_of(lb.pick(ctx)) for _ in range(n))


def chi_square(observed: Counter[int | None], expected: dict[int, float]) -> float:
    return sum((observed.get(k, 0) - e) ** 2 / e for k, e in expected.items())


def assert_distribution(observed: Counter[int | None], weights: dict[int, float], n: int) -> None:
    """Chi-square goodness of fit at p = 0.001 against ``weights`` (normalised)."""
    assert set(observed) <= set(weights), observed
    total = sum(weights.values())
    expected = {k: n * w / total for k, w in weights.items()}
    stat = chi_square(observed, expected)
    assert stat < CHI2_999[len(weights) - 1], (stat, observed, expected)


def ports(hosts: Iterable[Host | None]) -> list[int | None]:
    return [port_of(h) for h in hosts]


def keys(hosts: Sequence[Host]) -> list[str]:
    return [h.key for h in hosts]
