"""Table tests of the CDS decoder, a mutation property test, and real Envoy as the oracle
for the Istio-shaped fixtures."""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymesh.errors import ResourceError
from pymesh.model.cluster import (
    UNLIMITED,
    CircuitBreakers,
    Cluster,
    ClusterKind,
    DnsLookupFamily,
    LeastRequest,
    Maglev,
    OutlierDetection,
    PickFirst,
    Random,
    RetryBudget,
    RingHash,
    RoundRobin,
    UpstreamProtocol,
    WeightedRoundRobin,
    ZoneAwareLbConfig,
)
from pymesh.model.common import SocketAddress
from pymesh.model.tls import SdsSecret
from pymesh.xds.codec.cluster import decode_cluster
from tests.fixtures.xds.cds_eds_fixtures import fixture_names, load_dict, message_from_dict

NAME = "outbound|9080|v1|reviews.default.svc.cluster.local"
LB = "type.googleapis.com/envoy.extensions.load_balancing_policies"
CSWRR = f"{LB}.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TCP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions"
AGGREGATE = "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig"
STRUCT = "type.googleapis.com/google.protobuf.Struct"


def encode(data: dict[str, Any]) -> bytes:
    return message_from_dict(data, cluster_pb2.Cluster).SerializeToString()


def decode(data: dict[str, Any]) -> Cluster:
    got = decode_cluster(encode(data))
    assert isinstance(got.value, Cluster)
    assert got.name == got.value.name
    return got.value


BASE: dict[str, Any] = {
    "name": NAME,
    "type": "EDS",
    "edsClusterConfig": {"edsConfig": {"ads": {}, "resourceApiVersion": "V3"}},
    "connectTimeout": "1s",
}


def cluster(**fields: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(fields)
    return data


def policies(*typed_configs: dict[str, Any]) -> dict[str, Any]:
    return {
        "policies": [
            {"typedExtensionConfig": {"name": f"p{i}", "typedConfig": tc}}
            for i, tc in enumerate(typed_configs)
        ]
    }


STATIC_LA = {
    "clusterName": "static",
    "endpoints": [
        {
            "lbEndpoints": [
                {
                    "endpoint": {
                        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 80}}
                    }
                }
            ]
        }
    ],
}


# ----------------------------------------------------------------------------- fixtures


def test_istio_sidecar_cluster_fixture() -> None:
    c = decode(load_dict("cds_istio_outbound_reviews_v1"))
    assert c.kind is ClusterKind.EDS
    assert c.eds_service_name == NAME and c.eds_resource_name == NAME
    assert c.lb_policy == LeastRequest(2, 1.0)
    assert c.connect_timeout == 10.0
    assert c.circuit_breakers == CircuitBreakers(UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED)
    assert c.common_lb_config.locality_weighted and c.locality_weighted
    od = c.outlier_detection
    assert od is not None
    assert (od.consecutive_5xx, od.interval, od.base_ejection_time) == (7, 5.0, 15.0)
    assert (od.max_ejection_percent, od.enforcing_success_rate) == (100, 0)
    assert od.max_ejection_time == 300.0  # unset: max(300 s, base_ejection_time)
    assert od.consecutive_gateway_failure == 0 and od.consecutive_local_origin_failure == 5
    hpo = c.http_protocol_options
    assert hpo.protocol is UpstreamProtocol.USE_DOWNSTREAM
    assert (hpo.idle_timeout, hpo.max_requests_per_connection) == (3600.0, 100)
    assert c.tls is None
    assert [m.name for m in c.transport_socket_matches] == ["tlsMode-istio", "tlsMode-disabled"]
    tls = c.tls_for({"tlsMode": "istio"})
    assert tls is not None
    assert tls.sni == "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
    assert tls.common.identity == SdsSecret("default")
    assert tls.common.validation is not None and tls.common.validation.ca == SdsSecret("ROOTCA")
    assert tls.common.alpn_protocols == ("istio-peer-exchange", "istio")
    assert c.tls_for({}) is None  # plaintext for endpoints without the label
    istio = c.metadata["istio"]
    assert istio["subset"] == "v1"
    assert istio["services"][0]["host"] == "reviews.default.svc.cluster.local"


