"""ProxyNode from an xDS Node (Istio metadata conventions), exportTo visibility, locality
distribution and the generator cache."""

from __future__ import annotations

from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import struct_pb2

from pymesh.controlplane.config import ProxyNode
from pymesh.controlplane.translate import Generator
from pymesh.model.common import Locality
from pymesh.xds.resource_types import ResourceType
from tests.unit.controlplane._mesh import load_ok

CDS = ResourceType.CLUSTER.type_url
EDS = ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url


def test_from_node_proto_istio_metadata() -> None:
    node = base_pb2.Node(id="sidecar~10.1.2.3~reviews-v1-abc.shop~shop.svc.cluster.local")
    node.locality.region, node.locality.zone = "us-east", "a"
    meta = struct_pb2.Struct()
    meta.update(
        {
            "GENERATOR": "grpc",
            "LABELS": {"app": "reviews", "version": "v1"},
            "SERVICE_ACCOUNT": "bookinfo-reviews",
            "INSTANCE_IPS": "10.1.2.3,fd00::3",
        }
    )
    node.metadata.CopyFrom(meta)
    p = ProxyNode.from_node_proto(node)
    assert p.proxyless and p.generator == "grpc"
    assert p.namespace == "shop"  # from the node id when NAMESPACE is absent
    assert dict(p.labels) == {"app": "reviews", "version": "v1"}
    assert p.ips == ("10.1.2.3", "fd00::3")
    assert p.service_account == "bookinfo-reviews"
    assert p.locality == Locality("us-east", "a")
    bare = ProxyNode.from_node_proto(base_pb2.Node(id="envoy-1"))
    assert (bare.namespace, bare.proxyless, bare.ips) == ("default", False, ())


MESH = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: team-a}
spec:
  hosts: [private]
  exportTo: ["."]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, locality: r1/z1}
  - {address: 127.0.0.2, locality: r1/z2}
  - {address: 127.0.0.3, locality: r2/z1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: private, namespace: team-a}
spec:
  host: private
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute:
        - from: r1/z1/*
          to: {"r1/z1/*": 80, "r1/z2/*": 20}
"""


def test_export_to_and_locality_distribute(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(MESH)
    gen = Generator(load_ok(tmp_path))
    inside = ProxyNode("a", "team-a", generator="grpc", locality=Locality("r1", "z1"))
    outside = ProxyNode("b", "team-b", generator="grpc")
    name = "outbound|80||private.team-a.svc.cluster.local"
    assert list(gen.generate(inside, CDS, None)) == [name]
    assert gen.generate(outside, CDS, None) == {}
    assert gen.generate(outside, CDS, [name]) == {}
    cla = gen.generate(inside, EDS, [name])[name]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    weights = {
        (le.locality.region, le.locality.zone): le.load_balancing_weight.value
        for le in cla.endpoints
    }
    assert weights == {("r1", "z1"): 80, ("r1", "z2"): 20}  # r2 gets 0: left out
    c = gen.generate(inside, CDS, [name])[name]
    assert c.common_lb_config.HasField("locality_weighted_lb_config")


def test_generator_cache_shares_node_classes(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(MESH)
    gen = Generator(load_ok(tmp_path))
    a = ProxyNode("a", "team-a", generator="grpc", ips=("10.0.0.1",))
    b = ProxyNode("b", "team-a", generator="grpc", ips=("10.0.0.2",))
    first = gen.generate(a, CDS, None)
    second = gen.generate(b, CDS, None)
    assert first == second
    name = next(iter(first))
    assert first[name] is second[name]  # same node class: one generation
    envoy = gen.generate(ProxyNode("c", "team-a"), CDS, None)
    assert envoy[name] is not first[name]


def test_destination_rules_for_one_host_merge_subsets(tmp_path: Path) -> None:
    extra = """\
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: private-v2, namespace: team-a}
spec:
  host: private
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets: [{name: v2, labels: {version: v2}}]
"""
    (tmp_path / "m.yaml").write_text(MESH + extra)
    config = load_ok(tmp_path)
    warnings = [i for i in config.issues if i.name == "team-a/private-v2"]
    assert [w.field for w in warnings] == ["spec.host"]
    node = ProxyNode("a", "team-a", generator="grpc")
    names = set(Generator(config).generate(node, CDS, None))
    assert "outbound|80|v2|private.team-a.svc.cluster.local" in names
