"""``Generator``: per-MeshConfig xDS generation for one node and one type, with a cache.

What a node sees depends on its class (proxyless or Envoy-like, namespace, labels, locality,
IPs, service account: ``ProxyNode.class_key``); output is cached per class, type and requested
names. Returned messages are shared between callers: treat them as read-only.

Names, as istiod serves proxyless clients:
- LDS ``HOST:PORT`` api_listeners (wildcard: every visible service port, FQDN names; Envoy-like
  nodes get no outbound api_listeners, which Envoy cannot take over LDS), and
  ``xds.istio.io/grpc/lds/inbound/IP:PORT`` (by name only).
- RDS ``outbound|PORT||HOST``.
- CDS ``outbound|PORT|SUBSET|HOST`` (wildcard: every cluster visible to the node).
- EDS the cluster names.
Unknown names are simply absent from the result (the server tells the client they do not
exist, as istiod does).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Collection

from google.protobuf.message import Message

from pymesh.controlplane.config import Endpoint, MeshConfig, ProxyNode
from pymesh.controlplane.config._types import Resolution
from pymesh.controlplane.translate._clusters import build_clusters_for_service
from pymesh.controlplane.translate._endpoints import build_load_assignment, node_dependence
from pymesh.controlplane.translate._listeners import (
    build_inbound_listener,
    build_outbound_listener,
    resolve_listener_name,
)
from pymesh.controlplane.translate._names import INBOUND_PREFIX, cluster_name, parse_cluster_name
from pymesh.controlplane.translate._routes import build_route_config
from pymesh.xds.resource_types import ResourceType

__all__ = ["Generator"]

_CACHE_SIZE = 4096
_EDS_MEMO_SIZE = 100_000
_DNS = (Resolution.DNS, Resolution.DNS_ROUND_ROBIN)
_SERIALS = itertools.count(1)


class Generator:
    """Generates xDS resources (protos) from one immutable :class:`MeshConfig`."""

    def __init__(self, config: MeshConfig, previous: Generator | None = None) -> None:
        """``previous``: the generator of the config version before ``config``; what it
        generated that cannot differ under ``config`` is reused (see :meth:`_carry`)."""
        self.config = config
        self._cache: OrderedDict[tuple[object, ...], dict[str, Message]] = OrderedDict()
        # EDS per (cluster name, what of the node it depends on): the endpoints it was built
        # from and the result (shared by node classes that cannot see a difference).
        self._eds: dict[tuple[object, ...], tuple[tuple[Endpoint, ...], Message]] = {}
        self._lock = threading.Lock()
        self.serial = next(_SERIALS)
        """Unique per generator: what :attr:`previous_serial` refers to."""
        self.previous_serial: int | None = None
        """The :attr:`serial` of the generator :meth:`changed_hosts` compares with."""
        self._changed: dict[str, frozenset[str]] = {}
        if previous is not None:
            self.previous_serial = previous.serial
            self._carry(previous)

    def changed_hosts(self, type_url: str) -> frozenset[str] | None:
        """What may differ from the previous generator's output for ``type_url``, for any
        node and any names: ``None`` (anything), or the hostnames whose resources may have
        changed (every resource whose name refers to another host is the same: a client
        holding only those needs no push). Always empty or ``None`` for LDS, RDS and CDS;
        EDS resources are named by cluster (``outbound|PORT|SUBSET|HOST``)."""
        return self._changed.get(type_url)

    def _carry(self, previous: Generator) -> None:
        """Reuse ``previous``'s output where this config cannot change it.

        When only endpoints differ (``MeshConfig.same_shape``), listeners and routes are the
        same (they read no endpoints); clusters too when their endpoint-derived inputs are
        (``same_cluster_inputs``); a load assignment when the endpoints it was built from are
        equal (checked per assignment when it is asked for).
        """
        changes = self.config.endpoint_changes(previous.config)
        if changes is None:
            return
        carried = {ResourceType.LISTENER.type_url, ResourceType.ROUTE_CONFIGURATION.type_url}
        if self.config.same_cluster_inputs(previous.config):
            carried.add(ResourceType.CLUSTER.type_url)
        # Load assignments read the endpoints of their host (and what ``same_shape`` holds
        # equal: ports, subsets, the node), nothing else.
        self._changed = dict.fromkeys(carried, frozenset())
        self._changed[ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url] = changes
        with previous._lock:
            entries = [(k, v) for k, v in previous._cache.items() if k[1] in carried]
            self._eds = dict(previous._eds)
        for key, value in entries:
            self._cache[key] = value

    def generate(
        self, node: ProxyNode, type_url: str, names: Collection[str] | None
    ) -> dict[str, Message]:
        """Resources of ``type_url`` for ``node``: the requested ``names`` that exist, or every
        visible resource when ``names`` is ``None`` (wildcard)."""
        rtype = ResourceType.from_type_url(type_url)
        if rtype is None:
            return {}
        wanted = None if names is None else frozenset(names)
        inbound = wanted is not None and any(n.startswith(INBOUND_PREFIX) for n in wanted)
        key = (node.inbound_key if inbound else node.class_key, type_url, wanted)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return dict(hit)
        out = self._build(node, rtype, None if names is None else set(names))
        with self._lock:
            self._cache[key] = out
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return dict(out)

    def _build(
        self, node: ProxyNode, rtype: ResourceType, names: set[str] | None
    ) -> dict[str, Message]:
        if rtype is ResourceType.LISTENER:
            return self._listeners(node, names)
        if rtype is ResourceType.ROUTE_CONFIGURATION:
            return self._routes(node, names)
        if rtype is ResourceType.CLUSTER:
            return self._clusters(node, names)
        return self._endpoints(node, names)

    def _listeners(self, node: ProxyNode, names: set[str] | None) -> dict[str, Message]:
        out: dict[str, Message] = {}
        if names is None:
            if not node.proxyless:
                return out
            for svc in self.config.visible_services(node.namespace):
                for p in svc.ports:
                    name = f"{svc.hostname}:{p.number}"
                    out[name] = build_outbound_listener(svc, p.number, name)
            return out
        for name in sorted(names):
            if name.startswith(INBOUND_PREFIX):
                inbound = build_inbound_listener(self.config, node, name)
                if inbound is not None:
                    out[name] = inbound
                continue
            found = resolve_listener_name(self.config, node, name)
            if found is None:
                continue
            svc, ports = found
            # A name without a port means the service's first port (gRPC's default target).
            out[name] = build_outbound_listener(svc, ports[0], name)
        return out

    def _routes(self, node: ProxyNode, names: set[str] | None) -> dict[str, Message]:
        out: dict[str, Message] = {}
        visible = self.config.visible_by_host(node.namespace)
        if names is None:
            for svc in visible.values():
                for p in svc.ports:
                    rc = build_route_config(self.config, node, svc, p.number)
                    out[rc.name] = rc
            return out
        for name in names:
            parsed = parse_cluster_name(name)
            if parsed is None or parsed[1]:
                continue
            port, _, host = parsed
            found = visible.get(host)
            if found is None or found.port(port) is None:
                continue
            out[name] = build_route_config(self.config, node, found, port)
        return out

    def _clusters(self, node: ProxyNode, names: set[str] | None) -> dict[str, Message]:
        out: dict[str, Message] = {}
        visible = self.config.visible_by_host(node.namespace)
        if names is None:
            for svc in visible.values():
                for c in build_clusters_for_service(self.config, node, svc, None):
                    out[c.name] = c
            return out
        hosts: dict[str, set[str]] = {}
        for name in names:
            parsed = parse_cluster_name(name)
            if parsed is not None:
                hosts.setdefault(parsed[2], set()).add(name)
        for host, wanted in hosts.items():
            target = visible.get(host)
            if target is None:
                continue
            for c in build_clusters_for_service(self.config, node, target, wanted):
                out[c.name] = c
        return out

    def _endpoints(self, node: ProxyNode, names: set[str] | None) -> dict[str, Message]:
        out: dict[str, Message] = {}
        visible = self.config.visible_by_host(node.namespace)
        if names is None:
            names = set()
            for svc in visible.values():
                dr = self.config.destination_rule(svc.hostname, node.namespace)
                subsets = [""] + ([s.name for s in dr.subsets] if dr is not None else [])
                for p in svc.ports:
                    names.update(cluster_name(p.number, s, svc.hostname) for s in subsets)
        for name in names:
            parsed = parse_cluster_name(name)
            if parsed is None:
                continue
            port, subset, host = parsed
            found = visible.get(host)
            if found is None or found.port(port) is None:
                continue
            if not node.proxyless and found.resolution in _DNS:
                continue  # Envoy resolves DNS clusters itself (STRICT_DNS / LOGICAL_DNS)
            if subset:
                dr = self.config.destination_rule(host, node.namespace)
                if dr is None or dr.subset(subset) is None:
                    continue
            endpoints = self.config.endpoints(found, port)
            memo_key = (name, node_dependence(self.config, node, found, port, subset))
            with self._lock:
                memo = self._eds.get(memo_key)
            if memo is not None and memo[0] == endpoints:
                out[name] = memo[1]
                continue
            cla = build_load_assignment(self.config, node, found, port, subset, name)
            with self._lock:
                self._eds[memo_key] = (endpoints, cla)
                if len(self._eds) > _EDS_MEMO_SIZE:
                    self._eds.pop(next(iter(self._eds)))
            out[name] = cla
        return out