def test_istio_service_cluster_fixture() -> None:
    c = decode(load_dict("cds_istio_outbound_ratings"))
    assert c.lb_policy == RoundRobin()
    assert c.http_protocol_options.protocol is UpstreamProtocol.HTTP2
    assert c.outlier_detection is None
    assert not c.locality_weighted


def test_proxyless_grpc_fixture() -> None:
    c = decode(load_dict("cds_istio_proxyless_grpc_ratings"))
    assert c.tls is not None and c.tls_for({"tlsMode": "istio"}) is c.tls
    assert c.connect_timeout == 5.0
    assert c.circuit_breakers == CircuitBreakers()  # Envoy defaults


def test_blackhole_logical_dns_and_aggregate_fixtures() -> None:
    bh = decode(load_dict("cds_istio_blackhole"))
    assert bh.kind is ClusterKind.STATIC
    assert bh.load_assignment is not None and bh.load_assignment.localities == ()

    dns = decode(load_dict("cds_logical_dns_external"))
    assert dns.kind is ClusterKind.LOGICAL_DNS and dns.dns_lookup_family is DnsLookupFamily.V4_ONLY
    assert dns.load_assignment is not None
    assert dns.load_assignment.all_endpoints()[0].address == SocketAddress("api.example.com", 443)

    agg = decode(load_dict("cds_aggregate"))
    assert agg.kind is ClusterKind.AGGREGATE
    assert agg.aggregate_clusters == (
        "outbound|9080|v1|reviews.default.svc.cluster.local",
        "outbound|9080||reviews.default.svc.cluster.local",
    )


# ----------------------------------------------------------------------------- accepted


