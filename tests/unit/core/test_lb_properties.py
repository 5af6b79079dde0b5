"""Property tests: for any endpoint layout, loads add up and picks obey the health rules."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.core.lb import build_hosts, build_load_balancer
from pymesh.core.lb._priority import compute_priority_state
from pymesh.core.types import PickContext
from pymesh.model.cluster import (
    Cluster,
    ClusterKind,
    CommonLbConfig,
    LeastRequest,
    Maglev,
    PickFirst,
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

_ENDPOINT = st.tuples(st.sampled_from(list(HealthStatus)), st.integers(1, 5), st.booleans())
_LOCALITY = st.tuples(st.lists(_ENDPOINT, max_size=5), st.one_of(st.none(), st.integers(1, 4)))
_LAYOUT = st.lists(st.lists(_LOCALITY, min_size=1, max_size=3), min_size=1, max_size=3)
_POLICIES = [
    RoundRobin(),
    LeastRequest(),
    Random(),
    RingHash(min_ring_size=64),
    Maglev(table_size=251),
    PickFirst(),
]


@settings(max_examples=150, deadline=None)
@given(
    layout=_LAYOUT,
    factor=st.sampled_from([100, 140, 200]),
    panic=st.sampled_from([0.0, 50.0, 100.0]),
    locality_weighted=st.booleans(),
    policy_index=st.integers(0, len(_POLICIES) - 1),
    seed=st.integers(0, 2**32),
)
def test_loads_and_picks_obey_the_rules(
    *,
    layout: list[list[tuple[list[tuple[HealthStatus, int, bool]], int | None]]],
    factor: int,
    panic: float,
    locality_weighted: bool,
    policy_index: int,
    seed: int,
) -> None:
    localities = []
    ejected: set[str] = set()
    port = 1
    for priority, level in enumerate(layout):
        for zone, (endpoints, weight) in enumerate(level):
            eps = []
            for health, w, is_ejected in endpoints:
                eps.append(
                    LbEndpoint(
                        SocketAddress("10.0.0.1", port),
                        health_status=health,
                        load_balancing_weight=w,
                    )
                )
                if is_ejected:
                    ejected.add(f"10.0.0.1:{port}")
                port += 1
            localities.append(
                LocalityLbEndpoints(
                    Locality("r", f"z{zone}"),
                    priority=priority,
                    load_balancing_weight=weight,
                    endpoints=tuple(eps),
                )
            )
    a = ClusterLoadAssignment("c", tuple(localities), overprovisioning_factor=factor)
    hosts = build_hosts(a, {})
    for key in ejected:
        hosts[key].ejected_until = 100.0
    now = 10.0
    state = compute_priority_state(
        list(hosts.values()),
        now=now,
        overprovisioning_factor=factor,
        panic_threshold=panic,
        assignment=a,
    )
    assert sum(state.healthy_load) + sum(state.degraded_load) == 100
    assert all(0 <= x <= 100 for x in state.healthy_load + state.degraded_load)
    in_panic = {level.priority for level in state.levels if level.panic}

    policy = _POLICIES[policy_index]
    c = Cluster(
        "c",
        ClusterKind.EDS,
        lb_policy=policy,
        common_lb_config=CommonLbConfig(
            healthy_panic_threshold=panic, locality_weighted=locality_weighted
        ),
    )
    lb = build_load_balancer(c, list(hosts.values()), a, now=now, rng=random.Random(seed))
    usable = [
        h
        for h in hosts.values()
        if h.health in (HealthStatus.HEALTHY, HealthStatus.UNKNOWN) and not h.is_ejected(now)
    ]
    rng = random.Random(seed)
    for _ in range(30):
        host = lb.pick(PickContext(now=now, hash_key=rng.getrandbits(64)))
        if host is None:
            continue
        assert hosts.get(host.key) is host
        if host.health is HealthStatus.DRAINING:  # only a level in panic picks these
            assert host.priority in in_panic and not isinstance(policy, PickFirst), host
        good = host.health in (HealthStatus.HEALTHY, HealthStatus.UNKNOWN, HealthStatus.DEGRADED)
        if not good or host.is_ejected(now):
            assert host.priority in in_panic or (
                isinstance(policy, PickFirst) and all(level.panic for level in state.levels)
            ), (host, state)
    simple = isinstance(policy, RoundRobin | LeastRequest | Random) and not locality_weighted
    if simple and usable:
        # with a healthy host somewhere, a simple policy always finds a host
        assert all(lb.pick(PickContext(now=now)) is not None for _ in range(20))
