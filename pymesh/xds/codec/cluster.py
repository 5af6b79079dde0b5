"""Decode ``envoy.config.cluster.v3.Cluster`` (CDS) into :class:`pymesh.model.cluster.Cluster`.

Validation follows gRPC's xDS client — gRFC A27 (base), A37 (aggregate clusters), A42 (ring
hash), A48 (``lrs_server`` ignored), A50 (outlier detection), A52 (``load_balancing_policy``),
A29 (TLS) — and goes beyond gRPC's C-core where Envoy supports more and Istio sends it:
``LEAST_REQUEST``, ``MAGLEV``, ``RANDOM``, ``STATIC`` clusters, SDS secret names, circuit
breakers and the full outlier detection are decoded, not NACKed or ignored.

A supported field with an unsupported value raises :class:`ResourceError` naming the field;
fields we do not implement (health checks, ``lb_subset_config``, upstream filters such as
Istio's ``istio.metadata_exchange`` …) are ignored.

Cluster kinds: ``EDS`` (``eds_config`` must be ADS or self), ``LOGICAL_DNS`` (exactly one
locality with exactly one endpoint, A27), ``STATIC`` (inline IP endpoints, may be empty as in
Istio's ``BlackHoleCluster``), and aggregate (``cluster_type`` ``envoy.clusters.aggregate``,
non-empty list). ``STRICT_DNS`` and ``ORIGINAL_DST`` are NACKed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envoy.config.cluster.v3 import (
    cluster_pb2,
    outlier_detection_pb2,
)
from envoy.config.core.v3 import base_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as cswrr_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2
from envoy.extensions.load_balancing_policies.pick_first.v3 import pick_first_pb2
from envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from pymesh.model.cluster import (
    CircuitBreakers,
    Cluster,
    ClusterKind,
    CommonLbConfig,
    DnsLookupFamily,
    HttpProtocolOptions,
    LbPolicy,
    LeastRequest,
    Maglev,
    OutlierDetection,
    PickFirst,
    Random,
    RetryBudget,
    RingHash,
    RoundRobin,
    TransportSocketMatch,
    UpstreamProtocol,
    WeightedRoundRobin,
    ZoneAwareLbConfig,
)
from pymesh.model.endpoint import ClusterLoadAssignment
from pymesh.xds.codec._common import (
    AnyConfig,
    Ctx,
    decode_percent,
    freeze_json,
    index,
    join,
    metadata_to_mapping,
    optional_duration,
    parse_message,
    struct_to_dict,
    unpack_any,
    unwrap_any,
)
from pymesh.xds.codec._registry import Decoded, register
from pymesh.xds.codec.endpoint import decode_load_assignment
from pymesh.xds.codec.tls import decode_upstream_transport_socket
from pymesh.xds.resource_types import ResourceType

__all__ = ["AGGREGATE_CLUSTER_TYPE", "HTTP_PROTOCOL_OPTIONS_KEY", "decode_cluster"]

AGGREGATE_CLUSTER_TYPE = "envoy.clusters.aggregate"
HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

_C = cluster_pb2.Cluster
_RING_SIZE_MAX = 8 * 1024 * 1024  # gRFC A42 / Envoy's bound on ring sizes
_MAGLEV_TABLE_MAX = 5_000_011  # Envoy's bound on the Maglev table size
_MAX_LB_POLICY_DEPTH = 16  # gRFC A52: nesting limit of load_balancing_policy
_PERCENT_FIELDS = (
    "max_ejection_percent",
    "enforcing_consecutive_5xx",
    "enforcing_consecutive_gateway_failure",
    "enforcing_consecutive_local_origin_failure",
    "enforcing_success_rate",
    "enforcing_local_origin_success_rate",
    "failure_percentage_threshold",
    "enforcing_failure_percentage",
    "enforcing_failure_percentage_local_origin",
)
_COUNT_FIELDS = (
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "consecutive_local_origin_failure",
    "success_rate_minimum_hosts",
    "success_rate_request_volume",
    "success_rate_stdev_factor",
    "failure_percentage_minimum_hosts",
    "failure_percentage_request_volume",
)


# ----------------------------------------------------------------------------- helpers


def _u32(msg: Any, field: str, default: int) -> int:
    """A wrapper field's value, or ``default`` when unset."""
    return int(getattr(msg, field).value) if msg.HasField(field) else default


