"""Clusters (CDS), proto-free.

A :class:`Cluster` says how to find a service's endpoints (``kind``) and how to talk to them:
load-balancing policy, circuit-breaker limits, outlier detection, TLS and HTTP protocol
options. Unset fields carry Envoy's defaults, so the policy core never has to know them.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pymesh.model.endpoint import ClusterLoadAssignment
from pymesh.model.tls import UpstreamTlsContext

__all__ = [
    "UNLIMITED",
    "CircuitBreakers",
    "Cluster",
    "ClusterKind",
    "CommonLbConfig",
    "DnsLookupFamily",
    "HttpProtocolOptions",
    "LbPolicy",
    "LeastRequest",
    "Maglev",
    "OutlierDetection",
    "PickFirst",
    "Random",
    "RetryBudget",
    "RingHash",
    "RoundRobin",
    "TransportSocketMatch",
    "UpstreamProtocol",
    "WeightedRoundRobin",
    "ZoneAwareLbConfig",
]

UNLIMITED = 2**32 - 1
"""What Istio sets circuit-breaker thresholds to when a DestinationRule sets none."""

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


class ClusterKind(enum.Enum):
    EDS = "EDS"
    LOGICAL_DNS = "LOGICAL_DNS"
    STATIC = "STATIC"
    AGGREGATE = "AGGREGATE"


class DnsLookupFamily(enum.Enum):
    """Envoy ``Cluster.DnsLookupFamily`` (values are the proto numbers)."""

    AUTO = 0
    V4_ONLY = 1
    V6_ONLY = 2
    V4_PREFERRED = 3
    ALL = 4


# ----------------------------------------------------------------------------- LB policies


@dataclass(frozen=True, slots=True)
class RoundRobin:
    """Weighted round robin over endpoints (Envoy ``ROUND_ROBIN``)."""


@dataclass(frozen=True, slots=True)
class LeastRequest:
    """Power-of-``choice_count`` choices by active requests (Istio's default since 1.14).

    With endpoint weights, Envoy scales by ``weight / active ** active_request_bias``.
    """

    choice_count: int = 2
    active_request_bias: float = 1.0


@dataclass(frozen=True, slots=True)
class RingHash:
    """Consistent hashing on a ring (gRFC A42); the hash is always xxHash64."""

    min_ring_size: int = 1024
    max_ring_size: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Maglev:
    """Maglev consistent hashing; ``table_size`` is prime."""

    table_size: int = 65537


@dataclass(frozen=True, slots=True)
class Random:
    """Uniformly random endpoint (weights honoured)."""


@dataclass(frozen=True, slots=True)
class WeightedRoundRobin:
    """Client-side weighted round robin from backend load reports (gRFC A58). Seconds."""

    enable_oob_load_report: bool = False
    oob_reporting_period: float = 10.0
    blackout_period: float = 10.0
    weight_expiration_period: float = 180.0
    weight_update_period: float = 1.0
    error_utilization_penalty: float = 1.0


@dataclass(frozen=True, slots=True)
class PickFirst:
    """First reachable endpoint (gRFC A62)."""

    shuffle_address_list: bool = False


LbPolicy = RoundRobin | LeastRequest | RingHash | Maglev | Random | WeightedRoundRobin | PickFirst
"""The endpoint-picking policy of a cluster."""


# ----------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Retries allowed as a share of active requests (Envoy ``RetryBudget``)."""

    budget_percent: float = 20.0
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """``DEFAULT``-priority thresholds; unset ones have Envoy's defaults.

    Istio sets every threshold to :data:`UNLIMITED` (2^32-1) unless a DestinationRule says
    otherwise. When ``retry_budget`` is set it replaces ``max_retries``.
    """

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    retry_budget: RetryBudget | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Envoy ``cluster.v3.OutlierDetection`` with Envoy's defaults; durations in seconds,
    percentages in ``[0, 100]``. ``max_ejection_time`` is already resolved to
    ``max(300 s, base_ejection_time)`` when unset."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    split_external_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_time_jitter: float = 0.0
    max_ejection_percent: int = 10
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_consecutive_local_origin_failure: int = 100
    enforcing_success_rate: int = 100
    enforcing_local_origin_success_rate: int = 100
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    failure_percentage_threshold: int = 85
    enforcing_failure_percentage: int = 0
    enforcing_failure_percentage_local_origin: int = 0
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    always_eject_one_host: bool = False


@dataclass(frozen=True, slots=True)
class ZoneAwareLbConfig:
    """Envoy ``CommonLbConfig.ZoneAwareLbConfig`` (``routing_enabled`` in percent)."""

    routing_enabled: float = 100.0
    min_cluster_size: int = 6
    fail_traffic_on_panic: bool = False


@dataclass(frozen=True, slots=True)
class CommonLbConfig:
    """Envoy ``Cluster.CommonLbConfig``. ``healthy_panic_threshold`` is a percentage."""

    healthy_panic_threshold: float = 50.0
    locality_weighted: bool = False
    zone_aware: ZoneAwareLbConfig | None = None


# ----------------------------------------------------------------------------- protocol


class UpstreamProtocol(enum.Enum):
    """Which HTTP version to speak to the endpoints."""

    HTTP1 = "http1"
    HTTP2 = "http2"
    USE_DOWNSTREAM = "use_downstream"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class HttpProtocolOptions:
    """``envoy.extensions.upstreams.http.v3.HttpProtocolOptions`` (and the legacy cluster
    fields it replaces). ``None`` = unset (no idle timeout / unlimited requests)."""

    protocol: UpstreamProtocol = UpstreamProtocol.HTTP1
    idle_timeout: float | None = None
    max_requests_per_connection: int | None = None


@dataclass(frozen=True, slots=True)
class TransportSocketMatch:
    """Use ``tls`` (``None`` = plaintext) for endpoints whose
    ``envoy.transport_socket_match`` metadata contains every key/value of ``match``."""

    name: str
    match: Mapping[str, Any] = field(hash=False)
    tls: UpstreamTlsContext | None

    def matches(self, endpoint_match: Mapping[str, Any]) -> bool:
        return all(endpoint_match.get(k) == v for k, v in self.match.items())


# ----------------------------------------------------------------------------- cluster


@dataclass(frozen=True, slots=True)
class Cluster:
    """One decoded ``envoy.config.cluster.v3.Cluster``.

    ``eds_service_name`` is ``""`` when unset; :attr:`eds_resource_name` is what to
    subscribe to over EDS. ``aggregate_clusters`` (``AGGREGATE`` only) is in priority
    order. ``load_assignment`` holds the inline endpoints of ``STATIC`` and
    ``LOGICAL_DNS`` clusters (for ``LOGICAL_DNS`` exactly one endpoint: the name to resolve).
    ``tls`` is the default transport socket's TLS (``None`` = plaintext);
    ``transport_socket_matches`` override it per endpoint (see :meth:`tls_for`).
    ``metadata`` is ``filter_metadata`` as ``{filter: {key: json}}``, frozen.
    """

    name: str
    kind: ClusterKind
    eds_service_name: str = ""
    aggregate_clusters: tuple[str, ...] = ()
    load_assignment: ClusterLoadAssignment | None = None
    lb_policy: LbPolicy = field(default_factory=RoundRobin)
    common_lb_config: CommonLbConfig = field(default_factory=CommonLbConfig)
    connect_timeout: float = 5.0
    circuit_breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    outlier_detection: OutlierDetection | None = None
    http_protocol_options: HttpProtocolOptions = field(default_factory=HttpProtocolOptions)
    tls: UpstreamTlsContext | None = None
    transport_socket_matches: tuple[TransportSocketMatch, ...] = ()
    dns_lookup_family: DnsLookupFamily = DnsLookupFamily.AUTO
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty, hash=False)

    @property
    def eds_resource_name(self) -> str:
        return self.eds_service_name or self.name

    @property
    def locality_weighted(self) -> bool:
        """Whether locality weights apply (``common_lb_config`` or a ``wrr_locality`` policy)."""
        return self.common_lb_config.locality_weighted

    def tls_for(self, endpoint_match: Mapping[str, Any]) -> UpstreamTlsContext | None:
        """The TLS context for an endpoint with this ``envoy.transport_socket_match``
        metadata: the first matching ``transport_socket_matches`` entry, else ``tls``."""
        for m in self.transport_socket_matches:
            if m.matches(endpoint_match):
                return m.tls
        return self.tls
