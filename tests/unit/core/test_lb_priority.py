"""Priority load, overprovisioning, panic, health classes and locality weights (Envoy)."""

from __future__ import annotations

import random

import pytest

from pymesh.core.lb import build_hosts, build_load_balancer
from pymesh.core.lb._priority import compute_priority_state
from pymesh.core.types import PickContext
from pymesh.model.cluster import (
    Cluster,
    ClusterKind,
    CommonLbConfig,
    LeastRequest,
    Maglev,
    Random,
    RingHash,
    RoundRobin,
    ZoneAwareLbConfig,
)
from pymesh.model.endpoint import ClusterLoadAssignment, HealthStatus, LocalityLbEndpoints
from tests.unit.core.test_lb_support import (
    assert_distribution,
    balancer,
    cla,
    cluster,
    counts,
    ep,
    loc,
)

H = HealthStatus.HEALTHY
U = HealthStatus.UNHEALTHY
D = HealthStatus.DEGRADED
X = HealthStatus.DRAINING


def _level(
    first_port: int, healthy: int, unhealthy: int, priority: int
) -> list[LocalityLbEndpoints]:
    eps = [ep(first_port + i) for i in range(healthy)]
    eps += [ep(first_port + healthy + i, health=U) for i in range(unhealthy)]
    return [loc(*eps, priority=priority)]


