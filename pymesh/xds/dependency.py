"""The per-target dependency manager (gRFC A74): watches in, consistent snapshots out.

Theory of operation
-------------------
A client target needs a chain of resources: its listener (LDS) names a route configuration
(RDS, or carries it inline); the virtual host selected for the target's authority routes to
clusters (CDS); an aggregate cluster names child clusters (CDS, recursively); an EDS cluster
names its endpoints (EDS). The manager keeps exactly one watch per resource it currently
needs, on the :class:`~pymesh.xds.client.XdsClient`, and after every callback recomputes the
whole tree from what it holds:

==================================  ==========================================================
what the manager holds               what it does
==================================  ==========================================================
listener does not exist              publish ``TargetError(DOES_NOT_EXIST)``; drop RDS/CDS/EDS
listener not received yet            wait (an error before the first value is published as a
                                     transient ``TargetError`` while no snapshot exists)
listener without ``api_listener``    publish ``TargetError(INVALID)``
route config does not exist          publish ``TargetError(DOES_NOT_EXIST)``; drop CDS/EDS
route config not received yet        wait: the previous snapshot (if any) stays in use
no virtual host for the authority    publish ``TargetError(NO_VIRTUAL_HOST)``; drop CDS/EDS
some cluster/endpoints not received  start the missing watches, wait (previous snapshot stays)
every resource received or known     publish a new ``TargetSnapshot`` (if anything changed)
  not to exist
==================================  ==========================================================

After each recomputation every watch that the tree no longer reaches is cancelled, so
subscriptions widen and narrow with the routes. A cluster that does not exist, failed before
its first good version, or is an aggregate without leaves is a per-cluster
:class:`~pymesh.model.snapshot.ClusterError` inside a complete snapshot, never a global error.
Ambient errors (stream down, NACKed update of a resource we already hold) keep every value and
are reported to subscribers as ``TargetError(TRANSIENT)``; the published snapshot stays.

Aggregate clusters are flattened as gRPC does (A37 as revised by A74): depth-first in priority
order, each cluster visited once per recomputation, a cycle contributes nothing, nesting
deeper than 16 is an error for every aggregate on the path, and an aggregate with no usable
leaf is an error. One deliberate difference: gRPC credits an already-visited cluster to no
later aggregate, so an aggregate's leaves depend on the visiting order (a leaf a route also
names, a diamond); here every aggregate lists each of its usable leaves once, as Envoy's
aggregate cluster does.

:class:`ServerDependencyManager` does the same for an xDS-managed server (gRFC A36): its
inbound listener (which must be a server listener on the server's address) and every route
configuration its filter chains name; a missing route configuration is an error of the chains
using it, a missing listener stops the server from serving.

Everything here runs on the client's work-serializer thread (callbacks, ``start``, ``stop``),
so no state is locked; the only thing that crosses threads is the published immutable object.
"""

from __future__ import annotations

import ipaddress
import logging
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pymesh.errors import XdsError
from pymesh.model.cluster import Cluster, ClusterKind
from pymesh.model.common import SocketAddress
from pymesh.model.endpoint import ClusterLoadAssignment
from pymesh.model.listener import Listener
from pymesh.model.route import RouteAction, RouteConfiguration, VirtualHost
from pymesh.model.snapshot import (
    MAX_AGGREGATE_DEPTH,
    ClusterConfig,
    ClusterError,
    ErrorKind,
    RouteConfigError,
    ServerError,
    ServerSnapshot,
    TargetError,
    TargetSnapshot,
)
from pymesh.xds.pacing import checkpoint
from pymesh.xds.resource_types import ResourceType

if TYPE_CHECKING:
    from pymesh.bootstrap import Bootstrap

__all__ = [
    "ServerDependencyManager",
    "TargetDependencyManager",
    "WatchClient",
]

_log = logging.getLogger(__name__)

LDS = ResourceType.LISTENER
RDS = ResourceType.ROUTE_CONFIGURATION
CDS = ResourceType.CLUSTER
EDS = ResourceType.CLUSTER_LOAD_ASSIGNMENT


