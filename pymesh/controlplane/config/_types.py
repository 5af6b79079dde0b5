"""Frozen, proto-free models of the Istio kinds pymesh reads.

These are the *validated* forms: host names are fully qualified, durations are float seconds,
percentages are floats in [0, 100]. The parsers in ``_parse_*`` build them from YAML; the
translator in :mod:`pymesh.controlplane.translate` turns them into xDS.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from pymesh.model.common import Locality
from pymesh.model.matcher import StringMatcher

__all__ = [
    "PATH_NORMALIZATIONS",
    "AuthorizationPolicySpec",
    "AuthzCondition",
    "AuthzOperation",
    "AuthzRule",
    "AuthzSource",
    "ConnectionPool",
    "ConsistentHash",
    "Destination",
    "DestinationRuleSpec",
    "DirectResponse",
    "Fault",
    "HTTPMatch",
    "HTTPRedirect",
    "HTTPRetry",
    "HTTPRewrite",
    "HTTPRoute",
    "HeaderOps",
    "LoadBalancer",
    "LocalityLb",
    "MeshSettings",
    "Mirror",
    "OutlierDetection",
    "PeerAuthenticationSpec",
    "PortLevelPolicy",
    "Resolution",
    "RouteDestination",
    "ServicePort",
    "ServiceSpec",
    "StaticEndpoint",
    "Subset",
    "TLSSettings",
    "TrafficPolicy",
    "VirtualServiceSpec",
    "WorkloadEntrySpec",
    "WorkloadGroupSpec",
]

EMPTY: Mapping[str, str] = types.MappingProxyType({})


def _empty() -> Mapping[str, str]:
    return EMPTY


def _empty_ports() -> Mapping[str, int]:
    return types.MappingProxyType({})


DOMAIN_SUFFIX = "cluster.local"
ROOT_NAMESPACE = "istio-system"


class Resolution(enum.Enum):
    STATIC = "STATIC"
    DNS = "DNS"
    DNS_ROUND_ROBIN = "DNS_ROUND_ROBIN"
    NONE = "NONE"


# --- services and workloads --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    """A service port. ``protocol`` is Istio's (HTTP, HTTP2, GRPC, TCP, ...), upper case.
    ``target_port`` is the endpoint port when a workload does not name one (``None``: same as
    ``number``); ``target_port_name`` a named Kubernetes targetPort."""

    number: int
    name: str
    protocol: str = "HTTP"
    target_port: int | None = None
    target_port_name: str = ""


@dataclass(frozen=True, slots=True)
class StaticEndpoint:
    """An inline ServiceEntry endpoint (``ports`` maps port *name* to endpoint port)."""

    address: str
    ports: Mapping[str, int] = field(default_factory=_empty_ports)
    labels: Mapping[str, str] = field(default_factory=_empty)
    locality: Locality = field(default_factory=Locality)
    weight: int = 1
    network: str = ""
    service_account: str = ""


@dataclass(frozen=True, slots=True)
class WorkloadEntrySpec:
    """One workload (a WorkloadEntry, or a workload auto-registered from a connected node).

    ``health`` is ``HEALTHY``, ``UNHEALTHY`` or ``DRAINING`` (auto-registered workloads may
    report themselves draining or unhealthy).
    """

    name: str
    namespace: str
    address: str
    ports: Mapping[str, int] = field(default_factory=_empty_ports)
    labels: Mapping[str, str] = field(default_factory=_empty)
    locality: Locality = field(default_factory=Locality)
    weight: int = 1
    network: str = ""
    service_account: str = "default"
    health: str = "HEALTHY"
    auto_registered: bool = False
    group: str = ""  # the WorkloadGroup an auto-registered workload came from


@dataclass(frozen=True, slots=True)
class WorkloadGroupSpec:
    """A WorkloadGroup (or a Kubernetes Deployment, read as one): the template auto-registered
    workloads get. ``labels`` are the merged metadata labels + template labels."""

    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=_empty)
    ports: Mapping[str, int] = field(default_factory=_empty_ports)
    service_account: str = "default"
    network: str = ""
    locality: Locality = field(default_factory=Locality)
    weight: int = 1

    @property
    def template(self) -> WorkloadGroupSpec:
        """Istio's ``spec.template`` view (ports, service_account, network, locality, weight
        live on the group itself here)."""
        return self

    def entry_for(
        self,
        address: str,
        *,
        name: str = "",
        labels: Mapping[str, str] | None = None,
        ports: Mapping[str, int] | None = None,
        locality: Locality | None = None,
        health: str = "HEALTHY",
    ) -> WorkloadEntrySpec:
        """The WorkloadEntry Istio would auto-register for a workload of this group at
        ``address`` (the node's labels are merged over the template's)."""
        merged = dict(self.labels)
        merged.update(labels or {})
        return WorkloadEntrySpec(
            name=name or f"{self.name}-{address}",
            namespace=self.namespace,
            address=address,
            ports=types.MappingProxyType(dict(ports if ports is not None else self.ports)),
            labels=types.MappingProxyType(merged),
            locality=locality if locality is not None else self.locality,
            weight=self.weight,
            network=self.network,
            service_account=self.service_account,
            health=health,
            auto_registered=True,
            group=self.name,
        )


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A service: from a ServiceEntry host or a Kubernetes Service.

    Endpoints are ``endpoints`` (inline) plus, when ``selector`` is set, every workload in
    ``namespace`` whose labels match it.
    """

    hostname: str
    namespace: str
    ports: tuple[ServicePort, ...]
    addresses: tuple[str, ...] = ()
    resolution: Resolution = Resolution.STATIC
    mesh_external: bool = False
    endpoints: tuple[StaticEndpoint, ...] = ()
    selector: Mapping[str, str] | None = None
    export_to: tuple[str, ...] = ("*",)
    source: str = ""  # "ServiceEntry ns/name" or "Service ns/name"

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.number == number:
                return p
        return None