def _positive_duration(msg: Any, field: str, default: float, ctx: Ctx, path: str) -> float:
    value = optional_duration(msg, field, ctx, path)
    if value is None:
        return default
    if value <= 0:
        raise ctx.error(join(path, field), "must be greater than 0")
    return value


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:  # n <= 5,000,011: at most ~1,100 iterations
        if n % f == 0:
            return False
        f += 2
    return True


# ----------------------------------------------------------------------------- LB policy


def _ring_hash(
    min_size: int, max_size: int, ctx: Ctx, path: str, names: tuple[str, str]
) -> RingHash:
    if min_size > _RING_SIZE_MAX:
        raise ctx.error(join(path, names[0]), f"must be at most {_RING_SIZE_MAX}")
    if max_size > _RING_SIZE_MAX:
        raise ctx.error(join(path, names[1]), f"must be at most {_RING_SIZE_MAX}")
    if min_size < 1:
        raise ctx.error(join(path, names[0]), "must be at least 1")
    if min_size > max_size:
        raise ctx.error(join(path, names[0]), f"{names[0]} > {names[1]}")
    return RingHash(min_size, max_size)


def _least_request(choice_count: int, bias: float, ctx: Ctx, path: str) -> LeastRequest:
    if choice_count < 2:
        raise ctx.error(join(path, "choice_count"), "must be at least 2")
    if not bias >= 0.0:  # also rejects NaN
        raise ctx.error(join(path, "active_request_bias"), "must be non-negative")
    return LeastRequest(choice_count, bias)


def _maglev(table_size: int, ctx: Ctx, path: str) -> Maglev:
    if table_size > _MAGLEV_TABLE_MAX or not _is_prime(table_size):
        raise ctx.error(
            join(path, "table_size"), f"must be a prime <= {_MAGLEV_TABLE_MAX}, got {table_size}"
        )
    return Maglev(table_size)


def _legacy_lb_policy(c: cluster_pb2.Cluster, ctx: Ctx) -> LbPolicy:
    """``lb_policy`` with its ``*_lb_config``."""
    policy = c.lb_policy
    if policy == _C.ROUND_ROBIN:
        return RoundRobin()
    if policy == _C.RANDOM:
        return Random()
    if policy == _C.LEAST_REQUEST:
        lr = c.least_request_lb_config
        path = "least_request_lb_config"
        bias = lr.active_request_bias.default_value if lr.HasField("active_request_bias") else 1.0
        return _least_request(_u32(lr, "choice_count", 2), bias, ctx, path)
    if policy == _C.RING_HASH:
        rh = c.ring_hash_lb_config
        path = "ring_hash_lb_config"
        if rh.hash_function != _C.RingHashLbConfig.XX_HASH:
            raise ctx.error(join(path, "hash_function"), "only XX_HASH is supported")
        return _ring_hash(
            _u32(rh, "minimum_ring_size", 1024),
            _u32(rh, "maximum_ring_size", _RING_SIZE_MAX),
            ctx,
            path,
            ("minimum_ring_size", "maximum_ring_size"),
        )
    if policy == _C.MAGLEV:
        return _maglev(_u32(c.maglev_lb_config, "table_size", 65537), ctx, "maglev_lb_config")
    if policy == _C.LOAD_BALANCING_POLICY_CONFIG:
        raise ctx.error("load_balancing_policy", "lb_policy LOAD_BALANCING_POLICY_CONFIG needs it")
    name = _C.LbPolicy.Name(policy) if policy in _C.LbPolicy.values() else str(policy)
    raise ctx.error("lb_policy", f"unsupported lb_policy {name}")


_LbExt = Callable[[AnyConfig, Ctx, str, int], tuple[LbPolicy, bool]]


def _ext_round_robin(cfg: AnyConfig, ctx: Ctx, path: str, depth: int) -> tuple[LbPolicy, bool]:
    msg = unpack_any(cfg, round_robin_pb2.RoundRobin, ctx, path)
    return RoundRobin(), msg.locality_lb_config.HasField("locality_weighted_lb_config")


def _ext_random(cfg: AnyConfig, ctx: Ctx, path: str, depth: int) -> tuple[LbPolicy, bool]:
    msg = unpack_any(cfg, random_pb2.Random, ctx, path)
    return Random(), msg.locality_lb_config.HasField("locality_weighted_lb_config")