ACCEPTED: list[Any] = [
    pytest.param(
        cluster(),
        lambda c: c.eds_resource_name == NAME and c.eds_service_name == "",
        id="eds-name-fallback",
    ),
    pytest.param(
        cluster(edsClusterConfig={"edsConfig": {"self": {}}, "serviceName": "svc"}),
        lambda c: c.eds_resource_name == "svc",
        id="eds-self",
    ),
    pytest.param(cluster(lbPolicy="RANDOM"), lambda c: c.lb_policy == Random(), id="random"),
    pytest.param(
        cluster(
            lbPolicy="LEAST_REQUEST",
            leastRequestLbConfig={
                "choiceCount": 3,
                "activeRequestBias": {"defaultValue": 0.5, "runtimeKey": "k"},
            },
        ),
        lambda c: c.lb_policy == LeastRequest(3, 0.5),
        id="least-request-config",
    ),
    pytest.param(
        cluster(
            lbPolicy="RING_HASH", ringHashLbConfig={"minimumRingSize": 64, "maximumRingSize": 4096}
        ),
        lambda c: c.lb_policy == RingHash(64, 4096),
        id="ring-hash",
    ),
    pytest.param(
        cluster(lbPolicy="RING_HASH"),
        lambda c: c.lb_policy == RingHash(1024, 8388608),
        id="ring-hash-defaults",
    ),
    pytest.param(
        cluster(lbPolicy="MAGLEV"), lambda c: c.lb_policy == Maglev(65537), id="maglev-default"
    ),
    pytest.param(
        cluster(lbPolicy="MAGLEV", maglevLbConfig={"tableSize": 5000011}),
        lambda c: c.lb_policy == Maglev(5000011),
        id="maglev-largest-prime",
    ),
    pytest.param(
        cluster(
            lbPolicy="MAGLEV",
            loadBalancingPolicy=policies(
                {
                    "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                    "typeUrl": "type.googleapis.com/my.custom.Lb",
                    "value": {},
                },
                {"@type": f"{LB}.round_robin.v3.RoundRobin"},
            ),
        ),
        lambda c: c.lb_policy == RoundRobin(),
        id="lbp-first-supported-wins-over-lb_policy",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies(
                {
                    "@type": f"{LB}.wrr_locality.v3.WrrLocality",
                    "endpointPickingPolicy": policies(
                        {
                            "@type": f"{LB}.ring_hash.v3.RingHash",
                            "hashFunction": "XX_HASH",
                            "minimumRingSize": 10,
                        }
                    ),
                }
            )
        ),
        lambda c: c.lb_policy == RingHash(10, 8388608) and c.locality_weighted,
        id="lbp-wrr-locality-unwraps-child",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies(
                {
                    "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                    "typeUrl": f"{LB}.least_request.v3.LeastRequest",
                    "value": {"choiceCount": 4},
                }
            )
        ),
        lambda c: c.lb_policy == LeastRequest(4, 1.0),
        id="lbp-typed-struct",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies({"@type": f"{LB}.maglev.v3.Maglev", "tableSize": 1021})
        ),
        lambda c: c.lb_policy == Maglev(1021),
        id="lbp-maglev",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies(
                {
                    "@type": f"{LB}.random.v3.Random",
                    "localityLbConfig": {"localityWeightedLbConfig": {}},
                }
            )
        ),
        lambda c: c.lb_policy == Random() and c.locality_weighted,
        id="lbp-random-locality-weighted",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies(
                {"@type": f"{LB}.pick_first.v3.PickFirst", "shuffleAddressList": True}
            )
        ),
        lambda c: c.lb_policy == PickFirst(True),
        id="lbp-pick-first",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies(
                {
                    "@type": CSWRR,
                    "enableOobLoadReport": True,
                    "blackoutPeriod": "5s",
                    "weightUpdatePeriod": "0.01s",
                    "errorUtilizationPenalty": 2.0,
                }
            )
        ),
        lambda c: c.lb_policy == WeightedRoundRobin(True, 10.0, 5.0, 180.0, 0.1, 2.0),
        id="lbp-wrr-A58-clamps-update-period",
    ),
    pytest.param(
        cluster(
            outlierDetection={
                "consecutive5xx": 3,
                "consecutiveGatewayFailure": 2,
                "consecutiveLocalOriginFailure": 4,
                "splitExternalLocalOriginErrors": True,
                "interval": "2.5s",
                "baseEjectionTime": "400s",
                "maxEjectionTimeJitter": "1s",
                "maxEjectionPercent": 50,
                "enforcingConsecutive5xx": 90,
                "enforcingConsecutiveGatewayFailure": 80,
                "enforcingConsecutiveLocalOriginFailure": 70,
                "enforcingSuccessRate": 60,
                "enforcingLocalOriginSuccessRate": 50,
                "successRateMinimumHosts": 2,
                "successRateRequestVolume": 10,
                "successRateStdevFactor": 1000,
                "failurePercentageThreshold": 40,
                "enforcingFailurePercentage": 30,
                "enforcingFailurePercentageLocalOrigin": 20,
                "failurePercentageMinimumHosts": 3,
                "failurePercentageRequestVolume": 20,
                "alwaysEjectOneHost": True,
            }
        ),
        lambda c: (
            c.outlier_detection
            == OutlierDetection(
                consecutive_5xx=3,
                consecutive_gateway_failure=2,
                consecutive_local_origin_failure=4,
                split_external_local_origin_errors=True,
                interval=2.5,
                base_ejection_time=400.0,
                max_ejection_time=400.0,
                max_ejection_time_jitter=1.0,
                max_ejection_percent=50,
                enforcing_consecutive_5xx=90,
                enforcing_consecutive_gateway_failure=80,
                enforcing_consecutive_local_origin_failure=70,
                enforcing_success_rate=60,
                enforcing_local_origin_success_rate=50,
                success_rate_minimum_hosts=2,
                success_rate_request_volume=10,
                success_rate_stdev_factor=1000,
                failure_percentage_threshold=40,
                enforcing_failure_percentage=30,
                enforcing_failure_percentage_local_origin=20,
                failure_percentage_minimum_hosts=3,
                failure_percentage_request_volume=20,
                always_eject_one_host=True,
            )
        ),
        id="outlier-detection-every-field",
    ),
    pytest.param(
        cluster(outlierDetection={}),
        lambda c: c.outlier_detection == OutlierDetection(),
        id="outlier-defaults",
    ),
    pytest.param(
        cluster(
            circuitBreakers={
                "thresholds": [
                    {"priority": "HIGH", "maxRequests": 1},
                    {
                        "maxConnections": 10,
                        "maxRequests": 20,
                        "retryBudget": {"budgetPercent": {"value": 25.0}, "minRetryConcurrency": 5},
                    },
                ]
            }
        ),
        lambda c: c.circuit_breakers == CircuitBreakers(10, 1024, 20, 3, RetryBudget(25.0, 5)),
        id="circuit-breakers-default-priority",
    ),
    pytest.param(
        cluster(
            commonLbConfig={
                "healthyPanicThreshold": {"value": 0},
                "zoneAwareLbConfig": {"routingEnabled": {"value": 40}, "minClusterSize": 2},
            }
        ),
        lambda c: (
            c.common_lb_config.healthy_panic_threshold == 0.0
            and c.common_lb_config.zone_aware == ZoneAwareLbConfig(40.0, 2, False)
        ),
        id="common-lb-config",
    ),
    pytest.param(
        cluster(http2ProtocolOptions={}, maxRequestsPerConnection=7),
        lambda c: (
            c.http_protocol_options.protocol is UpstreamProtocol.HTTP2
            and c.http_protocol_options.max_requests_per_connection == 7
        ),
        id="legacy-http2-and-max-requests",
    ),
    pytest.param(
        cluster(
            typedExtensionProtocolOptions={
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": f"type.googleapis.com/{HPO}",
                    "autoConfig": {},
                },
                "envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions": {"@type": TCP_OPTIONS},
            }
        ),
        lambda c: c.http_protocol_options.protocol is UpstreamProtocol.AUTO,
        id="auto-protocol-other-options-ignored",
    ),
    pytest.param(
        cluster(
            lrsServer={"self": {}},
            lbSubsetConfig={"fallbackPolicy": "ANY_ENDPOINT"},
            healthChecks=[{"timeout": "1s", "interval": "1s", "tcpHealthCheck": {}}],
        ),
        lambda c: c.kind is ClusterKind.EDS,
        id="unimplemented-fields-ignored",
    ),
    pytest.param(
        {"name": "static", "type": "STATIC", "loadAssignment": STATIC_LA},
        lambda c: (
            c.load_assignment is not None
            and c.load_assignment.all_endpoints()[0].address == SocketAddress("127.0.0.1", 80)
        ),
        id="static",
    ),
    pytest.param(
        cluster(dnsLookupFamily="ALL"),
        lambda c: c.dns_lookup_family is DnsLookupFamily.ALL,
        id="dns-lookup-family",
    ),
]


