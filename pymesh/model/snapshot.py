"""The immutable views the xDS client publishes to adapters (gRFC A74 "XdsConfig").

A :class:`TargetSnapshot` is everything a client-side call to one target needs, complete and
consistent: the listener, the route configuration it names (or carries inline), the virtual
host selected for the target's authority, and every cluster that virtual host can route to,
each with its endpoints. It is built by :mod:`pymesh.xds.dependency` only once every
referenced resource has been received or is known not to exist, so a reader never sees a
listener whose route configuration is missing ("no tears"). An update builds a new snapshot
and swaps one reference; a call reads one snapshot when it starts and keeps it to the end.

Problems that make the *whole* target unusable (the listener or route configuration does not
exist, no virtual host matches) are a :class:`TargetError`. Problems with *one* cluster are a
:class:`ClusterError` inside the snapshot's ``clusters`` mapping: routes to other clusters keep
working, calls routed to the broken one fail (gRPC: UNAVAILABLE, Envoy: 503).

:class:`ServerSnapshot` is the server-side counterpart (gRFC A36): an inbound listener and the
route configurations its filter chains name.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymesh.model.cluster import Cluster
    from pymesh.model.endpoint import ClusterLoadAssignment
    from pymesh.model.listener import Listener
    from pymesh.model.route import RouteConfiguration, VirtualHost

__all__ = [
    "MAX_AGGREGATE_DEPTH",
    "ClusterConfig",
    "ClusterError",
    "ErrorKind",
    "RouteConfigError",
    "ServerError",
    "ServerSnapshot",
    "TargetError",
    "TargetSnapshot",
]

MAX_AGGREGATE_DEPTH = 16
"""Aggregate clusters nest at most this deep (gRPC's ``kMaxXdsAggregateClusterRecursionDepth``)."""


class ErrorKind(enum.Enum):
    """Why a target, server or cluster is unusable."""

    DOES_NOT_EXIST = "does_not_exist"
    """The control plane says the resource does not exist (or it was removed)."""
    INVALID = "invalid"
    """The resource failed before any good version arrived (it was NACKed, or the control
    plane was unreachable when it was first needed: see the message), or is unusable here
    (e.g. a listener without an ``api_listener`` used as a client target)."""
    NO_VIRTUAL_HOST = "no_virtual_host"
    """No virtual host of the route configuration matches the target's authority."""
    AGGREGATE = "aggregate"
    """An aggregate cluster graph has no leaf clusters, a cycle only, or is too deep."""
    TRANSIENT = "transient"
    """The control plane is unreachable or sent a bad update: keep the last good config."""


@dataclass(frozen=True, slots=True)
class ClusterError:
    """One cluster of a snapshot is unusable; calls routed to it fail (503 / UNAVAILABLE)."""

    cluster_name: str
    kind: ErrorKind
    message: str

    def __str__(self) -> str:
        return f"cluster {self.cluster_name!r}: {self.message}"


@dataclass(frozen=True, slots=True, repr=False)
class ClusterConfig:
    """A usable cluster and what it resolves to.

    For an EDS, STATIC or LOGICAL_DNS cluster ``endpoints`` is its load assignment (``None`` if
    the EDS resource does not exist or failed before a good version arrived; ``resolution_note``
    then says why: no healthy upstream). For an AGGREGATE cluster ``endpoints`` is ``None`` and
    ``leaf_clusters`` lists the non-aggregate clusters it flattens to, in priority order (gRFC
    A37 as revised by A74); each leaf has its own entry in the snapshot's ``clusters``.
    """

    cluster: Cluster
    endpoints: ClusterLoadAssignment | None = None
    leaf_clusters: tuple[str, ...] = ()
    resolution_note: str = ""

    def __repr__(self) -> str:  # compact: a cluster can hold thousands of endpoints
        if self.is_aggregate:
            detail = f"leaf_clusters={self.leaf_clusters!r}"
        elif self.endpoints is None:
            detail = f"endpoints=None, resolution_note={self.resolution_note!r}"
        else:
            detail = f"endpoints={len(self.endpoints.all_endpoints())}"
        return f"ClusterConfig({self.cluster.name!r}, {self.cluster.kind.name}, {detail})"

    @property
    def name(self) -> str:
        return self.cluster.name

    @property
    def is_aggregate(self) -> bool:
        return self.cluster.kind.name == "AGGREGATE"


@dataclass(frozen=True, slots=True, repr=False)
class TargetSnapshot:
    """A complete, consistent view of one client target (gRFC A74 ``XdsConfig``).

    ``version`` counts the snapshots published for this target (1, 2, ...); an update of any
    resource the target depends on publishes a new snapshot with a higher version, sharing
    every unchanged object with the previous one.
    """

    target: str
    authority: str
    listener_name: str
    listener: Listener
    route_config: RouteConfiguration
    virtual_host: VirtualHost
    clusters: Mapping[str, ClusterConfig | ClusterError]
    version: int

    def __repr__(self) -> str:  # compact: the full structure is huge
        return (
            f"TargetSnapshot(target={self.target!r}, version={self.version}, "
            f"listener={self.listener_name!r}, route_config={self.route_config.name!r}, "
            f"virtual_host={self.virtual_host.name!r}, clusters={dict(self.clusters)!r})"
        )

    def cluster(self, name: str) -> ClusterConfig | ClusterError:
        """The config of a cluster a route names; a ``ClusterError`` if it is not usable."""
        found = self.clusters.get(name)
        if found is None:
            return ClusterError(
                name, ErrorKind.DOES_NOT_EXIST, "cluster not referenced by the route config"
            )
        return found

    def leaves(self, name: str) -> tuple[ClusterConfig | ClusterError, ...]:
        """What a route to cluster ``name`` load-balances over, in priority order.

        An aggregate cluster gives its leaf clusters (gRFC A37: the first usable one in
        priority order takes the traffic); any other cluster gives itself; an unusable one
        gives its ``ClusterError``.
        """
        config = self.cluster(name)
        if isinstance(config, ClusterError) or not config.is_aggregate:
            return (config,)
        return tuple(self.cluster(leaf) for leaf in config.leaf_clusters)


@dataclass(frozen=True, slots=True)
class TargetError:
    """The target cannot be used (``ambient`` False), or a transient problem (``ambient``).

    A non-ambient error *replaces* the target's snapshot: calls fail with UNAVAILABLE / 503
    carrying ``message``. An ambient error (the control plane is unreachable, an update was
    NACKed) is reported to subscribers, but the last good snapshot stays in use.
    """

    target: str
    kind: ErrorKind
    message: str
    resource: str = ""
    """``"LDS name"`` / ``"RDS name"`` / ... of the resource at fault, if known."""

    @property
    def ambient(self) -> bool:
        return self.kind is ErrorKind.TRANSIENT

    def __str__(self) -> str:
        where = f" ({self.resource})" if self.resource else ""
        return f"xDS target {self.target!r}{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class RouteConfigError:
    """A route configuration named by a server listener's filter chain is unusable."""

    name: str
    kind: ErrorKind
    message: str


@dataclass(frozen=True, slots=True, repr=False)
class ServerSnapshot:
    """The inbound listener of an xDS-managed server and its route configurations by name.

    ``route_configs`` holds every name in ``listener.route_config_names()``; a missing one is
    a :class:`RouteConfigError` (requests on chains using it fail, gRFC A36), not a global
    error.
    """

    listener_name: str
    listener: Listener
    route_configs: Mapping[str, RouteConfiguration | RouteConfigError]
    version: int

    def __repr__(self) -> str:
        configs = {
            name: rc if isinstance(rc, RouteConfigError) else "RouteConfiguration"
            for name, rc in self.route_configs.items()
        }
        return (
            f"ServerSnapshot(listener={self.listener_name!r}, version={self.version}, "
            f"route_configs={configs!r})"
        )


@dataclass(frozen=True, slots=True)
class ServerError:
    """The server's inbound listener is unusable (``ambient`` False: the server must stop
    serving new connections, gRFC A36 "not serving") or a transient problem (``ambient``)."""

    listener_name: str
    kind: ErrorKind
    message: str

    @property
    def ambient(self) -> bool:
        return self.kind is ErrorKind.TRANSIENT

    def __str__(self) -> str:
        return f"xDS server listener {self.listener_name!r}: {self.message}"
