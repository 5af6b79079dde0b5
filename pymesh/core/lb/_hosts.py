"""Runtime hosts from an EDS assignment, keeping each host's identity across updates."""

from __future__ import annotations

from collections.abc import Mapping

from pymesh.core.types import Host
from pymesh.model.endpoint import ClusterLoadAssignment
from pymesh.xds.pacing import checkpoint

__all__ = ["build_hosts"]


def build_hosts(
    assignment: ClusterLoadAssignment | None, previous: Mapping[str, Host]
) -> dict[str, Host]:
    """The hosts of ``assignment`` by key (``"host:port"``), in resource order.

    A host whose address was already in ``previous`` is the same :class:`Host` object, its
    weight, locality, priority, health, hostname and metadata refreshed from the new
    assignment, so active-request counts and outlier ejections survive an EDS update (Envoy
    keeps a host across updates the same way). Addresses that left are simply not returned.
    """
    hosts: dict[str, Host] = {}
    if assignment is None:
        return hosts
    for loc in assignment.localities:
        for i, ep in enumerate(loc.endpoints):
            if not i & 63:
                checkpoint()  # on the xDS thread: give the GIL to the application's threads
            key = str(ep.address)
            host = previous.get(key)
            if host is None:
                host = Host(
                    ep.address,
                    weight=ep.load_balancing_weight,
                    locality=loc.locality,
                    priority=loc.priority,
                    health=ep.health_status,
                    hostname=ep.hostname,
                    metadata=ep.metadata,
                )
            else:
                host.weight = ep.load_balancing_weight
                host.locality = loc.locality
                host.priority = loc.priority
                host.health = ep.health_status
                host.hostname = ep.hostname
                host.metadata = ep.metadata
            hosts[key] = host
    return hosts