@pytest.mark.parametrize(("data", "check"), ACCEPTED)
def test_accepted(data: dict[str, Any], check: Callable[[Cluster], bool]) -> None:
    assert check(decode(data))


# ----------------------------------------------------------------------------- rejected

LBP0 = "load_balancing_policy.policies[0].typed_extension_config.typed_config"
TS = "transport_socket"
UPSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"

REJECTED: list[Any] = [
    pytest.param(
        cluster(type="STRICT_DNS"), "type", "unsupported cluster type STRICT_DNS", id="strict-dns"
    ),
    pytest.param(
        cluster(type="ORIGINAL_DST", lbPolicy="CLUSTER_PROVIDED"),
        "type",
        "ORIGINAL_DST",
        id="original-dst",
    ),
    pytest.param(
        cluster(edsClusterConfig=None),
        "eds_cluster_config",
        "needs eds_cluster_config",
        id="eds-no-config",
    ),
    pytest.param(
        cluster(edsClusterConfig={"edsConfig": {"path": "/x"}}),
        "eds_cluster_config.eds_config",
        "must be ads or self, got path",
        id="eds-not-ads",
    ),
    pytest.param(
        cluster(
            type=None,
            clusterType={
                "name": "envoy.clusters.redis",
                "typedConfig": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {}},
            },
        ),
        "cluster_type",
        "unsupported custom cluster type 'envoy.clusters.redis'",
        id="custom-type",
    ),
    pytest.param(
        cluster(
            type=None,
            lbPolicy="CLUSTER_PROVIDED",
            clusterType={
                "name": "envoy.clusters.aggregate",
                "typedConfig": {"@type": AGGREGATE},
            },
        ),
        "cluster_type.typed_config.clusters",
        "empty",
        id="aggregate-empty",
    ),
    pytest.param(
        {
            "name": "d",
            "type": "LOGICAL_DNS",
            "loadAssignment": {"endpoints": [STATIC_LA["endpoints"][0]] * 2},
        },
        "load_assignment.endpoints",
        "exactly one locality",
        id="logical-dns-two-localities",
    ),
    pytest.param(
        {"name": "d", "type": "LOGICAL_DNS"},
        "load_assignment.endpoints",
        "exactly one locality",
        id="logical-dns-no-endpoints",
    ),
    pytest.param(
        {
            "name": "d",
            "type": "LOGICAL_DNS",
            "loadAssignment": {
                "endpoints": [{"lbEndpoints": STATIC_LA["endpoints"][0]["lbEndpoints"] * 2}]
            },
        },
        "load_assignment.endpoints[0].lb_endpoints",
        "exactly one endpoint",
        id="logical-dns-two-endpoints",
    ),
    pytest.param(
        {
            "name": "s",
            "type": "STATIC",
            "loadAssignment": {
                "endpoints": [
                    {
                        "lbEndpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socketAddress": {
                                            "address": "127.0.0.1",
                                            "portValue": 65536,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ]
            },
        },
        "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value",
        "out of range",
        id="static-bad-port",
    ),
    pytest.param(
        {
            "name": "s",
            "type": "STATIC",
            "loadAssignment": {
                "endpoints": [
                    {
                        "lbEndpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socketAddress": {"address": "localhost", "portValue": 80}
                                    }
                                }
                            }
                        ]
                    }
                ]
            },
        },
        "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address",
        "not an IP",
        id="static-hostname",
    ),
    pytest.param(cluster(name=""), "name", "empty", id="no-name"),
    pytest.param(
        cluster(lbPolicy="CLUSTER_PROVIDED"), "lb_policy", "CLUSTER_PROVIDED", id="cluster-provided"
    ),
    pytest.param(
        cluster(lbPolicy=99), "lb_policy", "unsupported lb_policy 99", id="unknown-lb-policy"
    ),
    pytest.param(
        cluster(lbPolicy="LOAD_BALANCING_POLICY_CONFIG"),
        "load_balancing_policy",
        "needs it",
        id="lbp-config-without-lbp",
    ),
    pytest.param(
        cluster(lbPolicy="RING_HASH", ringHashLbConfig={"hashFunction": "MURMUR_HASH_2"}),
        "ring_hash_lb_config.hash_function",
        "only XX_HASH",
        id="ring-hash-murmur",
    ),
    pytest.param(
        cluster(lbPolicy="RING_HASH", ringHashLbConfig={"minimumRingSize": 8388609}),
        "ring_hash_lb_config.minimum_ring_size",
        "at most 8388608",
        id="ring-min-too-big",
    ),
    pytest.param(
        cluster(lbPolicy="RING_HASH", ringHashLbConfig={"maximumRingSize": 8388609}),
        "ring_hash_lb_config.maximum_ring_size",
        "at most 8388608",
        id="ring-max-too-big",
    ),
    pytest.param(
        cluster(
            lbPolicy="RING_HASH", ringHashLbConfig={"minimumRingSize": 100, "maximumRingSize": 10}
        ),
        "ring_hash_lb_config.minimum_ring_size",
        "minimum_ring_size > maximum_ring_size",
        id="ring-min-above-max",
    ),
    pytest.param(
        cluster(lbPolicy="MAGLEV", maglevLbConfig={"tableSize": 65536}),
        "maglev_lb_config.table_size",
        "must be a prime",
        id="maglev-not-prime",
    ),
    pytest.param(
        cluster(lbPolicy="MAGLEV", maglevLbConfig={"tableSize": 5000101}),
        "maglev_lb_config.table_size",
        "must be a prime <= 5000011",
        id="maglev-too-big",
    ),
    pytest.param(
        cluster(lbPolicy="LEAST_REQUEST", leastRequestLbConfig={"choiceCount": 1}),
        "least_request_lb_config.choice_count",
        "at least 2",
        id="least-request-choice-1",
    ),
    pytest.param(
        cluster(
            lbPolicy="LEAST_REQUEST",
            leastRequestLbConfig={"activeRequestBias": {"defaultValue": -1, "runtimeKey": "k"}},
        ),
        "least_request_lb_config.active_request_bias",
        "non-negative",
        id="least-request-negative-bias",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies(
                {
                    "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                    "typeUrl": "type.googleapis.com/my.Lb",
                    "value": {},
                }
            )
        ),
        "load_balancing_policy",
        "no supported load balancing policy in ['my.Lb']",
        id="lbp-none-supported",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies(
                {"@type": f"{LB}.ring_hash.v3.RingHash", "hashFunction": "MURMUR_HASH_2"},
                {"@type": f"{LB}.round_robin.v3.RoundRobin"},
            )
        ),
        f"{LBP0}.hash_function",
        "only XX_HASH",
        id="lbp-first-supported-invalid",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies(
                {
                    "@type": f"{LB}.wrr_locality.v3.WrrLocality",
                    "endpointPickingPolicy": policies(
                        {"@type": f"{LB}.maglev.v3.Maglev", "tableSize": 4}
                    ),
                }
            )
        ),
        f"{LBP0}.endpoint_picking_policy.policies[0].typed_extension_config.typed_config.table_size",
        "prime",
        id="lbp-wrr-locality-bad-child",
    ),
    pytest.param(
        cluster(
            loadBalancingPolicy=policies(
                {
                    "@type": CSWRR,
                    "errorUtilizationPenalty": -1.0,
                }
            )
        ),
        f"{LBP0}.error_utilization_penalty",
        "non-negative",
        id="lbp-wrr-negative-penalty",
    ),
    pytest.param(
        cluster(outlierDetection={"maxEjectionPercent": 101}),
        "outlier_detection.max_ejection_percent",
        "at most 100",
        id="od-max-ejection-percent",
    ),
    pytest.param(
        cluster(outlierDetection={"enforcingSuccessRate": 150}),
        "outlier_detection.enforcing_success_rate",
        "at most 100",
        id="od-enforcing-success-rate",
    ),
    pytest.param(
        cluster(outlierDetection={"failurePercentageThreshold": 101}),
        "outlier_detection.failure_percentage_threshold",
        "at most 100",
        id="od-failure-threshold",
    ),
    pytest.param(
        cluster(outlierDetection={"enforcingFailurePercentage": 101}),
        "outlier_detection.enforcing_failure_percentage",
        "at most 100",
        id="od-enforcing-failure",
    ),
    pytest.param(
        cluster(outlierDetection={"interval": "0s"}),
        "outlier_detection.interval",
        "greater than 0",
        id="od-interval-0",
    ),
    pytest.param(
        cluster(outlierDetection={"baseEjectionTime": "-1s"}),
        "outlier_detection.base_ejection_time",
        "out of range",
        id="od-negative-duration",
    ),
    pytest.param(
        cluster(outlierDetection={"baseEjectionTime": "60s", "maxEjectionTime": "30s"}),
        "outlier_detection.max_ejection_time",
        "base_ejection_time",
        id="od-max-below-base",
    ),
    pytest.param(
        cluster(connectTimeout="0s"), "connect_timeout", "greater than 0", id="connect-timeout-0"
    ),
    pytest.param(
        cluster(
            circuitBreakers={"thresholds": [{"retryBudget": {"budgetPercent": {"value": 150}}}]}
        ),
        "circuit_breakers.thresholds[0].retry_budget.budget_percent.value",
        "[0, 100]",
        id="retry-budget-percent",
    ),
    pytest.param(
        cluster(commonLbConfig={"healthyPanicThreshold": {"value": 101}}),
        "common_lb_config.healthy_panic_threshold.value",
        "[0, 100]",
        id="panic-threshold",
    ),
    pytest.param(
        cluster(
            typedExtensionProtocolOptions={
                HPO: {
                    "@type": f"type.googleapis.com/{HPO}",
                    "explicitHttpConfig": {"http3ProtocolOptions": {}},
                }
            }
        ),
        f"typed_extension_protocol_options['{HPO}'].explicit_http_config",
        "HTTP/3",
        id="http3",
    ),
    pytest.param(
        cluster(
            typedExtensionProtocolOptions={
                HPO: {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {}}
            }
        ),
        f"typed_extension_protocol_options['{HPO}']",
        "expected envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        id="http-options-wrong-type",
    ),
    pytest.param(
        cluster(
            transportSocket={
                "name": "alts",
                "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts"
                },
            }
        ),
        f"{TS}.typed_config",
        "unsupported transport socket type",
        id="transport-socket-alts",
    ),
    pytest.param(
        cluster(transportSocket={"name": "tls", "typedConfig": {"@type": UPSTREAM}}),
        f"{TS}.typed_config.common_tls_context",
        "no root certificate source",
        id="tls-without-roots",
    ),
    pytest.param(
        cluster(
            transportSocketMatches=[
                {
                    "name": "tlsMode-istio",
                    "match": {"tlsMode": "istio"},
                    "transportSocket": {
                        "name": "tls",
                        "typedConfig": {
                            "@type": UPSTREAM,
                            "commonTlsContext": {
                                "tlsCertificates": [{}],
                                "validationContextSdsSecretConfig": {"name": "ROOTCA"},
                            },
                        },
                    },
                }
            ]
        ),
        "transport_socket_matches[0].transport_socket.typed_config.common_tls_context.tls_certificates",
        "inline certificates",
        id="tsm-inline-certificate",
    ),
    pytest.param(
        cluster(
            transportSocketMatcher={
                "onNoMatch": {
                    "action": {
                        "name": "x",
                        "typedConfig": {"@type": STRUCT, "value": {}},
                    }
                }
            }
        ),
        "transport_socket_matcher",
        "not supported",
        id="transport-socket-matcher",
    ),
    pytest.param(
        cluster(dnsLookupFamily=9),
        "dns_lookup_family",
        "unknown dns_lookup_family 9",
        id="dns-family",
    ),
]


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(("data", "field", "message"), REJECTED)
def test_rejected(data: dict[str, Any], field: str, message: str) -> None:
    data = _drop_none(data)
    with pytest.raises(ResourceError) as err:
        decode_cluster(encode(data))
    assert err.value.type_name == "Cluster"
    assert err.value.resource_name == data["name"]
    assert err.value.field == field
    assert message in err.value.message