def _loads(
    a: ClusterLoadAssignment, panic: float = 50.0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    hosts = list(build_hosts(a, {}).values())
    state = compute_priority_state(
        hosts,
        now=0.0,
        overprovisioning_factor=a.overprovisioning_factor,
        panic_threshold=panic,
        assignment=a,
    )
    return state.healthy_load, state.degraded_load


# Envoy docs, "Priority levels": P0 health share -> traffic split with factor 1.4.
@pytest.mark.parametrize(
    ("healthy", "of", "p0"),
    [(100, 100, 100), (72, 100, 100), (71, 100, 99), (50, 100, 70), (25, 100, 35), (0, 100, 0)],
)
def test_priority_split_follows_overprovisioning(healthy: int, of: int, p0: int) -> None:
    a = cla(*_level(1000, healthy, of - healthy, 0), *_level(2000, 10, 0, 1))
    assert _loads(a)[0] == (p0, 100 - p0)


def test_three_priorities_fill_in_order() -> None:
    # P0 20% -> 28, P1 20% -> 28, P2 all healthy takes the remaining 44
    a = cla(*_level(1000, 2, 8, 0), *_level(2000, 1, 4, 1), *_level(3000, 3, 0, 2))
    assert _loads(a)[0] == (28, 28, 44)


def test_traffic_follows_priority_load() -> None:
    a = cla(*_level(1000, 1, 3, 0), *_level(2000, 2, 0, 1))  # 35 / 65
    lb, _ = balancer(cluster(RoundRobin(), panic=0.0), a, seed=5)
    observed = counts(lb, 4000)
    assert_distribution(observed, {1000: 35, 2000: 32.5, 2001: 32.5}, 4000)


def test_overprovisioning_factor_comes_from_the_assignment() -> None:
    a = cla(*_level(1000, 1, 1, 0), *_level(2000, 1, 0, 1), factor=100)
    assert _loads(a)[0] == (50, 50)


def test_degraded_hosts_take_what_healthy_hosts_lack() -> None:
    a = cla(loc(ep(1), ep(2, health=D)))  # health 70, degraded 70 -> 70 / 30
    assert _loads(a) == ((70,), (30,))
    lb, _ = balancer(cluster(RoundRobin()), a, seed=2)
    assert_distribution(counts(lb, 3000), {1: 70, 2: 30}, 3000)


def test_panic_spreads_over_all_hosts() -> None:
    a = cla(loc(ep(1), ep(2, health=U), ep(3, health=U), ep(4, health=U)))  # 25% < 50%
    lb, _ = balancer(cluster(RoundRobin()), a)
    assert counts(lb, 400) == {1: 100, 2: 100, 3: 100, 4: 100}


def test_panic_threshold_zero_disables_panic() -> None:
    a = cla(loc(ep(1), ep(2, health=U), ep(3, health=U), ep(4, health=U)))
    lb, _ = balancer(cluster(RoundRobin(), panic=0.0), a)
    assert counts(lb, 100) == {1: 100}
    none_healthy = cla(loc(ep(1, health=U), ep(2, health=U)))
    lb, _ = balancer(cluster(RoundRobin(), panic=0.0), none_healthy)
    assert counts(lb, 10) == {None: 10}


def test_total_panic_splits_by_host_count() -> None:
    a = cla(*_level(1000, 0, 4, 0), *_level(2000, 0, 2, 1))
    assert _loads(a)[0] == (67, 33)
    lb, _ = balancer(cluster(RoundRobin()), a, seed=9)
    observed = counts(lb, 6000)
    expected = {1000 + i: 67 / 4 for i in range(4)} | {2000 + i: 33 / 2 for i in range(2)}
    assert_distribution(observed, expected, 6000)


def test_fail_traffic_on_panic() -> None:
    a = cla(loc(ep(1), ep(2, health=U), ep(3, health=U)))
    c = Cluster(
        "c",
        ClusterKind.EDS,
        common_lb_config=CommonLbConfig(zone_aware=ZoneAwareLbConfig(fail_traffic_on_panic=True)),
    )
    lb, _ = balancer(c, a)
    assert counts(lb, 5) == {None: 5}


def test_draining_hosts_do_not_count_but_panic_picks_them_as_envoy() -> None:
    # 1 healthy of 2 counted hosts (the draining one does not count): 70% -> 30% to P1;
    # it would be 140*1//3 = 46 if draining counted
    a = cla(loc(ep(1), ep(2, health=U), ep(3, health=X)), *_level(2000, 1, 0, 1))
    assert _loads(a)[0] == (70, 30)
    lb, _ = balancer(cluster(RoundRobin()), a)
    assert 3 not in counts(lb, 200)
    # not counted in the panic test either: 1 of 2 counted = 50%, not below 50%
    calm = cla(loc(ep(1), ep(2, health=U), ep(3, health=X), ep(4, health=X)))
    lb, _ = balancer(cluster(RoundRobin()), calm)
    assert counts(lb, 20) == {1: 20}
    # but a level in panic picks among every host, draining ones included (Envoy 1.40)
    only_bad = cla(loc(ep(1, health=U), ep(2, health=X)))
    lb, _ = balancer(cluster(RoundRobin()), only_bad)
    assert counts(lb, 20) == {1: 10, 2: 10}
    # and total panic splits by host count, draining included: 2/5 and 3/5
    total = cla(loc(ep(1, health=U), ep(2, health=X)), *_level(2000, 0, 3, 1))
    assert _loads(total)[0] == (40, 60)


def test_ejected_hosts_count_as_unhealthy_until_their_time() -> None:
    a = cla(loc(ep(1), ep(2), ep(3)))
    hosts = build_hosts(a, {})
    hosts["10.0.0.1:2"].ejected_until = 30.0
    c = cluster(RoundRobin())
    during = build_load_balancer(c, list(hosts.values()), a, now=10.0, rng=random.Random(1))
    assert set(counts(during, 60, now=10.0)) == {1, 3}
    after = build_load_balancer(c, list(hosts.values()), a, now=30.0, rng=random.Random(1))
    assert counts(after, 60, now=30.0) == {1: 20, 2: 20, 3: 20}


def test_locality_weights_split_traffic() -> None:
    a = cla(
        loc(ep(1), ep(2), zone="a", weight=1),
        loc(ep(3), ep(4), zone="b", weight=3),
    )
    lb, _ = balancer(cluster(RoundRobin(), locality_weighted=True), a)
    assert counts(lb, 800) == {1: 100, 2: 100, 3: 300, 4: 300}
    # without locality weighting the hosts are pooled
    lb, _ = balancer(cluster(RoundRobin()), a)
    assert counts(lb, 800) == {1: 200, 2: 200, 3: 200, 4: 200}


def test_locality_weight_scales_with_locality_health() -> None:
    # zone b: weight 3, half healthy -> 3 * min(1, 1.4 * 0.5) = 2.1 against zone a's 1
    a = cla(
        loc(ep(1), zone="a", weight=1),
        loc(ep(3), ep(4, health=U), zone="b", weight=3),
    )
    lb, _ = balancer(cluster(RoundRobin(), locality_weighted=True), a)
    observed = counts(lb, 3100)
    assert abs(observed[1] - 1000) <= 1 and abs(observed[3] - 2100) <= 1, observed


def test_locality_without_weight_gets_no_traffic() -> None:
    a = cla(loc(ep(1), zone="a", weight=2), loc(ep(2), zone="b"))
    lb, _ = balancer(cluster(LeastRequest(), locality_weighted=True), a)
    assert counts(lb, 50) == {1: 50}


@pytest.mark.parametrize("policy", [RoundRobin(), LeastRequest(), Random(), RingHash(), Maglev()])
def test_every_policy_honours_priorities_and_health(policy: object) -> None:
    a = cla(
        loc(ep(1, health=U), ep(2, health=U), ep(3, health=U), ep(4)),  # 35%
        loc(ep(10), ep(11), priority=1),
    )
    c = Cluster("c", ClusterKind.EDS, lb_policy=policy)  # type: ignore[arg-type]
    lb, _ = balancer(c, a, seed=4)
    ctx_rng = random.Random(8)
    picks = [lb.pick(PickContext(now=0.0, hash_key=ctx_rng.getrandbits(64))) for _ in range(4000)]
    observed = {p: 0 for p in (4, 10, 11)}
    for h in picks:
        assert h is not None
        observed[h.address.port] += 1
    assert observed[4] + observed[10] + observed[11] == 4000
    # 35% to P0's only healthy host (bounded deviation: 4 sigma of a binomial)
    assert abs(observed[4] - 1400) < 4 * (4000 * 0.35 * 0.65) ** 0.5, observed


def test_panic_threshold_is_rounded_to_a_whole_percent_as_envoy() -> None:
    # 1 of 3 healthy = 33.33% usable: threshold 33.4 rounds to 33 -> not in panic
    a = cla(loc(ep(1), ep(2, health=U), ep(3, health=U)))
    lb, _ = balancer(cluster(RoundRobin(), panic=33.4), a)
    assert counts(lb, 30) == {1: 30}
    lb, _ = balancer(cluster(RoundRobin(), panic=33.5), a)  # rounds to 34 -> panic
    assert counts(lb, 30) == {1: 10, 2: 10, 3: 10}
