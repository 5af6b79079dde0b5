"""Proto <-> state-machine conversions for ADS (the only protos the server core touches)."""

from __future__ import annotations

import hashlib

from envoy.service.discovery.v3 import discovery_pb2
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


def pack(msg: Message) -> tuple[bytes, str]:
    """``msg`` packed in an ``Any``, as the wire bytes of a field number 2 holding it (the
    ``resources`` field of a ``DiscoveryResponse``, the ``resource`` field of a delta
    ``Resource``: either response is then a concatenation), and its content version (a hash
    of its deterministic bytes)."""
    data = msg.SerializeToString(deterministic=True)
    type_url = ("type.googleapis.com/" + msg.DESCRIPTOR.full_name).encode()
    packed = _field(1, type_url) + (_field(2, data) if data else b"")
    return _field(2, packed), hashlib.blake2b(data, digest_size=8).hexdigest()


def encode(resp: Response, *, delta: bool) -> bytes:
    """``resp`` as the wire bytes of a ``DiscoveryResponse`` (``DeltaDiscoveryResponse``),
    exactly what the message's deterministic serialization gives, built from the resources'
    already packed bytes instead of copying them into a message first."""
    parts: list[bytes] = []
    if delta:
        parts.append(_str_field(1, resp.version))  # system_version_info
        for r in resp.resources:
            resource = _str_field(1, r.version) + _payload(r) + _str_field(3, r.name)
            parts.append(_field(2, resource))
        parts.append(_str_field(4, resp.type_url))
        parts.append(_str_field(5, resp.nonce))
        parts.extend(_field(6, name.encode()) for name in resp.removed)  # removed_resources
        return b"".join(parts)
    parts.append(_str_field(1, resp.version))  # version_info
    parts.extend(_payload(r) for r in resp.resources)
    parts.append(_str_field(4, resp.type_url))
    parts.append(_str_field(5, resp.nonce))
    return b"".join(parts)


def _payload(r: Resource) -> bytes:
    payload = r.payload
    assert isinstance(payload, bytes)
    return payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (string, bytes or message), also when empty."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _str_field(number: int, text: str) -> bytes:
    """A proto3 string field: absent when empty."""
    return _field(number, text.encode()) if text else b""