def test_garbage_bytes() -> None:
    with pytest.raises(ResourceError) as err:
        decode_cluster(b"\x0a\xff")
    assert "cannot parse" in err.value.message


def test_nested_wrr_locality_depth_limited() -> None:
    inner: dict[str, Any] = policies({"@type": f"{LB}.round_robin.v3.RoundRobin"})
    for _ in range(20):
        inner = policies(
            {"@type": f"{LB}.wrr_locality.v3.WrrLocality", "endpointPickingPolicy": inner}
        )
    with pytest.raises(ResourceError) as err:
        decode_cluster(encode(cluster(loadBalancingPolicy=inner)))
    assert "nested deeper than 16" in err.value.message


# ----------------------------------------------------------------------------- property

SEEDS = [encode(load_dict(name)) for name in fixture_names("cds_")]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_bytes_only_raise_resource_error(data: bytes) -> None:
    try:
        got = decode_cluster(data)
    except ResourceError as err:
        assert err.type_name == "Cluster"
    else:
        assert isinstance(got.value, Cluster)


# ----------------------------------------------------------------------------- Envoy oracle

ENVOY_FIXTURES = [
    "cds_istio_outbound_reviews_v1",
    "cds_istio_outbound_ratings",
    "cds_istio_blackhole",
    "cds_logical_dns_external",
    "cds_aggregate",
]
"""The fixtures claimed to be shaped as istiod (or Envoy) accepts them."""

