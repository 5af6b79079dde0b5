"""CDS: ``outbound|PORT|SUBSET|HOST`` clusters, shaped like istiod's.

Proxyless nodes get what istiod's ``grpcgen`` builds (EDS over ADS, ROUND_ROBIN unless a
DestinationRule says otherwise, ``UpstreamTlsContext`` with certificate-provider instances for
ISTIO_MUTUAL). Envoy-like nodes get istiod's sidecar defaults on top (LEAST_REQUEST, 10 s
connect timeout, SDS secrets for ISTIO_MUTUAL, STRICT_DNS for DNS ServiceEntries).
Both get unlimited circuit-breaker thresholds (2^32-1) unless a DestinationRule sets them.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import config_source_pb2, protocol_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2

from pymesh.controlplane.config import MeshConfig, ProxyNode, ServiceSpec
from pymesh.controlplane.config._types import (
    ConnectionPool,
    OutlierDetection,
    Resolution,
    TLSSettings,
    TrafficPolicy,
)
from pymesh.controlplane.translate._names import MAX_U32, cluster_name, duration, pack

__all__ = [
    "SDS_CLUSTER",
    "TLS_SOCKET",
    "TRUST_DOMAIN",
    "build_clusters_for_service",
    "cluster_policy",
    "common_tls_context",
]

TRUST_DOMAIN = "cluster.local"
TLS_SOCKET = "envoy.transport_sockets.tls"
SDS_CLUSTER = "sds-grpc"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _ads() -> config_source_pb2.ConfigSource:
    src = config_source_pb2.ConfigSource()
    src.ads.SetInParent()
    src.resource_api_version = config_source_pb2.V3
    return src


def _sds() -> config_source_pb2.ConfigSource:
    """istiod's SDS source for Envoy sidecars: the agent's ``sds-grpc`` cluster."""
    src = config_source_pb2.ConfigSource()
    api = src.api_config_source
    api.api_type = config_source_pb2.ApiConfigSource.GRPC
    api.set_node_on_first_message_only = True
    api.transport_api_version = config_source_pb2.V3
    api.grpc_services.add().envoy_grpc.cluster_name = SDS_CLUSTER
    src.initial_fetch_timeout.SetInParent()
    src.resource_api_version = config_source_pb2.V3
    return src


def cluster_policy(
    config: MeshConfig, node: ProxyNode, svc: ServiceSpec, port: int, subset: str
) -> TrafficPolicy:
    """The merged traffic policy of one cluster, as Istio resolves it."""
    dr = config.destination_rule(svc.hostname, node.namespace)
    if dr is None:
        return TrafficPolicy()
    sub = dr.subset(subset) if subset else None
    return dr.traffic_policy.merged_with(sub.traffic_policy if sub else None, port)


def build_clusters_for_service(
    config: MeshConfig, node: ProxyNode, svc: ServiceSpec, wanted: set[str] | None
) -> list[cluster_pb2.Cluster]:
    """Default and subset clusters of every port of ``svc`` (only ``wanted`` names when set)."""
    out: list[cluster_pb2.Cluster] = []
    dr = config.destination_rule(svc.hostname, node.namespace)
    subsets = [""] + [s.name for s in dr.subsets] if dr is not None else [""]
    for p in svc.ports:
        for subset in subsets:
            name = cluster_name(p.number, subset, svc.hostname)
            if wanted is not None and name not in wanted:
                continue
            policy = cluster_policy(config, node, svc, p.number, subset)
            out.append(_cluster(config, node, svc, p.number, p.protocol, name, policy))
    return out


def _cluster(  # noqa: PLR0917
    config: MeshConfig,
    node: ProxyNode,
    svc: ServiceSpec,
    port: int,
    protocol: str,
    name: str,
    policy: TrafficPolicy,
) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name)
    envoy = not node.proxyless
    if envoy and svc.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN):
        c.type = (
            cluster_pb2.Cluster.STRICT_DNS
            if svc.resolution is Resolution.DNS
            else cluster_pb2.Cluster.LOGICAL_DNS
        )
        c.load_assignment.cluster_name = name
        for e in config.endpoints(svc, port):
            lb = c.load_assignment.endpoints.add().lb_endpoints.add()
            lb.endpoint.address.socket_address.address = e.address
            lb.endpoint.address.socket_address.port_value = e.port
            lb.load_balancing_weight.value = max(1, e.weight)
        c.dns_lookup_family = cluster_pb2.Cluster.V4_ONLY
    elif envoy and svc.resolution is Resolution.NONE and not svc.endpoints and svc.selector is None:
        c.type = cluster_pb2.Cluster.ORIGINAL_DST
        c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    else:
        c.type = cluster_pb2.Cluster.EDS
        c.eds_cluster_config.service_name = name
        c.eds_cluster_config.eds_config.CopyFrom(_ads())
        if not envoy:
            c.eds_cluster_config.eds_config.ClearField("resource_api_version")
    if svc.mesh_external:  # istiod's mark: Istio's peer_metadata filter sends no exchange
        c.metadata.filter_metadata["istio"].fields["external"].bool_value = True
    if envoy:
        c.alt_stat_name = name + ";"
        c.connect_timeout.CopyFrom(duration(10.0))
        if c.type != cluster_pb2.Cluster.ORIGINAL_DST:
            c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
        if protocol in ("GRPC", "HTTP2", "GRPC-WEB"):
            opts = http_protocol_options_pb2.HttpProtocolOptions()
            opts.explicit_http_config.http2_protocol_options.SetInParent()
            c.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(pack(opts))
    _apply_lb(c, policy, envoy)
    _apply_circuit_breakers(c, policy.connection_pool, envoy, protocol)
    if policy.outlier_detection is not None:
        _apply_outlier(c, policy.outlier_detection)
    if policy.tls is not None:
        _apply_tls(c, config, svc, policy.tls, envoy)
    if svc.selector is not None and envoy:
        # istiod: services that may send draining endpoints keep them usable for existing
        # sessions only (see core/cluster.go).
        c.common_lb_config.override_host_status.statuses.extend(
            [1, 3, 0, 5]  # HEALTHY, DRAINING, UNKNOWN, DEGRADED
        )
    return c


def _apply_lb(c: cluster_pb2.Cluster, policy: TrafficPolicy, envoy: bool) -> None:
    lb = policy.load_balancer
    if lb is None:
        return
    if lb.consistent_hash is not None:
        ch = lb.consistent_hash
        if ch.use_maglev:
            c.lb_policy = cluster_pb2.Cluster.MAGLEV
            if ch.maglev_table_size:
                c.maglev_lb_config.table_size.value = ch.maglev_table_size
        else:
            c.lb_policy = cluster_pb2.Cluster.RING_HASH
            c.ring_hash_lb_config.minimum_ring_size.value = ch.minimum_ring_size or 1024
    elif lb.simple in ("ROUND_ROBIN",):
        c.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    elif lb.simple == "LEAST_REQUEST":
        c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
    elif not envoy:
        pass  # as istiod's grpcgen: RANDOM/PASSTHROUGH are not applied to gRPC clients
    elif lb.simple == "RANDOM":
        c.lb_policy = cluster_pb2.Cluster.RANDOM
    elif lb.simple == "PASSTHROUGH" and envoy:
        c.type = cluster_pb2.Cluster.ORIGINAL_DST
        c.ClearField("eds_cluster_config")
        c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    if lb.locality is not None and lb.locality.enabled and lb.locality.distribute:
        c.common_lb_config.locality_weighted_lb_config.SetInParent()


def _apply_circuit_breakers(
    c: cluster_pb2.Cluster, pool: ConnectionPool | None, envoy: bool, protocol: str
) -> None:
    t = circuit_breaker_pb2.CircuitBreakers.Thresholds()
    t.max_connections.value = MAX_U32
    t.max_pending_requests.value = MAX_U32
    t.max_requests.value = MAX_U32
    t.max_retries.value = MAX_U32
    t.track_remaining = True
    if pool is not None:
        if pool.max_connections is not None:
            t.max_connections.value = pool.max_connections
        if pool.http1_max_pending_requests is not None:
            t.max_pending_requests.value = pool.http1_max_pending_requests
        if pool.http2_max_requests is not None:
            t.max_requests.value = pool.http2_max_requests
        if pool.max_retries is not None:
            t.max_retries.value = pool.max_retries
        if pool.connect_timeout is not None:
            c.connect_timeout.CopyFrom(duration(pool.connect_timeout))
        if envoy and (pool.idle_timeout is not None or pool.max_requests_per_connection):
            key = _HTTP_OPTIONS
            opts = http_protocol_options_pb2.HttpProtocolOptions()
            if key in c.typed_extension_protocol_options:
                c.typed_extension_protocol_options[key].Unpack(opts)
            elif protocol in ("GRPC", "HTTP2", "GRPC-WEB"):
                opts.explicit_http_config.http2_protocol_options.SetInParent()
            else:
                opts.use_downstream_protocol_config.SetInParent()
            common: protocol_pb2.HttpProtocolOptions = opts.common_http_protocol_options
            if pool.idle_timeout is not None:
                common.idle_timeout.CopyFrom(duration(pool.idle_timeout))
            if pool.max_requests_per_connection:
                common.max_requests_per_connection.value = pool.max_requests_per_connection
            c.typed_extension_protocol_options[key].CopyFrom(pack(opts))
    c.circuit_breakers.thresholds.append(t)


def _apply_outlier(c: cluster_pb2.Cluster, od: OutlierDetection) -> None:
    out = outlier_detection_pb2.OutlierDetection()
    out.enforcing_success_rate.value = 0
    if od.consecutive_errors:
        out.consecutive_gateway_failure.value = od.consecutive_errors
        out.enforcing_consecutive_gateway_failure.value = 100
        out.enforcing_consecutive_5xx.value = 0
    if od.consecutive_5xx_errors is not None:
        out.consecutive_5xx.value = od.consecutive_5xx_errors
        out.enforcing_consecutive_5xx.value = 100 if od.consecutive_5xx_errors > 0 else 0
    if od.consecutive_gateway_errors is not None:
        out.consecutive_gateway_failure.value = od.consecutive_gateway_errors
        out.enforcing_consecutive_gateway_failure.value = (
            100 if od.consecutive_gateway_errors > 0 else 0
        )
    if od.interval is not None:
        out.interval.CopyFrom(duration(od.interval))
    if od.base_ejection_time is not None:
        out.base_ejection_time.CopyFrom(duration(od.base_ejection_time))
    if od.max_ejection_percent is not None:
        out.max_ejection_percent.value = od.max_ejection_percent
    if od.split_external_local_origin_errors:
        out.split_external_local_origin_errors = True
        if od.consecutive_local_origin_failures:
            out.consecutive_local_origin_failure.value = od.consecutive_local_origin_failures
            out.enforcing_consecutive_local_origin_failure.value = 100
        out.enforcing_local_origin_success_rate.value = 0
    c.outlier_detection.CopyFrom(out)
    # Istio disables the panic threshold unless minHealthPercent says otherwise.
    c.common_lb_config.healthy_panic_threshold.CopyFrom(
        percent_pb2.Percent(value=float(od.min_health_percent or 0))
    )


def _san_matchers(config: MeshConfig, svc: ServiceSpec) -> list[string_pb2.StringMatcher]:
    out = []
    for ns_sa in config.service_accounts(svc):
        ns, sa = ns_sa.split("/", 1)
        out.append(string_pb2.StringMatcher(exact=f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}"))
    return out


def common_tls_context(
    sans: list[string_pb2.StringMatcher], *, envoy: bool
) -> tls_pb2.CommonTlsContext:
    """istiod's ISTIO_MUTUAL context: certificate-provider instance ``default`` for proxyless
    nodes (``default`` cert, ``ROOTCA`` roots), SDS secrets of the same names for Envoy."""
    ctx = tls_pb2.CommonTlsContext()
    if envoy:
        secret = secret_pb2.SdsSecretConfig(name="default")
        secret.sds_config.CopyFrom(_sds())
        ctx.tls_certificate_sds_secret_configs.append(secret)
        cvc = ctx.combined_validation_context
        cvc.default_validation_context.match_subject_alt_names.extend(sans)
        cvc.validation_context_sds_secret_config.name = "ROOTCA"
        cvc.validation_context_sds_secret_config.sds_config.CopyFrom(_sds())
        ctx.alpn_protocols.extend(["istio-peer-exchange", "istio", "h2", "http/1.1"])
        return ctx
    ctx.tls_certificate_provider_instance.CopyFrom(
        common_pb2.CertificateProviderPluginInstance(
            instance_name="default", certificate_name="default"
        )
    )
    ctx.tls_certificate_certificate_provider_instance.instance_name = "default"
    ctx.tls_certificate_certificate_provider_instance.certificate_name = "default"
    cvc = ctx.combined_validation_context
    cvc.validation_context_certificate_provider_instance.instance_name = "default"
    cvc.validation_context_certificate_provider_instance.certificate_name = "ROOTCA"
    cvc.default_validation_context.match_subject_alt_names.extend(sans)
    cvc.default_validation_context.ca_certificate_provider_instance.CopyFrom(
        common_pb2.CertificateProviderPluginInstance(
            instance_name="default", certificate_name="ROOTCA"
        )
    )
    return ctx


def _apply_tls(
    c: cluster_pb2.Cluster, config: MeshConfig, svc: ServiceSpec, tls: TLSSettings, envoy: bool
) -> None:
    ctx = tls_pb2.UpstreamTlsContext()
    if tls.mode == "DISABLE":
        return
    if tls.mode == "ISTIO_MUTUAL":
        ctx.common_tls_context.CopyFrom(common_tls_context(_san_matchers(config, svc), envoy=envoy))
        if envoy:
            ctx.sni = f"outbound_.{c.name.split('|')[1]}_.{c.name.split('|')[2]}_.{svc.hostname}"
    else:
        if not envoy:
            return  # as istiod's grpcgen: SIMPLE/MUTUAL are not sent to proxyless clients
        common = ctx.common_tls_context
        if tls.mode == "MUTUAL":
            cert = common.tls_certificates.add()
            cert.certificate_chain.filename = tls.client_certificate
            cert.private_key.filename = tls.private_key
        if tls.ca_certificates and not tls.insecure_skip_verify:
            vc = common.validation_context
            vc.trusted_ca.filename = tls.ca_certificates
            for san in tls.subject_alt_names:
                vc.match_typed_subject_alt_names.add(
                    san_type=common_pb2.SubjectAltNameMatcher.DNS,
                    matcher=string_pb2.StringMatcher(exact=san),
                )
        ctx.sni = tls.sni or svc.hostname
    c.transport_socket.name = TLS_SOCKET
    c.transport_socket.typed_config.CopyFrom(pack(ctx))