def _ext_least_request(cfg: AnyConfig, ctx: Ctx, path: str, depth: int) -> tuple[LbPolicy, bool]:
    msg = unpack_any(cfg, least_request_pb2.LeastRequest, ctx, path)
    bias = msg.active_request_bias.default_value if msg.HasField("active_request_bias") else 1.0
    policy = _least_request(_u32(msg, "choice_count", 2), bias, ctx, path)
    return policy, msg.locality_lb_config.HasField("locality_weighted_lb_config")


def _ext_ring_hash(cfg: AnyConfig, ctx: Ctx, path: str, depth: int) -> tuple[LbPolicy, bool]:
    msg = unpack_any(cfg, ring_hash_pb2.RingHash, ctx, path)
    if msg.hash_function not in (
        ring_hash_pb2.RingHash.DEFAULT_HASH,
        ring_hash_pb2.RingHash.XX_HASH,
    ):
        raise ctx.error(join(path, "hash_function"), "only XX_HASH is supported")
    policy = _ring_hash(
        _u32(msg, "minimum_ring_size", 1024),
        _u32(msg, "maximum_ring_size", _RING_SIZE_MAX),
        ctx,
        path,
        ("minimum_ring_size", "maximum_ring_size"),
    )
    return policy, msg.HasField("locality_weighted_lb_config")


def _ext_maglev(cfg: AnyConfig, ctx: Ctx, path: str, depth: int) -> tuple[LbPolicy, bool]:
    msg = unpack_any(cfg, maglev_pb2.Maglev, ctx, path)
    policy = _maglev(_u32(msg, "table_size", 65537), ctx, path)
    return policy, msg.HasField("locality_weighted_lb_config")


def _ext_pick_first(cfg: AnyConfig, ctx: Ctx, path: str, depth: int) -> tuple[LbPolicy, bool]:
    msg = unpack_any(cfg, pick_first_pb2.PickFirst, ctx, path)
    return PickFirst(msg.shuffle_address_list), False


def _ext_wrr(cfg: AnyConfig, ctx: Ctx, path: str, depth: int) -> tuple[LbPolicy, bool]:
    msg = unpack_any(cfg, cswrr_pb2.ClientSideWeightedRoundRobin, ctx, path)
    penalty = (
        msg.error_utilization_penalty.value if msg.HasField("error_utilization_penalty") else 1.0
    )
    if not penalty >= 0.0:
        raise ctx.error(join(path, "error_utilization_penalty"), "must be non-negative")
    d = WeightedRoundRobin()

    def dur(field: str, default: float) -> float:
        value = optional_duration(msg, field, ctx, path)
        return default if value is None else value

    policy = WeightedRoundRobin(
        enable_oob_load_report=msg.enable_oob_load_report.value,
        oob_reporting_period=dur("oob_reporting_period", d.oob_reporting_period),
        blackout_period=dur("blackout_period", d.blackout_period),
        weight_expiration_period=dur("weight_expiration_period", d.weight_expiration_period),
        # gRFC A58: the update period is clamped to at least 100 ms.
        weight_update_period=max(0.1, dur("weight_update_period", d.weight_update_period)),
        error_utilization_penalty=float(penalty),
    )
    return policy, False


def _ext_wrr_locality(cfg: AnyConfig, ctx: Ctx, path: str, depth: int) -> tuple[LbPolicy, bool]:
    msg = unpack_any(cfg, wrr_locality_pb2.WrrLocality, ctx, path)
    child_path = join(path, "endpoint_picking_policy")
    child, _ = _lb_policy_list(msg.endpoint_picking_policy, ctx, child_path, depth + 1)
    return child, True


_LB_EXTENSIONS: dict[str, _LbExt] = {
    round_robin_pb2.RoundRobin.DESCRIPTOR.full_name: _ext_round_robin,
    least_request_pb2.LeastRequest.DESCRIPTOR.full_name: _ext_least_request,
    ring_hash_pb2.RingHash.DESCRIPTOR.full_name: _ext_ring_hash,
    maglev_pb2.Maglev.DESCRIPTOR.full_name: _ext_maglev,
    random_pb2.Random.DESCRIPTOR.full_name: _ext_random,
    wrr_locality_pb2.WrrLocality.DESCRIPTOR.full_name: _ext_wrr_locality,
    cswrr_pb2.ClientSideWeightedRoundRobin.DESCRIPTOR.full_name: _ext_wrr,
    pick_first_pb2.PickFirst.DESCRIPTOR.full_name: _ext_pick_first,
}


