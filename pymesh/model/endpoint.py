"""Endpoints of a cluster (EDS ``ClusterLoadAssignment``), proto-free.

The decoder guarantees the invariants gRPC's xDS client checks (gRFC A27, A61): priorities
are contiguous from 0, no locality appears twice in a priority, no address appears twice in
the assignment, every weight is >= 1 and weight sums fit in a uint32. Localities whose
``load_balancing_weight`` was explicitly 0 are dropped, as gRPC does.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pymesh.model.common import Locality, SocketAddress
from pymesh.model.route import FractionalPercent

__all__ = [
    "ClusterLoadAssignment",
    "DropOverload",
    "HealthStatus",
    "LbEndpoint",
    "LocalityLbEndpoints",
]

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


class HealthStatus(enum.Enum):
    """Envoy ``core.v3.HealthStatus`` (values are the proto numbers)."""

    UNKNOWN = 0
    HEALTHY = 1
    UNHEALTHY = 2
    DRAINING = 3
    TIMEOUT = 4
    DEGRADED = 5

    @property
    def usable(self) -> bool:
        """Whether a load balancer may pick the endpoint (Envoy/gRPC: UNKNOWN or HEALTHY;
        DEGRADED only when nothing healthy is left, which the picker decides)."""
        return self is HealthStatus.UNKNOWN or self is HealthStatus.HEALTHY


@dataclass(frozen=True, slots=True)
class LbEndpoint:
    """One upstream host.

    ``metadata`` is ``filter_metadata`` as ``{filter: {key: json}}`` (frozen). Istio puts the
    workload's labels under ``"istio"`` and ``{"tlsMode": "istio"}`` under
    ``"envoy.transport_socket_match"`` (see :meth:`pymesh.model.cluster.Cluster.tls_for`).
    """

    address: SocketAddress
    additional_addresses: tuple[SocketAddress, ...] = ()
    health_status: HealthStatus = HealthStatus.UNKNOWN
    load_balancing_weight: int = 1
    hostname: str = ""
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty, hash=False)

    @property
    def transport_socket_match(self) -> Mapping[str, Any]:
        """The ``envoy.transport_socket_match`` metadata (empty mapping if none)."""
        return self.metadata.get("envoy.transport_socket_match", _EMPTY)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class LocalityLbEndpoints:
    """The endpoints of one locality at one priority.

    ``load_balancing_weight`` is ``None`` when unset (only locality-weighted load balancing
    reads it). Weak-referenceable: the EDS decoder reuses the object of a locality whose
    bytes did not change while some snapshot still holds it.
    """

    locality: Locality
    priority: int = 0
    load_balancing_weight: int | None = None
    endpoints: tuple[LbEndpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class DropOverload:
    """Drop this fraction of requests, counted under ``category``."""

    category: str
    drop_percentage: FractionalPercent


@dataclass(frozen=True, slots=True)
class ClusterLoadAssignment:
    """All endpoints of one cluster (by EDS service name), grouped by locality."""

    cluster_name: str
    localities: tuple[LocalityLbEndpoints, ...] = ()
    overprovisioning_factor: int = 140
    drop_overloads: tuple[DropOverload, ...] = ()
    endpoint_stale_after: float | None = None

    @property
    def priorities(self) -> tuple[tuple[LocalityLbEndpoints, ...], ...]:
        """Localities grouped by priority, index = priority (contiguous from 0)."""
        if not self.localities:
            return ()
        count = max(loc.priority for loc in self.localities) + 1
        groups: list[list[LocalityLbEndpoints]] = [[] for _ in range(count)]
        for loc in self.localities:
            groups[loc.priority].append(loc)
        return tuple(tuple(g) for g in groups)

    def all_endpoints(self) -> tuple[LbEndpoint, ...]:
        """Every endpoint in every locality and priority, in resource order."""
        return tuple(ep for loc in self.localities for ep in loc.endpoints)
