"""Workload auto-registration, as istiod does it for WorkloadGroups (no I/O, injected time).

Theory of operation
-------------------
A workload that connects to the control plane with Istio's node metadata becomes a
WorkloadEntry of a WorkloadGroup while it is connected, so the services whose selectors match
it get it as an endpoint. Which group:

1. metadata ``AUTO_REGISTER_GROUP`` names the group in the node's namespace (what Istio's
   agent sends, from ``ISTIO_META_AUTO_REGISTER_GROUP``);
2. else the first group (by name) of the node's namespace whose template labels are all
   present in the node's ``LABELS``.

The entry is the group's template with the node's address (first of ``INSTANCE_IPS``), its
labels merged over the template's, its locality, its service account (the identity its
certificate carries; the template's when the node has none), and its ports: the template's
ports, or the node's own when metadata carries Istio's ``POD_PORTS`` (a JSON list of
``{"name": "http", "containerPort": 9080}``, what ``pymesh bootstrap --port`` writes) or
``PYMESH_PORTS`` (``{"http": 9080}`` or ``"http:9080,..."``). The entry name is
``GROUP-ADDRESS``, as istiod names auto-registered entries, plus ``-PORT...`` when the node
declares its own ports (so workloads sharing 127.0.0.1 on one machine stay distinct).

Lifecycle per entry (keyed by namespace and name):

=============  ============================  ============================================
state          event                         result
=============  ============================  ============================================
(none)         ``connect``                   CONNECTED (one or more streams)
CONNECTED      ``connect`` (another stream)  CONNECTED, one more stream
CONNECTED      ``disconnect`` (last stream)  DISCONNECTED since now
DISCONNECTED   ``connect``                   CONNECTED again (no endpoint churn)
DISCONNECTED   ``expire(now)`` past grace    removed
=============  ============================  ============================================

Health: an entry is ``HEALTHY`` unless its workload reported otherwise. A workload reports
through Istio's in-band health check (a ``DiscoveryRequest`` of type
``type.googleapis.com/istio.v1.HealthInformation`` on its ADS stream: no ``error_detail`` =
healthy, ``error_detail`` = unhealthy), through the admin call
``POST /debug/health?proxy=NODE_ID&status=HEALTHY|UNHEALTHY|DRAINING``, or initially through
metadata ``PYMESH_HEALTH``.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from pymesh.model.common import Locality

__all__ = [
    "HEALTH_STATES",
    "GroupTemplate",
    "NodeInfo",
    "RegisteredWorkload",
    "WorkloadRegistry",
    "ports_from_metadata",
]

HEALTH_STATES = ("HEALTHY", "UNHEALTHY", "DRAINING")
_EMPTY: Mapping[str, str] = types.MappingProxyType({})
_EMPTY_PORTS: Mapping[str, int] = types.MappingProxyType({})
_NO_LOCALITY = Locality()


@dataclass(frozen=True, slots=True)
class GroupTemplate:
    """The parts of a WorkloadGroup registration needs."""

    namespace: str
    name: str
    # the template's (spec.metadata) labels
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    ports: Mapping[str, int] = field(default_factory=lambda: _EMPTY_PORTS)
    service_account: str = ""
    network: str = ""
    locality: str = ""
    weight: int = 0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """The parts of a connecting node registration needs (from its metadata)."""

    id: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    service_account: str = ""
    ips: tuple[str, ...] = ()
    locality: Locality = _NO_LOCALITY
    group: str = ""  # AUTO_REGISTER_GROUP
    ports: Mapping[str, int] = field(default_factory=lambda: _EMPTY_PORTS)
    health: str = "HEALTHY"
    network: str = ""


@dataclass(frozen=True, slots=True)
class RegisteredWorkload:
    """One auto-registered WorkloadEntry."""

    namespace: str
    name: str
    group: str
    address: str
    labels: Mapping[str, str]
    ports: Mapping[str, int]
    service_account: str
    locality: str
    network: str
    weight: int
    node_id: str
    health: str = "HEALTHY"
    connections: frozenset[str] = frozenset()
    disconnected_at: float | None = None

    @property
    def connected(self) -> bool:
        return bool(self.connections)


def _pod_ports(raw: object) -> dict[str, object]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    out: dict[str, object] = {}
    if isinstance(raw, list | tuple):
        for item in raw:
            if isinstance(item, Mapping) and "containerPort" in item:
                port = item["containerPort"]
                out[str(item.get("name") or f"port{port}")] = port
    return out


def ports_from_metadata(metadata: Mapping[str, object]) -> Mapping[str, int]:
    """Ports a node declares: Istio's ``POD_PORTS``, else ``PYMESH_PORTS`` (mapping, JSON
    object or ``name:port,...``).

    Unparseable values are ignored (the template's ports apply).
    """
    if "POD_PORTS" in metadata:
        pod = _pod_ports(metadata["POD_PORTS"])
        if pod:
            metadata = {"PYMESH_PORTS": pod}
    for key in ("PYMESH_PORTS",):
        raw = metadata.get(key)
        if raw is None:
            continue
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("{"):
                try:
                    raw = json.loads(text)
                except ValueError:
                    continue
            else:
                parsed: dict[str, object] = {}
                for i, item in enumerate(p for p in text.split(",") if p.strip()):
                    name, sep, port = item.strip().rpartition(":")
                    parsed[name if sep else f"port{i}"] = port
                raw = parsed
        if isinstance(raw, Mapping):
            out: dict[str, int] = {}
            for name, port in raw.items():
                try:
                    number = int(str(port))
                except ValueError:
                    continue
                if 0 < number < 65536:
                    out[str(name)] = number
            if out:
                return types.MappingProxyType(out)
    return _EMPTY_PORTS


@dataclass(slots=True)
class WorkloadRegistry:
    """Auto-registered workloads; ``grace`` seconds before a disconnected one is removed."""

    grace: float = 10.0
    _entries: dict[tuple[str, str], RegisteredWorkload] = field(default_factory=dict)
    _by_conn: dict[str, tuple[str, str]] = field(default_factory=dict)

    def entries(self) -> tuple[RegisteredWorkload, ...]:
        return tuple(self._entries[k] for k in sorted(self._entries))

    @staticmethod
    def match_group(node: NodeInfo, groups: Iterable[GroupTemplate]) -> GroupTemplate | None:
        candidates = sorted(
            (g for g in groups if g.namespace == node.namespace), key=lambda g: g.name
        )
        if node.group:
            return next((g for g in candidates if g.name == node.group), None)
        for g in candidates:
            if not g.labels:
                continue
            if any(node.labels.get(k) != v for k, v in g.labels.items()):
                continue
            return g
        return None

    def connect(
        self, conn_id: str, node: NodeInfo, groups: Iterable[GroupTemplate], now: float
    ) -> RegisteredWorkload | None:
        """Register ``node`` for stream ``conn_id``; ``None`` when it matches no group."""
        del now
        if not node.ips:
            return None
        group = self.match_group(node, groups)
        if group is None:
            return None
        address = node.ips[0]
        name = f"{group.name}-{address}".replace(":", "-")
        if node.ports:
            # Several workloads share one IP on a single machine (the embedded mesh's usual
            # case): the ports they declare tell them apart.
            name += "-" + "-".join(str(p) for p in sorted(set(node.ports.values())))
        if node.network:
            name = f"{name}-{node.network}"
        key = (node.namespace, name)
        old = self._entries.get(key)
        labels = dict(group.labels)
        labels.update(node.labels)
        locality = str(node.locality) or group.locality
        entry = RegisteredWorkload(
            namespace=node.namespace,
            name=name,
            group=group.name,
            address=address,
            labels=types.MappingProxyType(labels),
            ports=types.MappingProxyType(dict(node.ports or group.ports)),
            service_account=node.service_account or group.service_account or "default",
            locality=locality,
            network=node.network or group.network,
            weight=group.weight,
            node_id=node.id,
            health=old.health if old is not None and old.connected else node.health,
            connections=(old.connections if old is not None else frozenset()) | {conn_id},
            disconnected_at=None,
        )
        self._entries[key] = entry
        self._by_conn[conn_id] = key
        return entry

    def disconnect(self, conn_id: str, now: float) -> bool:
        """Stream ``conn_id`` ended; the entry stays for ``grace`` seconds. Returns changed."""
        key = self._by_conn.pop(conn_id, None)
        if key is None or key not in self._entries:
            return False
        entry = self._entries[key]
        left = entry.connections - {conn_id}
        self._entries[key] = replace(entry, connections=left, disconnected_at=None if left else now)
        if not left and self.grace <= 0:
            del self._entries[key]
            return True
        return False

    def set_health(self, node_id: str, health: str) -> bool:
        """Set the health of the entries of ``node_id``; returns whether anything changed."""
        if health not in HEALTH_STATES:
            raise ValueError(f"health must be one of {', '.join(HEALTH_STATES)}")
        changed = False
        for key, entry in list(self._entries.items()):
            if entry.node_id == node_id and entry.health != health:
                self._entries[key] = replace(entry, health=health)
                changed = True
        return changed

    def set_health_for_conn(self, conn_id: str, health: str) -> bool:
        key = self._by_conn.get(conn_id)
        if key is None or key not in self._entries:
            return False
        entry = self._entries[key]
        if entry.health == health:
            return False
        self._entries[key] = replace(entry, health=health)
        return True

    def next_expiry(self) -> float | None:
        times = [
            e.disconnected_at + self.grace
            for e in self._entries.values()
            if e.disconnected_at is not None
        ]
        return min(times) if times else None

    def expire(self, now: float) -> bool:
        """Drop entries disconnected for ``grace`` seconds; returns whether any went."""
        gone = [
            k
            for k, e in self._entries.items()
            if e.disconnected_at is not None and now >= e.disconnected_at + self.grace
        ]
        for k in gone:
            del self._entries[k]
        return bool(gone)