def _lb_policy_list(
    lbp: cluster_pb2.LoadBalancingPolicy, ctx: Ctx, path: str, depth: int
) -> tuple[LbPolicy, bool]:
    """gRFC A52: the first policy of the list we support wins; its config must be valid.
    Returns the policy and whether locality weights apply."""
    if depth > _MAX_LB_POLICY_DEPTH:
        raise ctx.error(path, f"load balancing policies nested deeper than {_MAX_LB_POLICY_DEPTH}")
    names = []
    for i, policy in enumerate(lbp.policies):
        tpath = join(index(join(path, "policies"), i), "typed_extension_config.typed_config")
        cfg = unwrap_any(policy.typed_extension_config.typed_config, ctx, tpath)
        ext = _LB_EXTENSIONS.get(cfg.type_name)
        if ext is not None:
            return ext(cfg, ctx, tpath, depth)
        names.append(cfg.type_name or "<empty>")
    raise ctx.error(path, f"no supported load balancing policy in {names}")


# ----------------------------------------------------------------------------- sections


def _kind(c: cluster_pb2.Cluster, ctx: Ctx) -> tuple[ClusterKind, str, tuple[str, ...]]:
    """Kind, EDS service name and aggregate cluster list."""
    which = c.WhichOneof("cluster_discovery_type")
    if which == "cluster_type":
        ct = c.cluster_type
        tpath = "cluster_type.typed_config"
        cfg = unwrap_any(ct.typed_config, ctx, tpath)
        if cfg.type_name != aggregate_pb2.ClusterConfig.DESCRIPTOR.full_name:
            raise ctx.error("cluster_type", f"unsupported custom cluster type {ct.name!r}")
        agg = unpack_any(cfg, aggregate_pb2.ClusterConfig, ctx, tpath)
        if not agg.clusters:
            raise ctx.error(join(tpath, "clusters"), "aggregate cluster list is empty")
        for i, name in enumerate(agg.clusters):
            if not name:
                raise ctx.error(index(join(tpath, "clusters"), i), "empty cluster name")
        return ClusterKind.AGGREGATE, "", tuple(agg.clusters)
    t = c.type
    if t == _C.EDS:
        if not c.HasField("eds_cluster_config"):
            raise ctx.error("eds_cluster_config", "an EDS cluster needs eds_cluster_config")
        ecc = c.eds_cluster_config
        source = ecc.eds_config.WhichOneof("config_source_specifier")
        if source not in ("ads", "self"):
            raise ctx.error(
                "eds_cluster_config.eds_config", f"must be ads or self, got {source or 'nothing'}"
            )
        return ClusterKind.EDS, ecc.service_name, ()
    if t == _C.LOGICAL_DNS:
        return ClusterKind.LOGICAL_DNS, "", ()
    if t == _C.STATIC:
        return ClusterKind.STATIC, "", ()
    name = _C.DiscoveryType.Name(t) if t in _C.DiscoveryType.values() else str(t)
    raise ctx.error("type", f"unsupported cluster type {name}")


def _inline_endpoints(
    c: cluster_pb2.Cluster, kind: ClusterKind, ctx: Ctx
) -> ClusterLoadAssignment | None:
    if kind is ClusterKind.LOGICAL_DNS:
        la = c.load_assignment
        if len(la.endpoints) != 1:
            raise ctx.error("load_assignment.endpoints", "LOGICAL_DNS needs exactly one locality")
        if len(la.endpoints[0].lb_endpoints) != 1:
            raise ctx.error(
                "load_assignment.endpoints[0].lb_endpoints",
                "LOGICAL_DNS needs exactly one endpoint",
            )
        cla = decode_load_assignment(la, ctx, "load_assignment", allow_hostname=True)
        if not cla.localities:  # its only locality had weight 0
            raise ctx.error("load_assignment.endpoints[0]", "LOGICAL_DNS locality has weight 0")
    elif kind is ClusterKind.STATIC:
        cla = decode_load_assignment(c.load_assignment, ctx, "load_assignment")
    else:
        return None
    if not cla.cluster_name:
        cla = ClusterLoadAssignment(
            c.name,
            cla.localities,
            cla.overprovisioning_factor,
            cla.drop_overloads,
            cla.endpoint_stale_after,
        )
    return cla


