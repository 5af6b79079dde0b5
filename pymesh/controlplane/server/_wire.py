"""Proto <-> state-machine conversions for ADS (the only protos the server core touches)."""

from __future__ import annotations

import hashlib

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from pymesh.controlplane.server._stream import Request, Resource, Response

__all__ = ["encode", "from_delta", "from_sotw", "pack"]


def from_sotw(msg: discovery_pb2.DiscoveryRequest) -> Request:
    error = (
        msg.error_detail.message or f"code {msg.error_detail.code}"
        if msg.HasField("error_detail")
        else None
    )
    return Request(
        type_url=msg.type_url,
        nonce=msg.response_nonce,
        version_info=msg.version_info,
        names=tuple(msg.resource_names),
        error=error,
    )


def from_delta(msg: discovery_pb2.DeltaDiscoveryRequest) -> Request:
    error = (
        msg.error_detail.message or f"code {msg.error_detail.code}"
        if msg.HasField("error_detail")
        else None
    )
    return Request(
        type_url=msg.type_url,
        nonce=msg.response_nonce,
        subscribe=tuple(msg.resource_names_subscribe),
        unsubscribe=tuple(msg.resource_names_unsubscribe),
        initial_versions=dict(msg.initial_resource_versions),
        error=error,
    )


def pack(msg: Message) -> tuple[any_pb2.Any, str]:
    """``msg`` as an ``Any`` and its content version (a hash of its deterministic bytes)."""
    data = msg.SerializeToString(deterministic=True)
    packed = any_pb2.Any(type_url="type.googleapis.com/" + msg.DESCRIPTOR.full_name, value=data)
    return packed, hashlib.blake2b(data, digest_size=8).hexdigest()


def encode(resp: Response, *, delta: bool) -> Message:
    out: Message
    if delta:
        out = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=resp.version,
            type_url=resp.type_url,
            nonce=resp.nonce,
            resources=[
                discovery_pb2.Resource(name=r.name, version=r.version, resource=_any(r))
                for r in resp.resources
            ],
            removed_resources=list(resp.removed),
        )
        return out
    out = discovery_pb2.DiscoveryResponse(
        version_info=resp.version,
        type_url=resp.type_url,
        nonce=resp.nonce,
        resources=[_any(r) for r in resp.resources],
    )
    return out


def _any(r: Resource) -> any_pb2.Any:
    payload = r.payload
    assert isinstance(payload, any_pb2.Any)
    return payload
