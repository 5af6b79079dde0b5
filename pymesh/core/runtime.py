"""Per-cluster runtime state shared by every call and every adapter of one xDS client.

Config is immutable and swapped per snapshot; *runtime* state is not: active-request
counters, circuit-breaker counts, outlier ejections, round-robin positions. It must survive
config updates (an EDS update must not reset a host's ejection; a CDS update must not reset
the breaker's counts), so it lives here, keyed by cluster name, and each new snapshot
*updates* it instead of rebuilding it.

:class:`MeshRuntime` (one per :class:`~pymesh.xds.client.XdsClient`, see
:meth:`MeshRuntime.for_client`) owns a :class:`ClusterRuntime` per cluster name. Updates
arrive two ways, both idempotent: the runtime subscribes to every target handle it hands
out (the xDS work thread updates clusters as snapshots are published), and a call that reads
a snapshot whose cluster config is newer than the runtime's updates it on the spot
(``cluster_for``: an identity check on the hot path, a lock only when the config changed).

Theory of operation of a :class:`ClusterRuntime`'s load balancer:

=========================  =============================================================
event                      effect
=========================  =============================================================
endpoints changed (EDS)    ``build_hosts`` reuses the ``Host`` of every address still
                           present (counters, ejection survive); LB rebuilt; hosts that
                           left every cluster are reported to adapters (drain pools)
cluster changed (CDS)      limits thresholds updated (counts kept); outlier detector
                           replaced if its config changed; LB rebuilt
ejection starts            ``OutlierDetector.record`` says so -> LB rebuilt at once
pick at ``now >= next``    ``next`` = min(outlier sweep time, earliest ejection end):
                           sweep (success rate, failure percentage, un-ejection), rebuild
unreachable set changed    hosts an adapter cannot connect to (gRPC subchannel in
                           TRANSIENT_FAILURE) left out of the balancer until reported
                           reachable again (C-core's pickers skip such subchannels); LB
                           rebuilt
no snapshot uses it        released (its hosts reported as gone)
=========================  =============================================================

The hot path (``pick``) is one float comparison and the balancer's own pick; rebuilds take a
per-cluster lock, and a pick that races a rebuild uses the previous balancer, which is as
valid as a pick made a microsecond earlier.
"""

from __future__ import annotations

import math
import random
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pymesh.core.fault import ActiveFaults
from pymesh.core.lb import build_hosts, build_load_balancer
from pymesh.core.limits import ClusterLimits
from pymesh.core.outlier import OutlierDetector
from pymesh.core.types import Host, LoadBalancer, PickContext
from pymesh.model.cluster import ClusterKind, UpstreamProtocol
from pymesh.model.common import Locality
from pymesh.model.snapshot import ClusterConfig, TargetError, TargetSnapshot
from pymesh.xds.pacing import paced_items

if TYPE_CHECKING:
    from pymesh.xds.client import XdsClient
    from pymesh.xds.watch import TargetHandle

__all__ = ["ClusterRuntime", "HostsRemovedListener", "MeshRuntime"]

HostsRemovedListener = Callable[[frozenset[str]], None]
"""Called with the keys (``host:port``) of endpoints no cluster uses any more."""

_INF = math.inf


def _noop() -> None:
    return None


class _NoHosts:
    """The balancer of a cluster without endpoints."""

    def pick(self, ctx: PickContext) -> Host | None:
        return None


_NO_HOSTS = _NoHosts()