def _circuit_breakers(c: cluster_pb2.Cluster, ctx: Ctx) -> CircuitBreakers:
    for i, t in enumerate(c.circuit_breakers.thresholds):
        if t.priority != base_pb2.RoutingPriority.DEFAULT:
            continue  # HIGH priority: we route everything at DEFAULT, as Istio does
        path = index("circuit_breakers.thresholds", i)
        budget: RetryBudget | None = None
        if t.HasField("retry_budget"):
            rb = t.retry_budget
            bpath = join(path, "retry_budget")
            pct = 20.0
            if rb.HasField("budget_percent"):
                pct = decode_percent(rb.budget_percent, ctx, join(bpath, "budget_percent"))
            budget = RetryBudget(pct, _u32(rb, "min_retry_concurrency", 3))
        return CircuitBreakers(
            max_connections=_u32(t, "max_connections", 1024),
            max_pending_requests=_u32(t, "max_pending_requests", 1024),
            max_requests=_u32(t, "max_requests", 1024),
            max_retries=_u32(t, "max_retries", 3),
            retry_budget=budget,
        )
    return CircuitBreakers()


def _outlier_detection(od: outlier_detection_pb2.OutlierDetection, ctx: Ctx) -> OutlierDetection:
    path = "outlier_detection"
    d = OutlierDetection()
    values: dict[str, Any] = {}
    for field in _PERCENT_FIELDS:
        value = _u32(od, field, getattr(d, field))
        if value > 100:
            raise ctx.error(join(path, field), f"percentage must be at most 100, got {value}")
        values[field] = value
    for field in _COUNT_FIELDS:
        values[field] = _u32(od, field, getattr(d, field))
    interval = _positive_duration(od, "interval", d.interval, ctx, path)
    base = _positive_duration(od, "base_ejection_time", d.base_ejection_time, ctx, path)
    max_time = optional_duration(od, "max_ejection_time", ctx, path)
    if max_time is None:
        max_time = max(300.0, base)
    elif max_time <= 0:
        raise ctx.error(join(path, "max_ejection_time"), "must be greater than 0")
    elif max_time < base:
        raise ctx.error(join(path, "max_ejection_time"), "must not be less than base_ejection_time")
    jitter = optional_duration(od, "max_ejection_time_jitter", ctx, path) or 0.0
    return OutlierDetection(
        split_external_local_origin_errors=od.split_external_local_origin_errors,
        interval=interval,
        base_ejection_time=base,
        max_ejection_time=max_time,
        max_ejection_time_jitter=jitter,
        always_eject_one_host=od.always_eject_one_host.value,
        **values,
    )


def _common_lb_config(c: cluster_pb2.Cluster, ctx: Ctx, locality_weighted: bool) -> CommonLbConfig:
    clc = c.common_lb_config
    path = "common_lb_config"
    panic = 50.0
    if clc.HasField("healthy_panic_threshold"):
        panic = decode_percent(
            clc.healthy_panic_threshold, ctx, join(path, "healthy_panic_threshold")
        )
    zone_aware: ZoneAwareLbConfig | None = None
    which = clc.WhichOneof("locality_config_specifier")
    if which == "locality_weighted_lb_config":
        locality_weighted = True
    elif which == "zone_aware_lb_config":
        za = clc.zone_aware_lb_config
        zpath = join(path, "zone_aware_lb_config")
        routing = 100.0
        if za.HasField("routing_enabled"):
            routing = decode_percent(za.routing_enabled, ctx, join(zpath, "routing_enabled"))
        zone_aware = ZoneAwareLbConfig(
            routing, _u32(za, "min_cluster_size", 6), za.fail_traffic_on_panic
        )
    return CommonLbConfig(panic, locality_weighted, zone_aware)


