"""Generated xDS resources: istiod's shapes and names, Istio's defaults, and every resource
decodes with pymesh's own validating client codec."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from pymesh.controlplane.config import ProxyNode
from pymesh.controlplane.translate import Generator
from pymesh.model.common import Locality
from pymesh.xds.codec import decode_resource
from pymesh.xds.resource_types import ResourceType
from tests.unit.controlplane._mesh import BOOKINFO, FIXTURES, load_ok

LDS = ResourceType.LISTENER.type_url
RDS = ResourceType.ROUTE_CONFIGURATION.type_url
CDS = ResourceType.CLUSTER.type_url
EDS = ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url
GRPC = ProxyNode(
    "sidecar~127.0.0.50~app.default~default.svc.cluster.local",
    "default",
    generator="grpc",
    locality=Locality("us-east", "zone-a"),
)
ENVOY = ProxyNode("envoy-1", "default")
REVIEWS = "reviews.default.svc.cluster.local"


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(load_ok(FIXTURES / "mesh-full.yaml"))


@pytest.mark.parametrize("node", [GRPC, ENVOY], ids=["grpc", "envoy"])
@pytest.mark.parametrize("type_url", [LDS, RDS, CDS, EDS])
def test_every_resource_decodes_with_pymesh_codec(
    gen: Generator, node: ProxyNode, type_url: str
) -> None:
    resources = gen.generate(node, type_url, None)
    if type_url == LDS and node is ENVOY:
        assert resources == {}  # Envoy cannot take api_listeners over LDS
        return
    assert resources
    for name, msg in resources.items():
        if isinstance(msg, cluster_pb2.Cluster) and msg.type != cluster_pb2.Cluster.EDS:
            assert node is ENVOY  # DNS clusters are for Envoy only; the client codec is EDS-only
            continue
        decoded = decode_resource(type_url, msg.SerializeToString())
        assert decoded.name == name


def test_bookinfo_resources_decode() -> None:
    config = load_ok(
        BOOKINFO / "platform" / "kube" / "bookinfo.yaml",
        BOOKINFO / "networking" / "destination-rule-all-mtls.yaml",
        BOOKINFO / "networking" / "virtual-service-reviews-jason-v2-v3.yaml",
    )
    gen = Generator(config)
    for type_url in (LDS, RDS, CDS, EDS):
        for msg in gen.generate(GRPC, type_url, None).values():
            decode_resource(type_url, msg.SerializeToString())


def test_names_are_istiod_names(gen: Generator) -> None:
    clusters = set(gen.generate(GRPC, CDS, None))
    assert {
        f"outbound|9080||{REVIEWS}",
        f"outbound|9080|v1|{REVIEWS}",
        f"outbound|9080|v2|{REVIEWS}",
        f"outbound|9090|v2|{REVIEWS}",
        "outbound|443||api.example.com",
    } <= clusters
    assert set(gen.generate(GRPC, RDS, None)) >= {f"outbound|9080||{REVIEWS}"}
    assert f"{REVIEWS}:9080" in gen.generate(GRPC, LDS, None)


def test_listener_short_names_resolve_in_node_namespace(gen: Generator) -> None:
    out = gen.generate(
        GRPC, LDS, ["reviews:9080", "reviews.default:9090", "nope:1", "10.0.0.10:9080"]
    )
    assert set(out) == {"reviews:9080", "reviews.default:9090", "10.0.0.10:9080"}
    hcm = hcm_pb2.HttpConnectionManager()
    out["reviews.default:9090"].api_listener.api_listener.Unpack(hcm)
    assert hcm.rds.route_config_name == f"outbound|9090||{REVIEWS}"
    assert hcm.rds.config_source.HasField("ads")
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    other_ns = ProxyNode("x", "other", generator="grpc")
    assert gen.generate(other_ns, LDS, ["reviews:9080"]) == {}


def test_named_cds_returns_only_requested(gen: Generator) -> None:
    wanted = [f"outbound|9080|v1|{REVIEWS}", f"outbound|9080|nope|{REVIEWS}"]
    assert list(gen.generate(GRPC, CDS, wanted)) == [wanted[0]]


def _cluster(gen: Generator, node: ProxyNode, name: str) -> cluster_pb2.Cluster:
    c = gen.generate(node, CDS, [name])[name]
    assert isinstance(c, cluster_pb2.Cluster)
    return c


def test_cluster_policy_translation(gen: Generator) -> None:
    c = _cluster(gen, GRPC, f"outbound|9080||{REVIEWS}")
    assert c.type == cluster_pb2.Cluster.EDS
    assert c.eds_cluster_config.service_name == c.name
    assert c.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    t = c.circuit_breakers.thresholds[0]
    assert (t.max_connections.value, t.max_pending_requests.value) == (100, 10)
    assert (t.max_requests.value, t.max_retries.value) == (50, 3)
    assert c.connect_timeout.ToMilliseconds() == 250
    assert c.outlier_detection.consecutive_5xx.value == 5
    assert c.outlier_detection.enforcing_consecutive_5xx.value == 100
    assert c.outlier_detection.base_ejection_time.seconds == 30
    assert c.outlier_detection.max_ejection_percent.value == 50
    # subset policy overrides the load balancer only
    v2 = _cluster(gen, GRPC, f"outbound|9080|v2|{REVIEWS}")
    assert v2.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert v2.circuit_breakers.thresholds[0].max_requests.value == 50
    # port-level settings replace the load balancer on 9090
    p9090 = _cluster(gen, GRPC, f"outbound|9090||{REVIEWS}")
    assert p9090.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert p9090.ring_hash_lb_config.minimum_ring_size.value == 2048
    maglev = _cluster(gen, GRPC, "outbound|9080||ratings.default.svc.cluster.local")
    assert maglev.lb_policy == cluster_pb2.Cluster.MAGLEV
    assert maglev.maglev_lb_config.table_size.value == 65537


def test_default_cluster_is_unlimited_round_robin_for_grpc(gen: Generator) -> None:
    c = _cluster(gen, GRPC, "outbound|443||api.example.com")
    assert c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    t = c.circuit_breakers.thresholds[0]
    assert t.max_requests.value == t.max_connections.value == 2**32 - 1
    assert not c.HasField("transport_socket")
    envoy = _cluster(gen, ENVOY, "outbound|443||api.example.com")
    assert envoy.type == cluster_pb2.Cluster.STRICT_DNS
    assert envoy.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    sa = envoy.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("api.example.com", 443)


def test_istio_mutual_uses_certificate_providers_and_spiffe_sans(gen: Generator) -> None:
    c = _cluster(gen, GRPC, f"outbound|9080||{REVIEWS}")
    assert c.transport_socket.name == "envoy.transport_sockets.tls"
    ctx = tls_pb2.UpstreamTlsContext()
    c.transport_socket.typed_config.Unpack(ctx)
    common = ctx.common_tls_context
    assert common.tls_certificate_provider_instance.instance_name == "default"
    assert common.tls_certificate_provider_instance.certificate_name == "default"
    dvc = common.combined_validation_context.default_validation_context
    assert dvc.ca_certificate_provider_instance.certificate_name == "ROOTCA"
    assert [m.exact for m in dvc.match_subject_alt_names] == [
        "spiffe://cluster.local/ns/default/sa/reviews"
    ]


def test_eds_subsets_localities_weights_and_ports(gen: Generator) -> None:
    all_eps = gen.generate(GRPC, EDS, [f"outbound|9080||{REVIEWS}"])[f"outbound|9080||{REVIEWS}"]
    by_addr = {
        lb.endpoint.address.socket_address.address: (
            lb.endpoint.address.socket_address.port_value,
            le.locality.region,
            le.priority,
        )
        for le in all_eps.endpoints
        for lb in le.lb_endpoints
    }
    # The node is in us-east/zone-a: outlier detection enables locality failover priorities.
    assert by_addr == {"127.0.0.11": (9080, "us-east", 0), "127.0.0.12": (19080, "us-west", 1)}
    v1 = gen.generate(GRPC, EDS, [f"outbound|9080|v1|{REVIEWS}"])[f"outbound|9080|v1|{REVIEWS}"]
    assert [
        lb.endpoint.address.socket_address.address for le in v1.endpoints for lb in le.lb_endpoints
    ] == ["127.0.0.11"]
    ratings = gen.generate(GRPC, EDS, None)["outbound|9080||ratings.default.svc.cluster.local"]
    weights = sorted(
        lb.load_balancing_weight.value for le in ratings.endpoints for lb in le.lb_endpoints
    )
    assert weights == [1, 3]
    assert ratings.endpoints[0].load_balancing_weight.value == 4


def test_auto_registered_workload_health(gen: Generator) -> None:
    config = gen.config
    group_entry = config.workload_entries[0]
    draining = type(group_entry)(
        name="auto-1",
        namespace="default",
        address="127.0.0.13",
        labels={"app": "reviews", "version": "v1"},
        health="DRAINING",
        auto_registered=True,
    )
    g2 = Generator(config.with_workloads([draining]))
    cla = g2.generate(GRPC, EDS, [f"outbound|9080|v1|{REVIEWS}"])[f"outbound|9080|v1|{REVIEWS}"]
    status = {
        lb.endpoint.address.socket_address.address: lb.health_status
        for le in cla.endpoints
        for lb in le.lb_endpoints
    }
    assert status == {"127.0.0.11": 1, "127.0.0.13": 3}  # HEALTHY, DRAINING
    assert len(config.workload_entries) == 2  # the original config is unchanged
