"""ADS wire messages: requests encoded, responses decoded, Resource wrappers unwrapped."""

from __future__ import annotations

import dataclasses
import json

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, duration_pb2

from pymesh.bootstrap import Node, parse_bootstrap
from pymesh.errors import XdsError
from pymesh.xds.ads import DeltaDiscoveryRequest, DiscoveryRequest, RawResource
from pymesh.xds.codec.discovery import (
    RESOURCE_WRAPPER_TYPE_URL,
    decode_delta_response,
    decode_response,
    encode_delta_request,
    encode_request,
)

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

BOOTSTRAP = {
    "xds_servers": [{"server_uri": "127.0.0.1:15010", "channel_creds": [{"type": "insecure"}]}],
    "node": {
        "id": "sidecar~10.0.0.1~app-1.ns~ns.svc.cluster.local",
        "cluster": "app.ns",
        "locality": {"region": "eu", "zone": "eu-1a", "sub_zone": "rack7"},
        "metadata": {
            "GENERATOR": "grpc",
            "LABELS": {"app": "reviews", "version": "v1"},
            "INSTANCE_IPS": "10.0.0.1",
            "PORTS": [9080, 15021],
            "SIDECAR": False,
        },
    },
}


def node() -> Node:
    parsed = parse_bootstrap(json.dumps(BOOTSTRAP), source="test").node
    return dataclasses.replace(
        parsed, client_features=("envoy.lb.does_not_support_overprovisioning",)
    )


def test_sotw_request_with_node_and_nack_detail() -> None:
    request = DiscoveryRequest(
        type_url=CDS,
        resource_names=("a", "b"),
        version_info="v1",
        response_nonce="n2",
        error_detail="Cluster 'a': field lb_policy: unsupported",
        include_node=True,
    )
    proto = discovery_pb2.DiscoveryRequest.FromString(encode_request(request, node()))
    assert (proto.type_url, list(proto.resource_names)) == (CDS, ["a", "b"])
    assert (proto.version_info, proto.response_nonce) == ("v1", "n2")
    assert proto.error_detail.code == 3  # INVALID_ARGUMENT
    assert proto.error_detail.message == "Cluster 'a': field lb_policy: unsupported"
    n = proto.node
    assert n.id == "sidecar~10.0.0.1~app-1.ns~ns.svc.cluster.local"
    assert n.cluster == "app.ns"
    assert (n.locality.region, n.locality.zone, n.locality.sub_zone) == ("eu", "eu-1a", "rack7")
    assert n.user_agent_name == "pymesh"
    assert n.user_agent_version
    assert list(n.client_features) == [
        "envoy.lb.does_not_support_overprovisioning",
        "xds.config.resource-in-sotw",
    ]
    meta = n.metadata.fields
    assert meta["GENERATOR"].string_value == "grpc"
    assert meta["LABELS"].struct_value.fields["version"].string_value == "v1"
    assert [v.number_value for v in meta["PORTS"].list_value.values] == [9080, 15021]
    assert meta["SIDECAR"].bool_value is False


def test_ack_has_no_error_detail_and_no_node_unless_asked() -> None:
    request = DiscoveryRequest(CDS, ("a",), "v1", "n1")
    proto = discovery_pb2.DiscoveryRequest.FromString(encode_request(request, node()))
    assert not proto.HasField("error_detail")
    assert not proto.HasField("node")


def test_delta_request() -> None:
    request = DeltaDiscoveryRequest(
        type_url=CDS,
        subscribe=("a",),
        unsubscribe=("b",),
        initial_resource_versions={"a": "7"},
        response_nonce="n1",
        error_detail="bad",
        include_node=True,
    )
    proto = discovery_pb2.DeltaDiscoveryRequest.FromString(encode_delta_request(request, node()))
    assert list(proto.resource_names_subscribe) == ["a"]
    assert list(proto.resource_names_unsubscribe) == ["b"]
    assert dict(proto.initial_resource_versions) == {"a": "7"}
    assert proto.response_nonce == "n1"
    assert proto.error_detail.message == "bad"
    assert proto.node.user_agent_name == "pymesh"


def test_sotw_response_plain_and_wrapped_resources() -> None:
    wrapper = discovery_pb2.Resource(
        name="w",
        version="3",
        resource=any_pb2.Any(type_url=CDS, value=b"wrapped"),
        ttl=duration_pb2.Duration(seconds=30),
    )
    heartbeat = discovery_pb2.Resource(name="h", version="3")
    proto = discovery_pb2.DiscoveryResponse(
        type_url=CDS,
        version_info="v9",
        nonce="n9",
        resources=[
            any_pb2.Any(type_url=CDS, value=b"plain"),
            any_pb2.Any(type_url=RESOURCE_WRAPPER_TYPE_URL, value=wrapper.SerializeToString()),
            any_pb2.Any(type_url=RESOURCE_WRAPPER_TYPE_URL, value=heartbeat.SerializeToString()),
        ],
    )
    response = decode_response(proto.SerializeToString())
    assert (response.type_url, response.version_info, response.nonce) == (CDS, "v9", "n9")
    assert response.resources == (
        RawResource(type_url=CDS, data=b"plain"),
        RawResource(type_url=CDS, data=b"wrapped", name="w", version="3", ttl=30.0),
        RawResource(type_url="", data=None, name="h", version="3"),
    )


def test_delta_response() -> None:
    proto = discovery_pb2.DeltaDiscoveryResponse(
        type_url=CDS,
        system_version_info="sys",
        nonce="n1",
        resources=[
            discovery_pb2.Resource(
                name="a", version="1", resource=any_pb2.Any(type_url=CDS, value=b"x")
            )
        ],
        removed_resources=["gone"],
    )
    response = decode_delta_response(proto.SerializeToString())
    assert response.resources == (RawResource(type_url=CDS, data=b"x", name="a", version="1"),)
    assert response.removed_resources == ("gone",)
    assert (response.system_version_info, response.nonce) == ("sys", "n1")


@pytest.mark.parametrize("decode", [decode_response, decode_delta_response])
def test_garbage_is_an_xds_error(decode) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(XdsError, match="cannot parse"):
        decode(b"\xff\xff\xff\xff")
