"""The hub's response encoding: byte for byte what the protos' serialization gives."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, empty_pb2

from pymesh.controlplane.server._stream import Resource, Response
from pymesh.controlplane.server._wire import encode, pack

CLA = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def _messages() -> list[tuple[str, object]]:
    big = endpoint_pb2.ClusterLoadAssignment(cluster_name="x" * 300)
    for i in range(200):  # lengths past one varint byte, nested messages
        lbe = big.endpoints.add().lb_endpoints.add()
        lbe.endpoint.address.socket_address.address = f"10.0.{i // 250}.{i % 250}"
        lbe.endpoint.address.socket_address.port_value = 9000 + i
    return [
        ("big", big),
        ("cluster", cluster_pb2.Cluster(name="outbound|80||a.default.svc.cluster.local")),
        ("", empty_pb2.Empty()),  # an empty message and an empty name
    ]


def test_pack_is_a_serialized_any() -> None:
    for _, msg in _messages():
        packed, version = pack(msg)  # type: ignore[arg-type]
        want = any_pb2.Any()
        want.Pack(msg)  # type: ignore[arg-type]
        as_field = discovery_pb2.DiscoveryResponse(resources=[want])
        assert packed == as_field.SerializeToString(deterministic=True)
        assert len(version) == 16


def test_sotw_and_delta_responses_match_the_protos() -> None:
    resources = []
    for name, msg in _messages():
        packed, version = pack(msg)  # type: ignore[arg-type]
        resources.append(Resource(name, version, packed))
    for version, nonce, chosen, removed in (
        ("7", "3", resources, ("gone", "")),
        ("", "", resources[:1], ()),  # empty strings are left out, as proto3 does
        ("12", "1", [], ("a",)),
    ):
        resp = Response(CLA, version, nonce, tuple(chosen), removed=tuple(removed))
        anys = [
            discovery_pb2.DiscoveryResponse.FromString(r.payload).resources[0]  # type: ignore[arg-type]
            for r in chosen
        ]
        sotw = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=CLA, nonce=nonce, resources=anys
        )
        assert encode(resp, delta=False) == sotw.SerializeToString(deterministic=True)
        delta = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=CLA,
            nonce=nonce,
            resources=[
                discovery_pb2.Resource(name=r.name, version=r.version, resource=a)
                for r, a in zip(chosen, anys, strict=True)
            ],
            removed_resources=list(removed),
        )
        assert encode(resp, delta=True) == delta.SerializeToString(deterministic=True)
        back = discovery_pb2.DiscoveryResponse.FromString(encode(resp, delta=False))
        assert back == sotw