class ClusterRuntime:
    """Runtime state of one cluster: hosts, load balancer, limits, outlier detection.

    Requests in flight are counted by ``limits`` (``limits.requests``: attempts being sent
    and upstream responses not yet finished), under its lock.
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        now: float,
        rng: random.Random,
        local_locality: Locality | None,
        unreachable: frozenset[str] = frozenset(),
    ) -> None:
        cluster = config.cluster
        self.name = config.name
        self.config = config
        self._rng = rng
        self._local_locality = local_locality
        self._lock = threading.Lock()
        self.hosts: dict[str, Host] = {}
        self.limits = ClusterLimits(cluster.circuit_breakers)
        self.outlier: OutlierDetector | None = (
            OutlierDetector(cluster.outlier_detection, rng=rng, now=now)
            if cluster.outlier_detection is not None
            else None
        )
        self.protocol = UpstreamProtocol.HTTP1
        self._lb: LoadBalancer = _NO_HOSTS
        self._next_check = _INF
        self.usable_hosts = 0
        self._unreachable = unreachable
        self._apply(config, now, first=True)

    # -- hot path ------------------------------------------------------------------------

    def pick(self, ctx: PickContext) -> Host | None:
        """A host for one attempt (``None``: no healthy upstream)."""
        if ctx.now >= self._next_check:
            self._maintain(ctx.now)
        return self._lb.pick(ctx)

    def ejections_changed(self, now: float) -> None:
        """Outlier detection ejected (or returned) a host: rebuild the balancer."""
        with self._lock:
            self._rebuild(now)

    def set_unreachable(self, keys: frozenset[str], now: float) -> None:
        """The balancer leaves out the hosts whose key is in ``keys`` (see
        :meth:`MeshRuntime.set_unreachable`)."""
        with self._lock:
            if keys != self._unreachable:
                self._unreachable = keys
                self._rebuild(now)

    # -- updates -------------------------------------------------------------------------

    def update(self, config: ClusterConfig, now: float) -> frozenset[str]:
        """Apply a new config; returns the keys of hosts that left this cluster."""
        with self._lock:
            if config is self.config:
                return frozenset()
            return self._apply(config, now, first=False)

    def _apply(self, config: ClusterConfig, now: float, *, first: bool) -> frozenset[str]:
        old = self.config
        self.config = config
        cluster = config.cluster
        if not first and cluster != old.cluster:
            self.limits.update(cluster.circuit_breakers)
            if cluster.outlier_detection != old.cluster.outlier_detection:
                if cluster.outlier_detection is None:
                    self.outlier = None
                    for h in self.hosts.values():
                        h.ejected_until = None
                elif self.outlier is None:
                    self.outlier = OutlierDetector(
                        cluster.outlier_detection,
                        rng=self._rng,
                        hosts=tuple(self.hosts.values()),
                        now=now,
                    )
                else:  # new thresholds; ejections and counters are kept
                    self.outlier.update_config(cluster.outlier_detection)
        protocol = cluster.http_protocol_options.protocol
        self.protocol = (
            UpstreamProtocol.HTTP2 if protocol is UpstreamProtocol.HTTP2 else UpstreamProtocol.HTTP1
        )
        removed: frozenset[str] = frozenset()
        if first or config.endpoints is not old.endpoints or cluster != old.cluster:
            assignment = config.endpoints
            if assignment is None and cluster.load_assignment is not None:
                assignment = cluster.load_assignment
            previous = self.hosts
            self.hosts = build_hosts(assignment, previous)
            removed = frozenset(previous.keys() - self.hosts.keys())
            if self.outlier is not None:
                self.outlier.update_hosts(tuple(self.hosts.values()))
            self._rebuild(now)
        return removed

    def _rebuild(self, now: float) -> None:
        unreachable = self._unreachable
        if unreachable:
            hosts = tuple(h for h in paced_items(self.hosts.values()) if h.key not in unreachable)
        else:
            hosts = tuple(self.hosts.values())
        if hosts:
            assignment = self.config.endpoints or self.config.cluster.load_assignment
            self._lb = build_load_balancer(
                self.config.cluster,
                hosts,
                assignment,
                now=now,
                rng=self._rng,
                local_locality=self._local_locality,
            )
        else:
            self._lb = _NO_HOSTS
        self.usable_hosts = sum(
            1 for h in paced_items(hosts) if h.health.usable and not h.is_ejected(now)
        )
        next_check = self.outlier.next_sweep if self.outlier is not None else _INF
        for h in paced_items(hosts):
            until = h.ejected_until
            if until is not None and now < until < next_check:
                next_check = until
        self._next_check = next_check

    def _maintain(self, now: float) -> None:
        # Non-blocking: if another thread is already rebuilding, use the current balancer.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if now < self._next_check:
                return
            if self.outlier is not None and now >= self.outlier.next_sweep:
                self.outlier.sweep(tuple(self.hosts.values()), now)
            self._rebuild(now)
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        return f"ClusterRuntime({self.name!r}, hosts={len(self.hosts)})"


class MeshRuntime:
    """The data plane's shared runtime for one xDS client (see the module docstring).

    ``rng`` is the randomness every policy decision of every call draws from (seeded in
    tests); ``active_faults`` counts injected faults in progress (``max_active_faults``; one
    counter for the process's fault filter, as Envoy keeps one per filter).
    """

    _by_client: weakref.WeakKeyDictionary[Any, MeshRuntime] = weakref.WeakKeyDictionary()
    _by_client_lock = threading.Lock()

    def __init__(
        self,
        client: XdsClient | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        local_locality: Locality | None = None,
    ) -> None:
        # Weak: for_client() keys a WeakKeyDictionary by the client, so a strong reference
        # from the value would keep every client (and its runtime) alive forever.
        self._client = weakref.ref(client) if client is not None else None
        self.rng = rng or random.Random()
        if clock is None:
            import time

            clock = time.monotonic
        self.clock = clock
        if local_locality is None and client is not None:
            local_locality = client.bootstrap.node.locality
        self.local_locality = local_locality
        self.active_faults = ActiveFaults()
        self._lock = threading.Lock()
        self._clusters: dict[str, ClusterRuntime] = {}
        self._targets: dict[str, frozenset[str]] = {}  # target -> cluster names in use
        self._host_refs: dict[str, int] = {}
        self._listeners: tuple[HostsRemovedListener, ...] = ()
        self._unreachable: frozenset[str] = frozenset()
        # target -> [handle, cancel subscription, references]
        self._handles: dict[str, list[Any]] = {}

    @property
    def client(self) -> XdsClient | None:
        """The xDS client this runtime follows (``None``: none, or it was collected)."""
        return self._client() if self._client is not None else None

    @classmethod
    def for_client(cls, client: XdsClient) -> MeshRuntime:
        """The runtime shared by every adapter of ``client`` (created on first use)."""
        with cls._by_client_lock:
            found = cls._by_client.get(client)
            if found is None:
                found = cls(client)
                cls._by_client[client] = found
            return found

    # -- targets -------------------------------------------------------------------------

    def watch(self, target: str) -> TargetHandle:
        """The shared :class:`TargetHandle` of ``target``, with this runtime following its
        snapshots. Reference-counted: pair every call with one :meth:`unwatch`."""
        from pymesh.xds.watch import watch_target

        client = self.client
        if client is None:
            raise RuntimeError("this MeshRuntime has no (live) xDS client")
        with self._lock:
            found = self._handles.get(target)
            if found is not None:
                found[2] += 1
                return found[0]  # type: ignore[no-any-return]
            handle = watch_target(client, target)
            self._handles[target] = [handle, _noop, 1]

        def on_state(state: TargetSnapshot | TargetError, t: str = target) -> None:
            self.on_target_state(t, state)

        cancel = handle.subscribe(on_state)
        with self._lock:
            entry = self._handles.get(target)
            if entry is not None and entry[0] is handle:
                entry[1] = cancel
            else:  # unwatched meanwhile
                cancel()
        return handle

    def unwatch(self, target: str) -> None:
        """Release one reference to ``target``; the last one stops following it and releases
        the clusters only it used."""
        with self._lock:
            entry = self._handles.get(target)
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] > 0:
                return
            del self._handles[target]
        entry[1]()
        entry[0].close()
        self._set_target_clusters(target, frozenset())

    def on_target_state(self, target: str, state: TargetSnapshot | TargetError) -> None:
        """A new snapshot (or error) of ``target``: update its clusters, release unused ones."""
        if isinstance(state, TargetError):
            if not state.ambient:
                self._set_target_clusters(target, frozenset())
            return
        now = self.clock()
        for entry in state.clusters.values():
            if isinstance(entry, ClusterConfig) and not entry.is_aggregate:
                self.cluster_for(entry, now)
        self._set_target_clusters(
            target,
            frozenset(
                name
                for name, entry in state.clusters.items()
                if isinstance(entry, ClusterConfig) and not entry.is_aggregate
            ),
        )

    # -- clusters ------------------------------------------------------------------------

    def cluster_for(self, config: ClusterConfig, now: float) -> ClusterRuntime:
        """The runtime of ``config``'s cluster, updated to ``config`` if it is newer."""
        rt = self._clusters.get(config.name)
        if rt is not None and rt.config is config:
            return rt
        with self._lock:
            rt = self._clusters.get(config.name)
            if rt is None:
                rt = ClusterRuntime(
                    config,
                    now=now,
                    rng=self.rng,
                    local_locality=self.local_locality,
                    unreachable=self._unreachable,
                )
                self._clusters[config.name] = rt
                self._ref_hosts(rt.hosts.keys())
                return rt
            before = set(rt.hosts)
            removed = rt.update(config, now)
            self._ref_hosts(rt.hosts.keys() - before)
            gone = self._unref_hosts(removed)
        self._notify(gone)
        return rt

    def leaf_for(
        self, snapshot: TargetSnapshot, entry: ClusterConfig, now: float
    ) -> ClusterRuntime | None:
        """The cluster runtime to send to: ``entry`` itself, or for an aggregate cluster the
        first leaf (in priority order) with a usable host (else the first leaf)."""
        cluster = entry.cluster
        if cluster.kind is not ClusterKind.AGGREGATE:
            rt = self._clusters.get(cluster.name)  # (entry.name is a property: one call less)
            if rt is not None and rt.config is entry:
                return rt
            return self.cluster_for(entry, now)
        first: ClusterRuntime | None = None
        for name in entry.leaf_clusters:
            leaf = snapshot.clusters.get(name)
            if not isinstance(leaf, ClusterConfig) or leaf.is_aggregate:
                continue
            rt = self.cluster_for(leaf, now)
            if rt.usable_hosts > 0:
                return rt
            first = first or rt
        return first

    def set_unreachable(self, keys: frozenset[str]) -> None:
        """Endpoints (``host:port``) an adapter cannot connect to now, e.g. a gRPC endpoint
        whose channel is in TRANSIENT_FAILURE: every cluster's balancer leaves them out
        (a cluster left with none answers no healthy upstream) until a later call drops
        them from ``keys``. Replaces the previous set."""
        with self._lock:  # (lock order: the runtime's, then a cluster's, as cluster_for)
            if keys == self._unreachable:
                return
            changed = keys ^ self._unreachable
            self._unreachable = keys
            now = self.clock()
            for rt in self._clusters.values():
                if changed.isdisjoint(rt.hosts):
                    rt._unreachable = keys  # nothing to rebuild; right for later EDS updates
                else:
                    rt.set_unreachable(keys, now)

    @property
    def unreachable(self) -> frozenset[str]:
        """The endpoints last reported unreachable (:meth:`set_unreachable`)."""
        return self._unreachable

    def clusters(self) -> Mapping[str, ClusterRuntime]:
        """The cluster runtimes alive now (a copy)."""
        return dict(self._clusters)

    # -- host removal notifications -----------------------------------------------------

    def add_hosts_removed_listener(self, listener: HostsRemovedListener) -> Callable[[], None]:
        """Call ``listener(keys)`` (on any thread; must not block) when endpoints leave every
        cluster, so adapters drain their connection pools. Returns ``remove()``."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

        def remove() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)

        return remove

    def close(self) -> None:
        """Stop following every target (whatever the references) and release every cluster."""
        with self._lock:
            entries = list(self._handles.items())
            self._handles.clear()
        for target, (handle, cancel, _) in entries:
            cancel()
            handle.close()
            self._set_target_clusters(target, frozenset())

    # -- internals -----------------------------------------------------------------------

    def _set_target_clusters(self, target: str, names: frozenset[str]) -> None:
        with self._lock:
            if names:
                self._targets[target] = names
            else:
                self._targets.pop(target, None)
            used: set[str] = set()
            for n in self._targets.values():
                used |= n
            gone: set[str] = set()
            for name in [n for n in self._clusters if n not in used]:
                rt = self._clusters.pop(name)
                gone |= self._unref_hosts(rt.hosts.keys())
        self._notify(gone)

    def _ref_hosts(self, keys: Iterable[str]) -> None:
        refs = self._host_refs
        for k in paced_items(keys):
            refs[k] = refs.get(k, 0) + 1

    def _unref_hosts(self, keys: Iterable[str]) -> set[str]:
        refs = self._host_refs
        gone: set[str] = set()
        for k in paced_items(keys):
            n = refs.get(k, 0) - 1
            if n <= 0:
                refs.pop(k, None)
                gone.add(k)
            else:
                refs[k] = n
        return gone

    def _notify(self, gone: Iterable[str]) -> None:
        keys = frozenset(gone)
        if not keys:
            return
        for listener in self._listeners:
            try:
                listener(keys)
            except Exception:  # a listener must not break config updates
                import logging

                logging.getLogger(__name__).exception("hosts-removed listener raised")
