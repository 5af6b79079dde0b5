"""``build_load_balancer``: the cluster's policy over its hosts, as Envoy would balance."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pymesh.core.lb._balancer import PickFirstBalancer, ZoneAwareBalancer
from pymesh.core.lb._hash import HashBalancer
from pymesh.core.lb._pickers import least_request_factory, random_factory, round_robin_factory
from pymesh.core.lb._priority import compute_priority_state
from pymesh.core.types import Host, LoadBalancer
from pymesh.model.cluster import (
    Cluster,
    LeastRequest,
    Maglev,
    PickFirst,
    Random,
    RingHash,
    RoundRobin,
    WeightedRoundRobin,
)
from pymesh.model.common import Locality
from pymesh.model.endpoint import ClusterLoadAssignment

__all__ = ["build_load_balancer"]

DEFAULT_OVERPROVISIONING_FACTOR = 140


def build_load_balancer(
    cluster: Cluster,
    hosts: Sequence[Host],
    assignment: ClusterLoadAssignment | None,
    *,
    now: float,
    rng: random.Random,
    local_locality: Locality | None = None,
) -> LoadBalancer:
    """A balancer for ``hosts`` (from :func:`build_hosts`) under ``cluster.lb_policy``.

    Host membership and health classes are fixed at ``now`` (a host ejected at ``now``
    counts as unhealthy): rebuild when EDS changes or an ejection starts or ends. The
    balancer keeps its own picking state (round-robin position, EDF schedule) and draws
    from ``rng``. ``assignment`` gives the overprovisioning factor and locality weights.

    ``local_locality`` is accepted for zone-aware routing, which is not implemented: Envoy
    only does it with a local cluster, which Istio sidecars do not configure (Istio's
    locality LB arrives as priorities and locality weights, both honoured here).

    ``WeightedRoundRobin`` (gRFC A58) balances by endpoint weights, as it would before any
    load report arrives: backend utilisation reports (ORCA) are not consumed.
    """
    del local_locality
    factor = (
        assignment.overprovisioning_factor
        if assignment is not None
        else DEFAULT_OVERPROVISIONING_FACTOR
    )
    common = cluster.common_lb_config
    state = compute_priority_state(
        hosts,
        now=now,
        overprovisioning_factor=factor,
        panic_threshold=common.healthy_panic_threshold,
        assignment=assignment,
    )
    policy = cluster.lb_policy
    locality_weighted = cluster.locality_weighted
    fail_on_panic = common.zone_aware is not None and common.zone_aware.fail_traffic_on_panic
    if isinstance(policy, RoundRobin | WeightedRoundRobin):
        return ZoneAwareBalancer(
            state,
            round_robin_factory,
            rng,
            locality_weighted=locality_weighted,
            fail_on_panic=fail_on_panic,
        )
    if isinstance(policy, LeastRequest):
        return ZoneAwareBalancer(
            state,
            least_request_factory(policy.choice_count, policy.active_request_bias),
            rng,
            locality_weighted=locality_weighted,
            fail_on_panic=fail_on_panic,
        )
    if isinstance(policy, Random):
        return ZoneAwareBalancer(
            state,
            random_factory,
            rng,
            locality_weighted=locality_weighted,
            fail_on_panic=fail_on_panic,
        )
    if isinstance(policy, RingHash | Maglev):
        return HashBalancer(state, policy, rng, locality_weighted=locality_weighted)
    if isinstance(policy, PickFirst):
        if policy.shuffle_address_list:
            shuffled = list(hosts)
            rng.shuffle(shuffled)
            state = compute_priority_state(
                shuffled,
                now=now,
                overprovisioning_factor=factor,
                panic_threshold=common.healthy_panic_threshold,
                assignment=assignment,
            )
        return PickFirstBalancer(state)
    raise TypeError(f"unknown load-balancing policy {policy!r}")  # pragma: no cover
