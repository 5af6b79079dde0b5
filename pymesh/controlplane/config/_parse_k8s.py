"""Plain Kubernetes kinds pymesh reads: ``v1 Service`` and ``apps/v1 Deployment``.

A Service becomes the service ``NAME.NS.svc.cluster.local`` whose endpoints are the workloads
(WorkloadEntries, auto-registered nodes) matching its selector. A Deployment is read as a
WorkloadGroup: its pod template's labels and service account are what a workload of it that
connects to the control plane is registered with.
"""

from __future__ import annotations

import ipaddress
import types

from pymesh.controlplane.config._parse_networking import fqdn
from pymesh.controlplane.config._reader import Reader
from pymesh.controlplane.config._types import (
    Resolution,
    ServicePort,
    ServiceSpec,
    WorkloadGroupSpec,
)

__all__ = ["parse_deployment", "parse_k8s_service", "protocol_from_port"]

_PREFIXES = {
    "http": "HTTP",
    "http2": "HTTP2",
    "https": "HTTPS",
    "grpc": "GRPC",
    "grpc-web": "GRPC-WEB",
    "h2c": "HTTP2",
    "tcp": "TCP",
    "tls": "TLS",
    "mongo": "MONGO",
    "udp": "UDP",
}


def protocol_from_port(name: str, app_protocol: str = "") -> str:
    """Istio's protocol selection: ``appProtocol``, else the port name's prefix
    (``grpc-foo`` is GRPC), else HTTP (Istio sniffs; pymesh treats unnamed ports as HTTP)."""
    for candidate in (app_protocol.lower(), name.lower(), name.lower().split("-", 1)[0]):
        if candidate in _PREFIXES:
            return _PREFIXES[candidate]
    return "HTTP"


def parse_k8s_service(spec: Reader, name: str, namespace: str) -> ServiceSpec | None:
    spec_type = spec.str("type", "ClusterIP")
    if spec_type == "ExternalName":
        spec.warn("type", "ExternalName services are ignored")
        return None
    ports: list[ServicePort] = []
    for i, p in enumerate(spec.items("ports")):
        number = p.port("port", required=True)
        pname = p.str("name") or (f"port-{number}" if number else f"port{i}")
        protocol = p.str("protocol", "TCP").upper()
        if protocol == "UDP":
            continue
        target = p.data.get("targetPort")
        target_port: int | None = None
        target_name = ""
        if isinstance(target, int) and not isinstance(target, bool):
            target_port = p.port("targetPort")
        elif isinstance(target, str):
            if target.isdigit():
                target_port = p.port("targetPort")
            else:
                target_name = target
        elif target is not None:
            p.error("targetPort", "expected a port number or name")
        if number is None:
            continue
        ports.append(
            ServicePort(
                number,
                pname,
                protocol_from_port(pname, p.str("appProtocol")),
                target_port,
                target_name,
            )
        )
    if not ports:
        spec.error("ports", "at least one port is required")
    addresses: tuple[str, ...] = ()
    cluster_ip = spec.str("clusterIP")
    if cluster_ip and cluster_ip != "None":
        try:
            ipaddress.ip_address(cluster_ip)
            addresses = (cluster_ip,)
        except ValueError:
            spec.error("clusterIP", f"invalid IP {cluster_ip!r}")
    return ServiceSpec(
        hostname=fqdn(name, namespace),
        namespace=namespace,
        ports=tuple(ports),
        addresses=addresses,
        resolution=Resolution.STATIC,
        endpoints=(),
        selector=spec.str_map("selector"),
        source=f"Service {namespace}/{name}",
    )


def parse_deployment(spec: Reader, name: str, namespace: str) -> WorkloadGroupSpec:
    template = spec.sub_or_empty("template")
    meta = template.sub_or_empty("metadata")
    pod = template.sub_or_empty("spec")
    ports: dict[str, int] = {}
    for c in pod.items("containers"):
        for p in c.items("ports"):
            number = p.port("containerPort")
            if number is not None:
                ports[p.str("name") or str(number)] = number
    return WorkloadGroupSpec(
        name=name,
        namespace=namespace,
        labels=meta.str_map("labels"),
        ports=types.MappingProxyType(ports),
        service_account=pod.str("serviceAccountName") or pod.str("serviceAccount") or "default",
    )
