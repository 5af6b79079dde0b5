"""Priority levels, health, panic and the share of load each level gets (Envoy semantics).

Theory of operation
-------------------
Every host lands in one class at build time (``now`` decides ejection):

====================================  =========  ==============================================
host state                            class      effect
====================================  =========  ==============================================
HEALTHY, UNKNOWN, not ejected         healthy    picked normally
DEGRADED, not ejected                 degraded   picked only with the load healthy hosts lack
UNHEALTHY, TIMEOUT, or ejected        unhealthy  counted in the level's size; picked in panic
DRAINING                              excluded   not counted in health or panic shares
                                                 (Envoy's ``exclude_host_in_eds_status_draining``)
                                                 but, as Envoy, picked in panic (Envoy's panic
                                                 source is every host of the level)
====================================  =========  ==============================================

(The DRAINING rows were checked against Envoy 1.40: a level in panic sends traffic to its
draining hosts, total panic counts them, the panic test itself does not.)

Per priority level, with ``n`` = non-excluded hosts and ``F`` = the overprovisioning factor
(percent, default 140): ``health = min(100, F * healthy // n)`` and
``degraded = min(100, F * degraded // n)`` (host counts, not weights, as Envoy's default).
The levels' availability is ``A = min(100, sum(health + degraded))``. Load (out of 100) goes
to the levels in priority order: ``healthy_load[i] = min(left, health[i] * 100 // A)``, then
the rest to degraded hosts the same way; the rounding remainder goes to the first level with
any healthy (else degraded) availability.

A level is in *panic* when ``100 * (healthy + degraded) / n < healthy_panic_threshold``
(never when ``A == 100``): it then picks among all its hosts, healthy or not. When every level
is in panic, load goes by host count, draining included (``100 * n_i // total``, remainder to
the first non-empty level). A panic threshold of 0 disables panic: with nothing available,
P0 gets all load and finds no host (503 ``no healthy upstream``).

With locality-weighted LB, a source picks a locality first (EDF over
``weight * min(1, F/100 * eligible / n_locality)``); a locality without a weight gets 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pymesh.core.types import Host
from pymesh.model.common import Locality
from pymesh.model.endpoint import ClusterLoadAssignment, HealthStatus
from pymesh.xds.pacing import paced_items

__all__ = ["PriorityLevel", "PriorityState", "compute_priority_state"]

_HEALTHY = (HealthStatus.HEALTHY, HealthStatus.UNKNOWN)


@dataclass(frozen=True, slots=True)
class PriorityLevel:
    """The hosts of one priority, classified. ``*_per_locality`` follow ``localities``."""

    priority: int
    all: tuple[Host, ...]
    """Every counted (non-draining) host."""
    panic_hosts: tuple[Host, ...]
    """What a level in panic picks from: every host, draining included (Envoy ``hosts()``)."""
    healthy: tuple[Host, ...]
    degraded: tuple[Host, ...]
    localities: tuple[Locality, ...]
    locality_weights: tuple[int, ...]
    all_per_locality: tuple[tuple[Host, ...], ...]
    panic_per_locality: tuple[tuple[Host, ...], ...]
    healthy_per_locality: tuple[tuple[Host, ...], ...]
    degraded_per_locality: tuple[tuple[Host, ...], ...]
    health: int
    degraded_health: int
    panic: bool

    def effective_locality_weights(self, degraded: bool, factor: int) -> tuple[float, ...]:
        """Envoy ``effectiveLocalityWeight`` of each locality for healthy/degraded picks."""
        eligible = self.degraded_per_locality if degraded else self.healthy_per_locality
        out: list[float] = []
        for weight, hosts, all_hosts in zip(
            self.locality_weights, eligible, self.all_per_locality, strict=True
        ):
            if not all_hosts:
                out.append(0.0)
                continue
            ratio = min(1.0, factor / 100.0 * len(hosts) / len(all_hosts))
            out.append(weight * ratio)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class PriorityState:
    levels: tuple[PriorityLevel, ...]
    healthy_load: tuple[int, ...]
    degraded_load: tuple[int, ...]
    overprovisioning_factor: int

    def slot_runs(self) -> tuple[tuple[tuple[int, bool], int], ...]:
        """:meth:`slots` as runs: ((priority, degraded?), how many consecutive slots), the
        runs in slot order and their counts summing to 100."""
        out: list[tuple[tuple[int, bool], int]] = []
        left = 100
        for degraded, loads in ((False, self.healthy_load), (True, self.degraded_load)):
            for i, load in enumerate(loads):
                take = min(load, left)
                if take > 0:
                    out.append(((i, degraded), take))
                    left -= take
        if left:  # cannot happen when the loads sum to 100; stay total
            out.append(((0, False), left))
        return tuple(out)

    def slots(self) -> tuple[tuple[int, bool], ...]:
        """100 entries, entry ``h % 100`` = (priority, degraded?) that a hash ``h`` chooses
        (Envoy ``choosePriority``: healthy loads in priority order, then degraded)."""
        out: list[tuple[int, bool]] = []
        for key, count in self.slot_runs():
            out.extend([key] * count)
        return tuple(out)


def _group(hosts: Sequence[Host], localities: Sequence[Locality]) -> tuple[tuple[Host, ...], ...]:
    if len(localities) == 1:  # the common case: one locality per level
        return (tuple(hosts),)
    by: dict[Locality, list[Host]] = {loc: [] for loc in localities}
    for h in paced_items(hosts):
        by[h.locality].append(h)
    return tuple(tuple(by[loc]) for loc in localities)


def _locality_weights(
    assignment: ClusterLoadAssignment | None,
) -> Mapping[tuple[int, Locality], int]:
    if assignment is None:
        return {}
    return {
        (loc.priority, loc.locality): loc.load_balancing_weight or 0
        for loc in assignment.localities
    }


def compute_priority_state(
    hosts: Sequence[Host],
    *,
    now: float,
    overprovisioning_factor: int,
    panic_threshold: float,
    assignment: ClusterLoadAssignment | None,
) -> PriorityState:
    """Classify ``hosts`` and compute per-priority health, panic and load (see the module
    docstring for the rules)."""
    # One pass: every host by priority; counted (non-draining) hosts; healthy and degraded
    # ones among those, not ejected at ``now``.
    every: list[list[Host]] = [[]]
    buckets: list[list[Host]] = [[]]
    healthy_by: list[list[Host]] = [[]]
    degraded_by: list[list[Host]] = [[]]
    draining, degraded_status = HealthStatus.DRAINING, HealthStatus.DEGRADED
    for h in paced_items(hosts):
        p = h.priority
        while p >= len(every):  # bounded by the largest priority
            every.append([])
            buckets.append([])
            healthy_by.append([])
            degraded_by.append([])
        every[p].append(h)
        status = h.health
        if status is draining:
            continue
        buckets[p].append(h)
        until = h.ejected_until
        if until is not None and now < until:
            continue
        if status in _HEALTHY:
            healthy_by[p].append(h)
        elif status is degraded_status:
            degraded_by[p].append(h)
    count = len(every)
    weights = _locality_weights(assignment)
    factor = overprovisioning_factor
    # Envoy rounds the percentage to an integer (PROTOBUF_PERCENT_TO_ROUNDED_INTEGER)
    threshold = float(min(100, max(0, math.floor(panic_threshold + 0.5))))

    drafts: list[tuple[int, tuple[Host, ...], tuple[Host, ...], tuple[Host, ...]]] = []
    health: list[int] = []
    degraded_health: list[int] = []
    for priority, members in enumerate(buckets):
        healthy = tuple(healthy_by[priority])
        degraded = tuple(degraded_by[priority])
        n = len(members)
        if n and factor > 0:
            health.append(min(100, factor * len(healthy) // n))
            degraded_health.append(min(100, factor * len(degraded) // n))
        else:
            health.append(0)
            degraded_health.append(0)
        drafts.append((priority, tuple(members), healthy, degraded))

    availability = min(100, sum(health) + sum(degraded_health))
    healthy_load = [0] * count
    degraded_load = [0] * count
    panic = [False] * count
    if availability > 0:
        left = 100
        first_healthy = -1
        for i, value in enumerate(health):
            if first_healthy < 0 and value > 0:
                first_healthy = i
            healthy_load[i] = min(left, value * 100 // availability)
            left -= healthy_load[i]
        first_degraded = -1
        for i, value in enumerate(degraded_health):
            if first_degraded < 0 and value > 0:
                first_degraded = i
            degraded_load[i] = min(left, value * 100 // availability)
            left -= degraded_load[i]
        if left:
            if first_healthy >= 0:
                healthy_load[first_healthy] += left
            else:
                degraded_load[first_degraded] += left
    if threshold == 0.0 and availability == 0:
        healthy_load[0] = 100
    elif availability < 100:
        for i, (_, level_hosts, healthy, degraded) in enumerate(drafts):
            n = len(level_hosts)
            usable = 100.0 * (len(healthy) + len(degraded)) / n if n else 0.0
            panic[i] = usable < threshold
        if all(panic):
            total = sum(len(level) for level in every)
            healthy_load = [0] * count
            degraded_load = [0] * count
            if total == 0:
                healthy_load[0] = 100
            else:
                left = 100
                first = -1
                for i, level in enumerate(every):
                    if first < 0 and level:
                        first = i
                    healthy_load[i] = 100 * len(level) // total
                    left -= healthy_load[i]
                healthy_load[first] += left

    levels: list[PriorityLevel] = []
    for i, (priority, level_hosts, healthy, degraded) in enumerate(drafts):
        panic_hosts = tuple(every[i])
        localities = tuple(dict.fromkeys(h.locality for h in paced_items(panic_hosts)))
        levels.append(
            PriorityLevel(
                priority=priority,
                all=level_hosts,
                panic_hosts=panic_hosts,
                healthy=healthy,
                degraded=degraded,
                localities=localities,
                locality_weights=tuple(weights.get((priority, loc), 0) for loc in localities),
                all_per_locality=_group(level_hosts, localities),
                panic_per_locality=_group(panic_hosts, localities),
                healthy_per_locality=_group(healthy, localities),
                degraded_per_locality=_group(degraded, localities),
                health=health[i],
                degraded_health=degraded_health[i],
                panic=panic[i],
            )
        )
    return PriorityState(tuple(levels), tuple(healthy_load), tuple(degraded_load), factor)
