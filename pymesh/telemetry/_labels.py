"""Istio's standard metric labels, derived as Istio's stats filter derives them (pure code).

The *local* side of a request (``source_*`` for ``reporter="source"``, ``destination_*`` for
``reporter="destination"``) comes from the bootstrap node metadata, as Istio's stats plugin
reads the proxy's own node metadata: ``WORKLOAD_NAME``, ``NAMESPACE``, ``LABELS`` (``app``,
``version``, ``service.istio.io/canonical-name`` / ``-revision``), ``CLUSTER_ID``. The *peer*
side comes from what the data plane knows about it:

- client side: the upstream cluster name ``outbound|PORT|SUBSET|HOST`` gives
  ``destination_service`` (HOST) and its name / namespace (``NAME.NAMESPACE.svc.DOMAIN``);
  the picked endpoint's ``istio`` filter metadata (``workload: "name;ns;canonical;rev;
  cluster"``, Istio's EDS format, or plain ``app`` / ``version`` labels) gives
  ``destination_workload`` and friends;
- server side: the peer certificate's SPIFFE URI gives ``source_principal``.

Anything not known is ``unknown``, as Istio writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LABEL_NAMES", "UNKNOWN", "PeerWorkload", "Workload", "service_of_cluster"]

UNKNOWN = "unknown"

LABEL_NAMES: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
"""Istio's standard labels, in the order Istio's Envoy writes them."""

_CANONICAL_NAME = "service.istio.io/canonical-name"
_CANONICAL_REVISION = "service.istio.io/canonical-revision"


@dataclass(frozen=True, slots=True)
class Workload:
    """One side's workload labels: ``(workload, canonical_service, canonical_revision,
    namespace, app, version, cluster)``, each ``unknown`` when not known."""

    workload: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    cluster: str = UNKNOWN

    @classmethod
    def from_node(
        cls,
        *,
        workload: str,
        namespace: str,
        labels: Mapping[str, str],
        cluster_id: str,
    ) -> Workload:
        """The local workload from bootstrap node metadata, as Istio's stats plugin does."""
        app = labels.get("app") or labels.get("app.kubernetes.io/name") or ""
        version = labels.get("version") or labels.get("app.kubernetes.io/version") or ""
        canonical = labels.get(_CANONICAL_NAME) or app or workload
        revision = labels.get(_CANONICAL_REVISION) or version or "latest"
        return cls(
            workload=workload or UNKNOWN,
            canonical_service=canonical or UNKNOWN,
            canonical_revision=revision,
            namespace=namespace or UNKNOWN,
            app=app or UNKNOWN,
            version=version or UNKNOWN,
            cluster=cluster_id or UNKNOWN,
        )

    def values(self) -> tuple[str, str, str, str, str, str, str]:
        return (
            self.workload,
            self.canonical_service,
            self.canonical_revision,
            self.namespace,
            self.app,
            self.version,
            self.cluster,
        )


class PeerWorkload:
    """Endpoint metadata -> the destination :class:`Workload` (memoized by identity)."""

    @staticmethod
    def from_metadata(metadata: object) -> Workload:
        if not isinstance(metadata, Mapping):
            return Workload()
        istio = metadata.get("istio")
        if not isinstance(istio, Mapping):
            return Workload()
        return _from_istio(istio)


def _from_istio(istio: Mapping[str, Any]) -> Workload:
    workload = istio.get("workload")
    if isinstance(workload, str) and workload:
        # Istio's EDS format: "name;namespace;canonical-service;canonical-revision;cluster".
        parts = [*workload.split(";"), "", "", "", "", ""][:5]
        name, ns, canonical, revision, cluster = parts
        return Workload(
            workload=name or UNKNOWN,
            canonical_service=canonical or UNKNOWN,
            canonical_revision=revision or UNKNOWN,
            namespace=ns or UNKNOWN,
            app=canonical or UNKNOWN,
            version=revision or UNKNOWN,
            cluster=cluster or UNKNOWN,
        )
    labels = {k: v for k, v in istio.items() if isinstance(v, str)}
    if not labels:
        return Workload()
    return Workload.from_node(
        workload=labels.get("workload", ""),
        namespace=labels.get("namespace", ""),
        labels=labels,
        cluster_id=labels.get("cluster", ""),
    )


def service_of_cluster(cluster: str | None) -> tuple[str, str, str]:
    """``(destination_service, destination_service_name, destination_service_namespace)``
    from an Istio cluster name ``outbound|PORT|SUBSET|HOST`` (or ``inbound|PORT||HOST``).

    The name and namespace come from a Kubernetes host ``NAME.NAMESPACE.svc.DOMAIN``; for
    other hosts (ServiceEntry) the name is the host and the namespace ``unknown``.
    """
    if not cluster:
        return UNKNOWN, UNKNOWN, UNKNOWN
    parts = cluster.split("|")
    host = parts[3] if len(parts) == 4 and parts[3] else cluster
    return (host, *service_name_namespace(host))


def service_name_namespace(host: str) -> tuple[str, str]:
    """``(name, namespace)`` of a service host (``NAME.NS.svc.DOMAIN``), else ``(host,
    unknown)``."""
    labels = host.split(".")
    if len(labels) >= 3 and labels[2] == "svc":
        return labels[0], labels[1]
    return (host or UNKNOWN), UNKNOWN


def principal_of(uri_sans: Iterable[str]) -> str:
    """The SPIFFE identity among a certificate's URI SANs (``unknown`` when none)."""
    for uri in uri_sans:
        if uri.startswith("spiffe://"):
            return uri
    return UNKNOWN