def _http_protocol_options(c: cluster_pb2.Cluster, ctx: Ctx) -> HttpProtocolOptions:
    protocol = UpstreamProtocol.HTTP1
    if c.HasField("http2_protocol_options"):  # legacy cluster fields
        protocol = UpstreamProtocol.HTTP2
    if c.protocol_selection == _C.USE_DOWNSTREAM_PROTOCOL:
        protocol = UpstreamProtocol.USE_DOWNSTREAM
    common = c.common_http_protocol_options
    cpath = "common_http_protocol_options"
    max_requests = _u32(c, "max_requests_per_connection", 0)
    if HTTP_PROTOCOL_OPTIONS_KEY in c.typed_extension_protocol_options:
        path = f"typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS_KEY!r}]"
        hpo = unpack_any(
            c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS_KEY],
            http_protocol_options_pb2.HttpProtocolOptions,
            ctx,
            path,
        )
        which = hpo.WhichOneof("upstream_protocol_options")
        if which == "explicit_http_config":
            ehc = hpo.explicit_http_config
            proto = ehc.WhichOneof("protocol_config")
            if proto == "http3_protocol_options":
                raise ctx.error(join(path, "explicit_http_config"), "HTTP/3 is not supported")
            protocol = (
                UpstreamProtocol.HTTP2
                if proto == "http2_protocol_options"
                else UpstreamProtocol.HTTP1
            )
        elif which == "use_downstream_protocol_config":
            protocol = UpstreamProtocol.USE_DOWNSTREAM
        elif which == "auto_config":
            protocol = UpstreamProtocol.AUTO
        common = hpo.common_http_protocol_options
        cpath = join(path, "common_http_protocol_options")
    idle = optional_duration(common, "idle_timeout", ctx, cpath)
    max_requests = _u32(common, "max_requests_per_connection", max_requests)
    return HttpProtocolOptions(protocol, idle or None, max_requests or None)


def _transport_socket_matches(c: cluster_pb2.Cluster, ctx: Ctx) -> tuple[TransportSocketMatch, ...]:
    out = []
    for i, m in enumerate(c.transport_socket_matches):
        path = index("transport_socket_matches", i)
        tls = None
        if m.HasField("transport_socket"):
            tls = decode_upstream_transport_socket(
                m.transport_socket, ctx, join(path, "transport_socket")
            )
        out.append(TransportSocketMatch(m.name, freeze_json(struct_to_dict(m.match)), tls))
    return tuple(out)


# ----------------------------------------------------------------------------- decoder


@register(ResourceType.CLUSTER)
def decode_cluster(data: bytes) -> Decoded:
    """The registered CDS decoder: serialized ``Cluster`` -> :class:`Cluster`."""
    ctx = Ctx(ResourceType.CLUSTER.short_name)
    c = parse_message(cluster_pb2.Cluster, data, ctx)
    if not c.name:
        raise ctx.error("name", "cluster name is empty")
    ctx = ctx.named(c.name)
    return Decoded(c.name, cluster_from_proto(c, ctx))


def cluster_from_proto(c: cluster_pb2.Cluster, ctx: Ctx) -> Cluster:
    """Validate and convert a parsed ``Cluster`` (``ctx`` names it in errors)."""
    kind, eds_service_name, aggregate = _kind(c, ctx)
    if c.HasField("load_balancing_policy"):
        lb_policy, locality_weighted = _lb_policy_list(
            c.load_balancing_policy, ctx, "load_balancing_policy", 0
        )
    elif kind is ClusterKind.AGGREGATE and c.lb_policy == _C.CLUSTER_PROVIDED:
        # Envoy requires CLUSTER_PROVIDED for aggregate clusters: the chosen child picks.
        lb_policy, locality_weighted = RoundRobin(), False
    else:
        lb_policy, locality_weighted = _legacy_lb_policy(c, ctx), False
    if c.HasField("transport_socket_matcher"):
        raise ctx.error("transport_socket_matcher", "transport_socket_matcher is not supported")
    tls = None
    if c.HasField("transport_socket"):
        tls = decode_upstream_transport_socket(c.transport_socket, ctx, "transport_socket")
    family = c.dns_lookup_family
    if family not in DnsLookupFamily._value2member_map_:
        raise ctx.error("dns_lookup_family", f"unknown dns_lookup_family {family}")
    return Cluster(
        name=c.name,
        kind=kind,
        eds_service_name=eds_service_name,
        aggregate_clusters=aggregate,
        load_assignment=_inline_endpoints(c, kind, ctx),
        lb_policy=lb_policy,
        common_lb_config=_common_lb_config(c, ctx, locality_weighted),
        connect_timeout=_positive_duration(c, "connect_timeout", 5.0, ctx, ""),
        circuit_breakers=_circuit_breakers(c, ctx),
        outlier_detection=(
            _outlier_detection(c.outlier_detection, ctx)
            if c.HasField("outlier_detection")
            else None
        ),
        http_protocol_options=_http_protocol_options(c, ctx),
        tls=tls,
        transport_socket_matches=_transport_socket_matches(c, ctx),
        dns_lookup_family=DnsLookupFamily(family),
        metadata=metadata_to_mapping(c.metadata),
    )
