"""``ProxyNode``: who is asking, from an xDS ``core.v3.Node`` and Istio's metadata conventions.

Istio's agent (and pymesh's bootstrap) put the workload's facts in ``node.metadata``:
``GENERATOR`` (``grpc`` for proxyless clients), ``NAMESPACE``, ``LABELS`` (a struct),
``SERVICE_ACCOUNT``, ``INSTANCE_IPS`` (comma separated), ``WORKLOAD_NAME``. The node id has the
form ``sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local``; it fills in what metadata lacks.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pymesh.model.common import Locality

__all__ = ["ProxyNode"]


def _empty() -> Mapping[str, Any]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ProxyNode:
    """A connected xDS client as the generator sees it."""

    id: str
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=_empty)
    service_account: str = ""
    ips: tuple[str, ...] = ()
    generator: str = ""  # "grpc" => proxyless gRPC; anything else => Envoy-like
    locality: Locality = field(default_factory=Locality)
    metadata: Mapping[str, Any] = field(default_factory=_empty)

    @property
    def proxyless(self) -> bool:
        return self.generator == "grpc"

    @property
    def class_key(self) -> tuple[object, ...]:
        """What outbound resources (CDS, EDS, RDS, outbound LDS) depend on besides the
        requested names: nodes with the same key get the same resources."""
        return (
            self.generator == "grpc",
            self.namespace,
            tuple(sorted(self.labels.items())),
            str(self.locality),
        )

    @property
    def inbound_key(self) -> tuple[object, ...]:
        """What inbound listeners additionally depend on."""
        return (*self.class_key, self.ips, self.service_account)

    @classmethod
    def from_node_proto(cls, node: Any) -> ProxyNode:
        """Build from an ``envoy.config.core.v3.Node`` (Istio metadata conventions)."""
        from google.protobuf import json_format

        meta: dict[str, Any] = {}
        if node.HasField("metadata"):
            meta = json_format.MessageToDict(node.metadata)
        node_id = str(node.id)
        parts = node_id.split("~")
        namespace = str(meta.get("NAMESPACE") or "")
        if not namespace and len(parts) == 4:
            pod = parts[2].split(".")
            namespace = pod[1] if len(pod) > 1 else parts[3].split(".")[0]
        labels_raw = meta.get("LABELS") or {}
        labels: dict[str, str] = {}
        if isinstance(labels_raw, dict):
            labels = {str(k): str(v) for k, v in labels_raw.items()}
        elif isinstance(labels_raw, str):
            for item in labels_raw.split(","):
                k, sep, v = item.partition("=")
                if sep:
                    labels[k.strip()] = v.strip()
        ips_raw = meta.get("INSTANCE_IPS") or ""
        ips: tuple[str, ...]
        if isinstance(ips_raw, list):
            ips = tuple(str(i) for i in ips_raw if i)
        else:
            ips = tuple(i.strip() for i in str(ips_raw).split(",") if i.strip())
        if not ips and len(parts) == 4 and parts[1]:
            ips = (parts[1],)
        loc = Locality()
        if node.HasField("locality"):
            loc = Locality(node.locality.region, node.locality.zone, node.locality.sub_zone)
        return cls(
            id=node_id,
            namespace=namespace or "default",
            labels=types.MappingProxyType(labels),
            service_account=str(meta.get("SERVICE_ACCOUNT") or ""),
            ips=ips,
            generator=str(meta.get("GENERATOR") or ""),
            locality=loc,
            metadata=types.MappingProxyType(meta),
        )
