"""EDS: one ``ClusterLoadAssignment`` per cluster, endpoints grouped by locality.

Subset clusters keep only the endpoints whose labels carry the subset's labels. Health comes
from the workload (auto-registered workloads may report DRAINING/UNHEALTHY). With a
DestinationRule that sets ``outlierDetection``, Istio's locality failover applies: endpoints
get priorities by proximity to the node (same region/zone/subzone 0, same region/zone 1,
same region 2, else 3; ``failover`` rules and ``failoverPriority`` labels refine it);
``distribute`` rules set locality weights.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from pymesh.controlplane.config import Endpoint, MeshConfig, ProxyNode, ServiceSpec, labels_match
from pymesh.controlplane.config._types import LocalityLb
from pymesh.controlplane.translate._clusters import cluster_policy
from pymesh.model.common import Locality

__all__ = ["build_load_assignment", "node_dependence"]

_HEALTH = {
    "HEALTHY": health_check_pb2.HEALTHY,
    "UNHEALTHY": health_check_pb2.UNHEALTHY,
    "DRAINING": health_check_pb2.DRAINING,
}


def _loc_matches(pattern: str, loc: Locality) -> bool:
    """Istio locality patterns: ``region/zone/subzone`` with ``*`` wildcards, prefix form."""
    parts = pattern.split("/")
    values = (loc.region, loc.zone, loc.sub_zone)
    for p, v in zip(parts, values, strict=False):
        if p == "*":
            return True
        if p != v:
            return False
    return True


def _priority(node: ProxyNode, e: Endpoint, lb: LocalityLb) -> int:
    n, loc = node.locality, e.locality
    if lb.failover_priority:
        # Each label in order must equal the node's; the first mismatch sets the priority.
        for i, key in enumerate(lb.failover_priority):
            key, _, value = key.partition("=")
            want = value or node.labels.get(key)
            if want is None or e.labels.get(key) != want:
                return i + 1
        return 0
    if n.region == loc.region:
        if n.zone == loc.zone:
            return 0 if n.sub_zone == loc.sub_zone else 1
        return 2
    for src, dst in lb.failover:
        if src == n.region and dst == loc.region:
            return 3
    return 4 if lb.failover else 3


def _distribute_weight(node: ProxyNode, loc: Locality, lb: LocalityLb) -> int | None:
    for src, targets in lb.distribute:
        if _loc_matches(src, node.locality):
            for dst, weight in targets:
                if _loc_matches(dst, loc):
                    return weight
            return 0
    return None


def node_dependence(
    config: MeshConfig, node: ProxyNode, svc: ServiceSpec, port: int, subset: str
) -> tuple[object, ...]:
    """What of ``node`` :func:`build_load_assignment` reads for this cluster: two nodes with
    equal keys get equal assignments (with the same config and endpoints). Always the
    namespace (destination rule lookup); proxyless-ness only when an endpoint is not an IP;
    locality and labels only under locality failover or distribute."""
    policy = cluster_policy(config, node, svc, port, subset)
    lb = policy.load_balancer.locality if policy.load_balancer is not None else None
    failover = (
        lb is not None and lb.enabled and policy.outlier_detection is not None and not lb.distribute
    ) or (lb is None and policy.outlier_detection is not None)
    distribute = lb is not None and lb.enabled and bool(lb.distribute)
    key: tuple[object, ...] = (node.namespace,)
    if not all(_is_ip(e.address) for e in config.endpoints(svc, port)):
        key += (node.proxyless,)
    if failover or distribute:
        key += (node.locality, tuple(sorted(node.labels.items())))
    return key


def build_load_assignment(  # noqa: PLR0917
    config: MeshConfig, node: ProxyNode, svc: ServiceSpec, port: int, subset: str, name: str
) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    endpoints: Sequence[Endpoint] = config.endpoints(svc, port)
    if subset:
        dr = config.destination_rule(svc.hostname, node.namespace)
        sub = dr.subset(subset) if dr is not None else None
        if sub is None:
            return cla
        endpoints = [e for e in endpoints if labels_match(sub.labels, e.labels)]
    policy = cluster_policy(config, node, svc, port, subset)
    lb = policy.load_balancer.locality if policy.load_balancer is not None else None
    failover = (
        lb is not None and lb.enabled and policy.outlier_detection is not None and not lb.distribute
    ) or (lb is None and policy.outlier_detection is not None)
    lb_setting = lb if lb is not None else LocalityLb()
    groups: dict[tuple[Locality, int], list[Endpoint]] = {}
    for e in endpoints:
        if node.proxyless and not _is_ip(e.address):
            continue  # gRPC clients need IP endpoints (DNS hosts are resolved by Envoy only)
        prio = _priority(node, e, lb_setting) if failover else 0
        groups.setdefault((e.locality, prio), []).append(e)
    for (loc, prio), members in sorted(groups.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
        le = cla.endpoints.add()
        le.locality.SetInParent()  # gRPC's xDS client rejects a missing locality (even empty)
        if loc.region or loc.zone or loc.sub_zone:
            le.locality.region, le.locality.zone, le.locality.sub_zone = (
                loc.region,
                loc.zone,
                loc.sub_zone,
            )
        le.priority = prio
        weight = sum(max(1, e.weight) for e in members)
        if lb is not None and lb.enabled and lb.distribute:
            dw = _distribute_weight(node, loc, lb)
            if dw is not None:
                weight = dw
        le.load_balancing_weight.value = weight  # 0 only from distribute: dropped below
        for e in sorted(members, key=lambda x: (x.address, x.port)):
            lbe = le.lb_endpoints.add()
            # Health, weight and metadata from a serialized template (few distinct ones).
            lbe.MergeFromString(_lb_template(e.health, max(1, e.weight), _istio_workload(e)))
            sa = lbe.endpoint.address.socket_address
            sa.address = e.address
            sa.port_value = e.port
    if lb is not None and lb.enabled and lb.distribute:
        # Localities whose distribute weight is 0 would make Envoy reject the assignment.
        kept = [le for le in cla.endpoints if le.load_balancing_weight.value > 0]
        del cla.endpoints[:]
        cla.endpoints.extend(kept)
    _normalize_priorities(cla)
    return cla


def _normalize_priorities(cla: endpoint_pb2.ClusterLoadAssignment) -> None:
    """Envoy and gRPC need priorities to be contiguous from 0."""
    used = sorted({le.priority for le in cla.endpoints})
    remap = {p: i for i, p in enumerate(used)}
    for le in cla.endpoints:
        le.priority = remap[le.priority]


@functools.lru_cache(maxsize=4096)
def _lb_template(health: str, weight: int, workload: str) -> bytes:
    """The serialized part of an ``LbEndpoint`` that is not its address: health status,
    load balancing weight and Istio's ``istio.workload`` metadata (when there is one)."""
    lbe = endpoint_components_pb2.LbEndpoint()
    lbe.health_status = _HEALTH.get(health, health_check_pb2.HEALTHY)
    lbe.load_balancing_weight.value = weight
    if workload:  # Istio's EDS metadata: what telemetry's destination_* labels read
        lbe.metadata.filter_metadata["istio"].fields["workload"].string_value = workload
    data: bytes = lbe.SerializeToString()
    return data


@functools.lru_cache(maxsize=65536)
def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return False


def _istio_workload(e: Endpoint) -> str:
    """Istio's ``istio.workload`` endpoint metadata, ``name;namespace;canonical-service;
    canonical-revision;cluster`` (the workload name is not known here: left empty), or
    ``""`` when the endpoint has no canonical service labels."""
    labels = e.labels
    canonical = labels.get("service.istio.io/canonical-name") or labels.get("app", "")
    revision = labels.get("service.istio.io/canonical-revision") or labels.get("version", "")
    if not canonical and not revision:
        return ""
    return f";{e.namespace};{canonical};{revision or 'latest'};"