class _Watcher(Protocol):
    def on_resource_changed(self, rtype: ResourceType, name: str, value: object) -> None: ...
    def on_resource_does_not_exist(self, rtype: ResourceType, name: str) -> None: ...
    def on_ambient_error(self, rtype: ResourceType, name: str, error: str) -> None: ...


class WatchClient(Protocol):
    """The part of :class:`pymesh.xds.client.XdsClient` the snapshot layer uses."""

    @property
    def bootstrap(self) -> Bootstrap: ...

    def watch(self, rtype: ResourceType, name: str, watcher: _Watcher) -> Callable[[], None]: ...

    def run_in_serializer(self, fn: Callable[[], None]) -> None: ...


class _Watch:
    """One watch of one resource, with what it last delivered.

    Callbacks of a cancelled watch are ignored (``active`` is False), so a callback that was
    already queued when the manager stopped needing the resource cannot resurrect it.
    """

    __slots__ = (
        "active",
        "cancel",
        "does_not_exist",
        "error",
        "name",
        "on_update",
        "rtype",
        "value",
    )

    def __init__(self, rtype: ResourceType, name: str, on_update: Callable[[_Watch], None]):
        self.rtype = rtype
        self.name = name
        self.on_update = on_update
        self.value: object | None = None
        self.does_not_exist = False
        self.error: str | None = None
        self.active = True
        self.cancel: Callable[[], None] = _noop

    @property
    def resolved(self) -> bool:
        """Received, known not to exist, or failed before a first good value."""
        return self.value is not None or self.does_not_exist or self.error is not None

    def on_resource_changed(self, rtype: ResourceType, name: str, value: object) -> None:
        if self.active:
            self.value = value
            self.does_not_exist = False
            self.error = None
            self.on_update(self)

    def on_resource_does_not_exist(self, rtype: ResourceType, name: str) -> None:
        if self.active:
            self.value = None
            self.does_not_exist = True
            self.error = None
            self.on_update(self)

    def on_ambient_error(self, rtype: ResourceType, name: str, error: str) -> None:
        if self.active:
            self.error = error
            self.on_update(self)

    def describe(self) -> str:
        return f"{self.rtype.abbrev} {self.name}"


def _noop() -> None:
    return None


class _WatchSet:
    """The watches one manager holds, keyed by (type, name).

    Starting and cancelling a watch on the client is *posted* to the work serializer rather
    than done inline: the manager runs inside a client callback, and re-entering the client
    there would let a subscription change overtake the ACK the client is about to send for
    the response being delivered (the ACK would then carry the old resource names and
    briefly unsubscribe the new ones, which a SotW server answers with a deletion).
    """

    def __init__(self, client: WatchClient, on_update: Callable[[_Watch], None]):
        self._client = client
        self._on_update = on_update
        self.watches: dict[tuple[ResourceType, str], _Watch] = {}

    def get(self, rtype: ResourceType, name: str) -> tuple[_Watch, bool]:
        """The watch of ``name``, starting it if needed; the bool says it is new."""
        key = (rtype, name)
        found = self.watches.get(key)
        if found is not None:
            return found, False
        watch = _Watch(rtype, name, self._on_update)
        self.watches[key] = watch
        client = self._client

        def start() -> None:
            if watch.active:
                try:
                    watch.cancel = client.watch(rtype, name, watch)
                except XdsError as exc:  # the client was closed meanwhile
                    _log.debug("not watching %s: %s", watch.describe(), exc)

        client.run_in_serializer(start)
        return watch, True

    def cancel(self, rtype: ResourceType, name: str) -> None:
        watch = self.watches.pop((rtype, name), None)
        if watch is not None:
            watch.active = False  # a start() still queued will not watch
            self._client.run_in_serializer(watch.cancel)

    def retain(self, rtype: ResourceType, keep: Iterable[str]) -> None:
        """Cancel every watch of ``rtype`` whose name is not in ``keep``."""
        wanted = set(keep)
        for key in [k for k in self.watches if k[0] is rtype and k[1] not in wanted]:
            self.cancel(*key)

    def cancel_all(self) -> None:
        for key in list(self.watches):
            self.cancel(*key)