# Upstream Envoy lacks Istio's private extensions (istio-proxy has them): strip those.
_ISTIO_PRIVATE_KEYS = ("filters", "metadata.typedFilterMetadata")


def _for_envoy(data: dict[str, Any], eds: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for key in _ISTIO_PRIVATE_KEYS:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    if data.get("type") == "EDS":  # serve the EDS fixture inline instead of over ADS
        data["type"] = "STATIC"
        data.pop("edsClusterConfig")
        data["loadAssignment"] = {**eds, "clusterName": data["name"]}
    return data


def test_envoy_fixtures_are_decoded() -> None:
    for name in ENVOY_FIXTURES:
        decode(load_dict(name))


@pytest.mark.envoy
def test_istio_shaped_fixtures_accepted_by_envoy(envoy_bin: Path, tmp_path: Path) -> None:
    eds = load_dict("eds_istio_reviews_v1")
    clusters = [_for_envoy(load_dict(name), eds) for name in ENVOY_FIXTURES]
    clusters.append(
        {
            "name": "sds-grpc",
            "type": "STATIC",
            "typedExtensionProtocolOptions": {
                HPO: {
                    "@type": f"type.googleapis.com/{HPO}",
                    "explicitHttpConfig": {"http2ProtocolOptions": {}},
                }
            },
            "loadAssignment": {
                "clusterName": "sds-grpc",
                "endpoints": [
                    {
                        "lbEndpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "pipe": {
                                            "path": "./var/run/secrets/workload-spiffe-uds/socket"
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    bootstrap = {
        "node": {
            "id": "sidecar~10.48.0.5~productpage.default~default.svc.cluster.local",
            "cluster": "productpage.default",
        },
        "static_resources": {"clusters": clusters},
    }
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(bootstrap))
    out = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout
    # Each cluster given to Envoy (minus the private keys) is also accepted by our decoder
    # (not sds-grpc: a unix socket, which a proxyless client never dials).
    for data in clusters[:-1]:
        decode(data)


_ENVOY_BASE: dict[str, Any] = {
    "name": "c",
    "type": "STATIC",
    "connectTimeout": "1s",
    "loadAssignment": STATIC_LA,
}
_EP = STATIC_LA["endpoints"][0]["lbEndpoints"][0]


def _run_envoy_validate(envoy_bin: Path, tmp_path: Path, c: dict[str, Any]) -> bool:
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps({"static_resources": {"clusters": [c]}}))
    out = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(path), "--log-level", "critical"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode == 0


@pytest.mark.envoy
@pytest.mark.parametrize(
    "change",
    [
        pytest.param({}, id="baseline-accepted"),
        pytest.param({"lbPolicy": "MAGLEV", "maglevLbConfig": {"tableSize": 65536}}, id="maglev"),
        pytest.param(
            {
                "lbPolicy": "RING_HASH",
                "ringHashLbConfig": {"minimumRingSize": 100, "maximumRingSize": 10},
            },
            id="ring-min-above-max",
        ),
        pytest.param({"outlierDetection": {"maxEjectionPercent": 101}}, id="od-percent"),
        pytest.param(
            {"outlierDetection": {"baseEjectionTime": "60s", "maxEjectionTime": "30s"}},
            id="od-max-below-base",
        ),
        pytest.param({"connectTimeout": "0s"}, id="connect-timeout-0"),
        pytest.param(
            {"lbPolicy": "LEAST_REQUEST", "leastRequestLbConfig": {"choiceCount": 1}}, id="choice-1"
        ),
        pytest.param(
            {
                "loadAssignment": {
                    "clusterName": "c",
                    "endpoints": [{"lbEndpoints": [{**_EP, "loadBalancingWeight": 0}]}],
                }
            },
            id="endpoint-weight-0",
        ),
    ],
)
def test_agrees_with_envoy_on_validity(
    envoy_bin: Path, tmp_path: Path, change: dict[str, Any]
) -> None:
    """We accept exactly when Envoy accepts (for these Envoy-checked rules)."""
    c = {**copy.deepcopy(_ENVOY_BASE), **change}
    envoy_ok = _run_envoy_validate(envoy_bin, tmp_path, c)
    try:
        decode(c)
        ours_ok = True
    except ResourceError:
        ours_ok = False
    assert envoy_ok == ours_ok == (change == {})


def test_registered_for_the_cluster_type_url() -> None:
    from pymesh.xds.codec import decode_resource
    from pymesh.xds.resource_types import ResourceType

    got = decode_resource(ResourceType.CLUSTER.type_url, encode(load_dict("cds_aggregate")))
    assert isinstance(got.value, Cluster) and got.name == "reviews-aggregate"


@pytest.mark.parametrize("name", fixture_names("cds_"))
def test_decoded_clusters_are_hashable_and_equal_on_redecode(name: str) -> None:
    """Frozen models can key dicts and sets (metadata mappings are left out of the hash)."""
    a, b = decode(load_dict(name)), decode(load_dict(name))
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