# --- VirtualService ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    name: str = ""
    uri: StringMatcher | None = None
    scheme: StringMatcher | None = None
    method: StringMatcher | None = None
    authority: StringMatcher | None = None
    # header name (lower case) -> matcher; ``None`` means "present with any value".
    headers: tuple[tuple[str, StringMatcher | None], ...] = ()
    without_headers: tuple[tuple[str, StringMatcher | None], ...] = ()
    query_params: tuple[tuple[str, StringMatcher | None], ...] = ()
    source_labels: Mapping[str, str] = field(default_factory=_empty)
    source_namespace: str = ""
    port: int | None = None
    ignore_uri_case: bool = False
    gateways: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Destination:
    host: str  # FQDN
    subset: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderOps:
    request_set: tuple[tuple[str, str], ...] = ()
    request_add: tuple[tuple[str, str], ...] = ()
    request_remove: tuple[str, ...] = ()
    response_set: tuple[tuple[str, str], ...] = ()
    response_add: tuple[tuple[str, str], ...] = ()
    response_remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return any(
            (
                self.request_set,
                self.request_add,
                self.request_remove,
                self.response_set,
                self.response_add,
                self.response_remove,
            )
        )


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination
    weight: int
    headers: HeaderOps = HeaderOps()


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int
    per_try_timeout: float | None = None
    retry_on: str = ""
    retry_remote_localities: bool = False


