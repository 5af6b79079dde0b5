"""ADS wire messages: encode requests, decode responses (the only proto code of the stream).

The state machine (:mod:`pymesh.xds.ads`) works with the plain dataclasses of
:mod:`pymesh.xds.ads._messages`; the transport moves bytes. This module converts between the
two: ``encode_*`` produce serialized ``DiscoveryRequest`` / ``DeltaDiscoveryRequest`` (with
the ``Node`` built from the bootstrap model on the first request of a stream, and a NACK's
``error_detail`` as a ``google.rpc.Status`` with code INVALID_ARGUMENT), ``decode_*`` parse
responses and unwrap ``envoy.service.discovery.v3.Resource`` wrappers.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from pymesh.bootstrap import Node, thaw_json
from pymesh.errors import XdsError
from pymesh.xds.ads._messages import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    RawResource,
)

__all__ = [
    "CLIENT_FEATURES",
    "RESOURCE_WRAPPER_TYPE_URL",
    "decode_delta_response",
    "decode_response",
    "encode_delta_request",
    "encode_node",
    "encode_request",
]

RESOURCE_WRAPPER_TYPE_URL = "type.googleapis.com/envoy.service.discovery.v3.Resource"

CLIENT_FEATURES = ("xds.config.resource-in-sotw",)
"""Features pymesh's client always announces (Envoy's client-feature names): it accepts
``Resource`` wrappers in SotW responses (as gRPC's clients do)."""
_INVALID_ARGUMENT = 3  # google.rpc.Code.INVALID_ARGUMENT


def encode_node(node: Node) -> base_pb2.Node:
    """The ``core.v3.Node`` proto for ``node`` (user agent "pymesh" and its version, the
    bootstrap's client features plus :data:`CLIENT_FEATURES`)."""
    proto = base_pb2.Node(
        id=node.id,
        cluster=node.cluster,
        user_agent_name=node.user_agent_name,
        user_agent_version=node.user_agent_version,
        client_features=list(dict.fromkeys((*node.client_features, *CLIENT_FEATURES))),
    )
    loc = node.locality
    if loc.region or loc.zone or loc.sub_zone:
        proto.locality.region = loc.region
        proto.locality.zone = loc.zone
        proto.locality.sub_zone = loc.sub_zone
    if node.metadata:
        metadata = struct_pb2.Struct()
        metadata.update(thaw_json(node.metadata))  # type: ignore[arg-type]
        proto.metadata.CopyFrom(metadata)
    return proto


def _status(detail: str) -> status_pb2.Status:
    return status_pb2.Status(code=_INVALID_ARGUMENT, message=detail)


def encode_request(request: DiscoveryRequest, node: Node | None) -> bytes:
    """Serialize a SotW request; ``node`` is included when ``request.include_node``."""
    proto = discovery_pb2.DiscoveryRequest(
        type_url=request.type_url,
        resource_names=list(request.resource_names),
        version_info=request.version_info,
        response_nonce=request.response_nonce,
    )
    if request.error_detail is not None:
        proto.error_detail.CopyFrom(_status(request.error_detail))
    if request.include_node and node is not None:
        proto.node.CopyFrom(encode_node(node))
    return bytes(proto.SerializeToString())


def encode_delta_request(request: DeltaDiscoveryRequest, node: Node | None) -> bytes:
    """Serialize a Delta request; ``node`` is included when ``request.include_node``."""
    proto = discovery_pb2.DeltaDiscoveryRequest(
        type_url=request.type_url,
        resource_names_subscribe=list(request.subscribe),
        resource_names_unsubscribe=list(request.unsubscribe),
        initial_resource_versions=dict(request.initial_resource_versions),
        response_nonce=request.response_nonce,
    )
    if request.error_detail is not None:
        proto.error_detail.CopyFrom(_status(request.error_detail))
    if request.include_node and node is not None:
        proto.node.CopyFrom(encode_node(node))
    return bytes(proto.SerializeToString())


def _unwrap(type_url: str, value: bytes, *, version: str = "") -> RawResource:
    """A resource ``Any``; a ``Resource`` wrapper gives its name, version, ttl and body."""
    if type_url != RESOURCE_WRAPPER_TYPE_URL:
        return RawResource(type_url=type_url, data=value, version=version)
    wrapper = discovery_pb2.Resource()
    try:
        wrapper.ParseFromString(value)
    except DecodeError:
        # Let the state machine NACK it as a bad resource of the response's type.
        return RawResource(type_url=type_url, data=value, version=version)
    ttl = wrapper.ttl.ToTimedelta().total_seconds() if wrapper.HasField("ttl") else None
    if not wrapper.HasField("resource"):
        return RawResource(
            type_url="", data=None, name=wrapper.name, version=wrapper.version, ttl=ttl
        )
    return RawResource(
        type_url=wrapper.resource.type_url,
        data=bytes(wrapper.resource.value),
        name=wrapper.name,
        version=wrapper.version or version,
        ttl=ttl,
    )


def decode_response(data: bytes) -> DiscoveryResponse:
    """Parse a serialized ``DiscoveryResponse``; ``XdsError`` if it is not one."""
    proto = discovery_pb2.DiscoveryResponse()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise XdsError(f"cannot parse DiscoveryResponse: {exc}") from exc
    return DiscoveryResponse(
        type_url=proto.type_url,
        version_info=proto.version_info,
        nonce=proto.nonce,
        resources=tuple(_unwrap(r.type_url, bytes(r.value)) for r in proto.resources),
    )


def decode_delta_response(data: bytes) -> DeltaDiscoveryResponse:
    """Parse a serialized ``DeltaDiscoveryResponse``; ``XdsError`` if it is not one."""
    proto = discovery_pb2.DeltaDiscoveryResponse()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise XdsError(f"cannot parse DeltaDiscoveryResponse: {exc}") from exc
    resources = []
    for r in proto.resources:
        ttl = r.ttl.ToTimedelta().total_seconds() if r.HasField("ttl") else None
        if r.HasField("resource"):
            resources.append(
                RawResource(
                    type_url=r.resource.type_url,
                    data=bytes(r.resource.value),
                    name=r.name,
                    version=r.version,
                    ttl=ttl,
                )
            )
        else:
            resources.append(
                RawResource(type_url="", data=None, name=r.name, version=r.version, ttl=ttl)
            )
    return DeltaDiscoveryResponse(
        type_url=proto.type_url,
        system_version_info=proto.system_version_info,
        nonce=proto.nonce,
        resources=tuple(resources),
        removed_resources=tuple(proto.removed_resources),
    )
