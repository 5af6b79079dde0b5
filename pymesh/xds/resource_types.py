"""The xDS resource types pymesh speaks, by type URL (plain strings: no protos here)."""

from __future__ import annotations

import enum

__all__ = ["ResourceType"]

_PREFIX = "type.googleapis.com/"


class ResourceType(enum.Enum):
    """One xDS resource type. ``value`` is the v3 type URL."""

    LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
    ROUTE_CONFIGURATION = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
    CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
    CLUSTER_LOAD_ASSIGNMENT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"

    @property
    def type_url(self) -> str:
        return self.value

    @property
    def short_name(self) -> str:
        """``Listener``, ``RouteConfiguration``, ``Cluster``, ``ClusterLoadAssignment``."""
        return self.value.rsplit(".", 1)[-1]

    @property
    def abbrev(self) -> str:
        """LDS, RDS, CDS or EDS."""
        return _ABBREV[self]

    @classmethod
    def from_type_url(cls, type_url: str) -> ResourceType | None:
        try:
            return cls(type_url)
        except ValueError:
            return None


_ABBREV = {
    ResourceType.LISTENER: "LDS",
    ResourceType.ROUTE_CONFIGURATION: "RDS",
    ResourceType.CLUSTER: "CDS",
    ResourceType.CLUSTER_LOAD_ASSIGNMENT: "EDS",
}