@dataclass(frozen=True, slots=True)
class Fault:
    delay: float | None = None  # seconds
    delay_percent: float = 100.0
    abort_http_status: int | None = None
    abort_grpc_status: int | None = None
    abort_percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Mirror:
    destination: Destination
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex: tuple[str, str] | None = None  # (match, rewrite)


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str = ""
    authority: str = ""
    port: int | None = None
    scheme: str = ""
    redirect_code: int = 301


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str = ""
    matches: tuple[HTTPMatch, ...] = ()
    route: tuple[RouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: HTTPRewrite | None = None
    timeout: float | None = None
    retries: HTTPRetry | None = None
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    headers: HeaderOps = HeaderOps()


@dataclass(frozen=True, slots=True)
class VirtualServiceSpec:
    name: str
    namespace: str
    hosts: tuple[str, ...]  # FQDNs (or wildcards such as ``*.example.com``)
    http: tuple[HTTPRoute, ...]
    gateways: tuple[str, ...] = ("mesh",)
    export_to: tuple[str, ...] = ("*",)


# --- DestinationRule ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    http_header_name: str = ""
    http_cookie: tuple[str, str, float | None] | None = None  # (name, path, ttl)
    use_source_ip: bool = False
    http_query_parameter_name: str = ""
    maglev_table_size: int | None = None  # set => MAGLEV
    use_maglev: bool = False
    minimum_ring_size: int | None = None


@dataclass(frozen=True, slots=True)
class LocalityLb:
    enabled: bool = True
    # (from, ((to, weight), ...))
    distribute: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    failover: tuple[tuple[str, str], ...] = ()  # (from region, to region)
    failover_priority: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: str = ""  # "" = unset
    consistent_hash: ConsistentHash | None = None
    locality: LocalityLb | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout: float | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_errors: int | None = None  # deprecated field
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True, slots=True)
class TLSSettings:
    mode: str = "DISABLE"  # DISABLE / SIMPLE / MUTUAL / ISTIO_MUTUAL
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    subject_alt_names: tuple[str, ...] = ()
    sni: str = ""
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class PortLevelPolicy:
    port: int
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: TLSSettings | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: TLSSettings | None = None
    port_level: tuple[PortLevelPolicy, ...] = ()

    def for_port(self, port: int) -> TrafficPolicy:
        """The policy for ``port``: a matching port-level setting replaces each of its parts,
        as Istio's ``GetPortLevelTrafficPolicy`` does."""
        for pl in self.port_level:
            if pl.port == port:
                return TrafficPolicy(
                    load_balancer=pl.load_balancer or self.load_balancer,
                    connection_pool=pl.connection_pool or self.connection_pool,
                    outlier_detection=pl.outlier_detection or self.outlier_detection,
                    tls=pl.tls or self.tls,
                )
        return TrafficPolicy(
            self.load_balancer, self.connection_pool, self.outlier_detection, self.tls
        )

    def merged_with(self, subset: TrafficPolicy | None, port: int) -> TrafficPolicy:
        """Istio's ``MergeSubsetTrafficPolicy``: each part set in the subset wins."""
        base = self.for_port(port)
        if subset is None:
            return base
        sub = subset.for_port(port)
        return TrafficPolicy(
            load_balancer=sub.load_balancer or base.load_balancer,
            connection_pool=sub.connection_pool or base.connection_pool,
            outlier_detection=sub.outlier_detection or base.outlier_detection,
            tls=sub.tls or base.tls,
        )


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str] = field(default_factory=_empty)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRuleSpec:
    name: str
    namespace: str
    host: str  # FQDN
    traffic_policy: TrafficPolicy = TrafficPolicy()
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ("*",)
    workload_selector: Mapping[str, str] | None = None

    def subset(self, name: str) -> Subset | None:
        for s in self.subsets:
            if s.name == name:
                return s
        return None


# --- security -------------------------------------------------------------------------------


PATH_NORMALIZATIONS = ("DEFAULT", "NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")
"""Istio's ``meshConfig.pathNormalization.normalization`` values (``DEFAULT`` is ``BASE``)."""


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """The mesh-wide settings pymesh reads from Istio's MeshConfig (the ``mesh`` key of the
    ``istio`` ConfigMap): how inbound listeners normalize request paths."""

    path_normalization: str = "BASE"
    source: str = ""
    """Where they came from (``file:doc``), for messages; empty: Istio's defaults."""


@dataclass(frozen=True, slots=True)
class PeerAuthenticationSpec:
    name: str
    namespace: str
    selector: Mapping[str, str] | None = None
    mode: str = "UNSET"  # STRICT / PERMISSIVE / DISABLE / UNSET
    port_level: Mapping[int, str] = field(default_factory=lambda: types.MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class AuthzSource:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzRule:
    sources: tuple[AuthzSource, ...] = ()  # OR
    operations: tuple[AuthzOperation, ...] = ()  # OR
    conditions: tuple[AuthzCondition, ...] = ()  # AND


@dataclass(frozen=True, slots=True)
class AuthorizationPolicySpec:
    name: str
    namespace: str
    selector: Mapping[str, str] | None = None
    action: str = "ALLOW"  # ALLOW / DENY / AUDIT
    rules: tuple[AuthzRule, ...] = ()