def vhost_cluster_names(route_config: RouteConfiguration, vhost: VirtualHost) -> frozenset[str]:
    """Every cluster the routes of ``vhost`` can send or mirror to.

    Clusters chosen per request from a header (``cluster_header``) cannot be known in advance
    and are not watched (gRPC ignores such routes too).
    """
    names = {m.cluster for m in route_config.request_mirror_policies}
    names.update(m.cluster for m in vhost.request_mirror_policies)
    for route in vhost.routes:
        if isinstance(route.action, RouteAction):
            names |= route.action.cluster_names()
    return frozenset(names)


@dataclass(slots=True)
class _Leaves:
    names: list[str] = field(default_factory=list)
    error: str | None = None

    def add(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.names:
                self.names.append(name)


class TargetDependencyManager:
    """Builds :class:`TargetSnapshot` s for one client target; runs on the work serializer.

    ``publish`` receives every new snapshot and every ``TargetError`` (ambient ones included);
    :mod:`pymesh.xds.watch` turns that into the adapter-facing handle.
    """

    def __init__(
        self,
        client: WatchClient,
        *,
        target: str,
        listener_name: str,
        authority: str,
        publish: Callable[[TargetSnapshot | TargetError], None],
    ):
        self.target = target
        self.listener_name = listener_name
        self.authority = authority
        self._publish = publish
        self._watches = _WatchSet(client, self._on_update)
        self._stopped = False
        self._version = 0
        self._last: TargetSnapshot | None = None
        self._cluster_configs: dict[str, ClusterConfig] = {}
        # Clusters wanted beyond the routes' (A74 "cluster subscriptions"), ref-counted.
        self._extra_clusters: dict[str, int] = {}
        # (route config, vhost, its cluster names) of the last recomputation: an EDS or CDS
        # update then costs O(clusters), not O(routes).
        self._roots: tuple[RouteConfiguration, VirtualHost | None, tuple[str, ...]] | None = None
        # Ambient errors already reported since the last snapshot (no repeats per outage).
        self._ambient_reported: set[tuple[str, str]] = set()

    # -- lifecycle (serializer thread) ------------------------------------------------------

    def start(self) -> None:
        if not self._stopped:
            self._watches.get(LDS, self.listener_name)

    def stop(self) -> None:
        self._stopped = True
        self._watches.cancel_all()

    @property
    def watched(self) -> frozenset[tuple[ResourceType, str]]:
        """The resources currently watched (for tests and debugging)."""
        return frozenset(self._watches.watches)

    def add_cluster(self, name: str) -> None:
        """Also watch cluster ``name`` (and what it needs) and include it in snapshots, even
        if no route names it (e.g. a cluster picked per request by ``cluster_header``)."""
        self._extra_clusters[name] = self._extra_clusters.get(name, 0) + 1
        if self._extra_clusters[name] == 1 and not self._stopped:
            self._recompute_safely()

    def remove_cluster(self, name: str) -> None:
        """Undo one :meth:`add_cluster`."""
        count = self._extra_clusters.get(name, 0) - 1
        if count > 0:
            self._extra_clusters[name] = count
            return
        self._extra_clusters.pop(name, None)
        if not self._stopped:
            self._recompute_safely()

    # -- recomputation -----------------------------------------------------------------------

    def _on_update(self, watch: _Watch) -> None:
        if self._stopped:
            return
        if watch.error is not None and watch.value is not None:
            # Ambient: keep using the value we hold, tell subscribers (once per outage).
            self._report_ambient(watch)
            return
        self._recompute_safely()

    def _report_ambient(self, watch: _Watch) -> None:
        assert watch.error is not None
        key = (watch.describe(), watch.error)
        if key not in self._ambient_reported:
            self._ambient_reported.add(key)
            self._publish(
                TargetError(self.target, ErrorKind.TRANSIENT, watch.error, watch.describe())
            )

    def _recompute_safely(self) -> None:
        try:
            self._recompute()
        except Exception:  # isolate bugs from the client's serializer thread
            _log.exception("xDS dependency manager for %s failed", self.target)

    def _fail(self, kind: ErrorKind, message: str, watch: _Watch) -> None:
        """Publish a target-wide error (or a transient one before any snapshot exists)."""
        self._last = None
        self._publish(TargetError(self.target, kind, message, watch.describe()))

    def _recompute(self) -> None:
        lds, _ = self._watches.get(LDS, self.listener_name)
        if lds.does_not_exist:
            self._drop_below_listener()
            self._fail(ErrorKind.DOES_NOT_EXIST, "listener does not exist", lds)
            return
        if not isinstance(lds.value, Listener):
            if lds.error is not None:
                self._fail(ErrorKind.TRANSIENT, lds.error, lds)
            return
        listener = lds.value
        hcm = listener.api_listener
        if hcm is None:
            self._drop_below_listener()
            self._fail(
                ErrorKind.INVALID, "listener has no api_listener (not a client listener)", lds
            )
            return

        if hcm.route_config is not None:
            self._watches.retain(RDS, ())
            route_config = hcm.route_config
        elif hcm.rds_name is None:
            self._drop_below_listener()
            self._fail(ErrorKind.INVALID, "listener names no route configuration", lds)
            return
        else:
            self._watches.retain(RDS, (hcm.rds_name,))
            rds, _ = self._watches.get(RDS, hcm.rds_name)
            if rds.does_not_exist:
                self._drop_clusters()
                self._fail(ErrorKind.DOES_NOT_EXIST, "route configuration does not exist", rds)
                return
            if not isinstance(rds.value, RouteConfiguration):
                if rds.error is not None:
                    if self._last is None:
                        self._fail(ErrorKind.TRANSIENT, rds.error, rds)
                    else:  # the listener moved to a route config that fails: keep the old one
                        self._report_ambient(rds)
                return
            route_config = rds.value

        roots = self._roots
        if roots is None or roots[0] is not route_config:
            selected = route_config.select_virtual_host(self.authority)
            names = () if selected is None else tuple(vhost_cluster_names(route_config, selected))
            roots = self._roots = (route_config, selected, names)
        vhost = roots[1]
        if vhost is None:
            self._drop_clusters()
            self._fail(
                ErrorKind.NO_VIRTUAL_HOST,
                f"no virtual host in route configuration {route_config.name!r} matches "
                f"authority {self.authority!r}",
                lds,
            )
            return

        clusters: dict[str, ClusterConfig | ClusterError] = {}
        eds_seen: set[str] = set()
        complete = True
        for name in sorted({*roots[2], *self._extra_clusters}):
            if not self._populate(name, 0, clusters, eds_seen, None):
                complete = False
        self._watches.retain(CDS, clusters)
        self._watches.retain(EDS, eds_seen)
        self._cluster_configs = {k: v for k, v in self._cluster_configs.items() if k in clusters}
        if not complete:
            return
        checkpoint()  # on the paced work thread: before the subscribers' work
        self._maybe_publish(listener, route_config, vhost, clusters)

    def _drop_clusters(self) -> None:
        self._watches.retain(CDS, ())
        self._watches.retain(EDS, ())
        self._cluster_configs.clear()

    def _drop_below_listener(self) -> None:
        self._watches.retain(RDS, ())
        self._drop_clusters()

    def _populate(
        self,
        name: str,
        depth: int,
        out: dict[str, ClusterConfig | ClusterError],
        eds_seen: set[str],
        leaves: _Leaves | None,
    ) -> bool:
        """Add ``name`` (and its children) to ``out``; False if some data is still missing.

        A port of gRPC's ``XdsDependencyManager::PopulateClusterConfigMap``.
        """
        if depth == MAX_AGGREGATE_DEPTH:
            assert leaves is not None
            leaves.error = f"aggregate cluster graph exceeds max depth {MAX_AGGREGATE_DEPTH}"
            return True
        if name in out:
            # Visited already: in another branch (diamond), as a route's own cluster, or it is
            # an ancestor (cycle: still the placeholder error, contributes nothing). A usable
            # cluster still counts for this aggregate, once.
            seen = out[name]
            if leaves is not None and isinstance(seen, ClusterConfig):
                leaves.add(seen.leaf_clusters if seen.is_aggregate else (name,))
            return True
        out[name] = ClusterError(name, ErrorKind.TRANSIENT, "cluster data not yet available")
        cds, new = self._watches.get(CDS, name)
        if new:
            return False
        if cds.does_not_exist:
            out[name] = ClusterError(name, ErrorKind.DOES_NOT_EXIST, "cluster does not exist")
            return True
        cluster = cds.value
        if not isinstance(cluster, Cluster):
            if cds.error is not None:
                out[name] = ClusterError(name, ErrorKind.INVALID, cds.error)
                return True
            return False

        if cluster.kind is ClusterKind.AGGREGATE:
            child = _Leaves()
            missing = False
            for child_name in cluster.aggregate_clusters:
                if not self._populate(child_name, depth + 1, out, eds_seen, child):
                    missing = True
                if child.error is not None:
                    break
            if child.error is not None:
                # Too deep: an error for this aggregate and every aggregate above it.
                out[name] = ClusterError(name, ErrorKind.AGGREGATE, child.error)
                if leaves is not None:
                    leaves.error = child.error
                return True
            if missing:
                return False
            if not child.names:
                out[name] = ClusterError(
                    name,
                    ErrorKind.AGGREGATE,
                    f"aggregate cluster dependency graph for {name} has no leaf clusters",
                )
                return True
            out[name] = self._config(cluster, None, tuple(child.names), "")
            if leaves is not None:
                leaves.add(child.names)
            return True

        if cluster.kind is ClusterKind.EDS:
            eds_name = cluster.eds_resource_name
            eds_seen.add(eds_name)
            eds, new = self._watches.get(EDS, eds_name)
            if new or not eds.resolved:
                return False
            endpoints = eds.value if isinstance(eds.value, ClusterLoadAssignment) else None
            note = ""
            if endpoints is None:
                note = (
                    f"EDS resource {eds_name} does not exist"
                    if eds.does_not_exist
                    else f"EDS resource {eds_name}: {eds.error}"
                )
            out[name] = self._config(cluster, endpoints, (), note)
        else:
            # STATIC and LOGICAL_DNS carry their endpoints inline. LOGICAL_DNS host names are
            # resolved by the data plane when it connects, not here.
            note = "" if cluster.load_assignment is not None else "cluster has no endpoints"
            out[name] = self._config(cluster, cluster.load_assignment, (), note)
        if leaves is not None:
            leaves.add((name,))
        return True

    def _config(
        self,
        cluster: Cluster,
        endpoints: ClusterLoadAssignment | None,
        leaf_clusters: tuple[str, ...],
        note: str,
    ) -> ClusterConfig:
        """A ``ClusterConfig``, reusing the previous object when nothing changed."""
        prev = self._cluster_configs.get(cluster.name)
        if (
            prev is not None
            and prev.cluster is cluster
            and prev.endpoints is endpoints
            and prev.leaf_clusters == leaf_clusters
            and prev.resolution_note == note
        ):
            return prev
        config = ClusterConfig(cluster, endpoints, leaf_clusters, note)
        self._cluster_configs[cluster.name] = config
        return config

    def _maybe_publish(
        self,
        listener: Listener,
        route_config: RouteConfiguration,
        vhost: VirtualHost,
        clusters: dict[str, ClusterConfig | ClusterError],
    ) -> None:
        last = self._last
        if (
            last is not None
            and last.listener is listener
            and last.route_config is route_config
            and last.virtual_host is vhost
            and _same_values(last.clusters, clusters)
        ):
            return
        self._version += 1
        snapshot = TargetSnapshot(
            target=self.target,
            authority=self.authority,
            listener_name=self.listener_name,
            listener=listener,
            route_config=route_config,
            virtual_host=vhost,
            clusters=types.MappingProxyType(clusters),
            version=self._version,
        )
        self._last = snapshot
        self._ambient_reported.clear()
        self._publish(snapshot)


def _ip_key(host: str) -> str:
    """``host`` normalized for comparison (IPv6 spelled canonically, no brackets)."""
    host = host.strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _same_values(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if value is not other and value != other:
            return False
    return True


class ServerDependencyManager:
    """Builds :class:`ServerSnapshot` s for one inbound listener; runs on the work serializer."""

    def __init__(
        self,
        client: WatchClient,
        *,
        listener_name: str,
        publish: Callable[[ServerSnapshot | ServerError], None],
        address: SocketAddress | None = None,
    ):
        self.listener_name = listener_name
        self.address = address
        self._publish = publish
        self._watches = _WatchSet(client, self._on_update)
        self._stopped = False
        self._version = 0
        self._last: ServerSnapshot | None = None

    def start(self) -> None:
        if not self._stopped:
            self._watches.get(LDS, self.listener_name)

    def stop(self) -> None:
        self._stopped = True
        self._watches.cancel_all()

    @property
    def watched(self) -> frozenset[tuple[ResourceType, str]]:
        return frozenset(self._watches.watches)

    def _on_update(self, watch: _Watch) -> None:
        if self._stopped:
            return
        if watch.error is not None and watch.value is not None:
            self._publish(ServerError(self.listener_name, ErrorKind.TRANSIENT, watch.error))
            return
        try:
            self._recompute()
        except Exception:
            _log.exception("xDS server dependency manager for %s failed", self.listener_name)

    def _fail(self, kind: ErrorKind, message: str) -> None:
        self._last = None
        self._publish(ServerError(self.listener_name, kind, message))

    def _check_listener(self, listener: Listener) -> str | None:
        """Why ``listener`` cannot serve this server (gRFC A36), or ``None``."""
        if listener.api_listener is not None:
            return "listener has an api_listener: not a server listener"
        if self.address is not None and listener.address is not None:
            want, got = self.address, listener.address
            if want.port != got.port or _ip_key(want.host) != _ip_key(got.host):
                return f"listener address {got} does not match the server's address {want}"
        return None

    def _recompute(self) -> None:
        lds, _ = self._watches.get(LDS, self.listener_name)
        if lds.does_not_exist:
            self._watches.retain(RDS, ())
            self._fail(ErrorKind.DOES_NOT_EXIST, "listener does not exist")
            return
        if not isinstance(lds.value, Listener):
            if lds.error is not None:
                self._fail(ErrorKind.TRANSIENT, lds.error)
            return
        listener = lds.value
        problem = self._check_listener(listener)
        if problem is not None:
            self._watches.retain(RDS, ())
            self._fail(ErrorKind.INVALID, problem)
            return
        names = sorted(listener.route_config_names())
        self._watches.retain(RDS, names)
        route_configs: dict[str, RouteConfiguration | RouteConfigError] = {}
        complete = True
        for name in names:
            rds, new = self._watches.get(RDS, name)
            if isinstance(rds.value, RouteConfiguration):
                route_configs[name] = rds.value
            elif rds.does_not_exist:
                route_configs[name] = RouteConfigError(
                    name, ErrorKind.DOES_NOT_EXIST, "route configuration does not exist"
                )
            elif rds.error is not None and not new:
                route_configs[name] = RouteConfigError(name, ErrorKind.INVALID, rds.error)
            else:
                complete = False
        if not complete:
            return
        last = self._last
        if (
            last is not None
            and last.listener is listener
            and _same_values(last.route_configs, route_configs)
        ):
            return
        self._version += 1
        snapshot = ServerSnapshot(
            listener_name=self.listener_name,
            listener=listener,
            route_configs=types.MappingProxyType(route_configs),
            version=self._version,
        )
        self._last = snapshot
        self._publish(snapshot)
