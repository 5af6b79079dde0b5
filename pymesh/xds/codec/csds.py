"""CSDS wire messages (``envoy.service.status.v3``): the client's view, for operators.

``encode_status_response`` turns the xDS client's per-resource statuses into a
``ClientStatusResponse`` with one ``ClientConfig`` whose ``generic_xds_configs`` list every
resource the client has subscribed to (type URL, name, version, the last accepted resource as
an ``Any``, last update time, client status REQUESTED / ACKED / NACKED / DOES_NOT_EXIST and,
after a NACK, the error state), as gRPC's CSDS service reports it (gRFC A40).
``decode_status_request`` parses a ``ClientStatusRequest``. ``resource_to_json`` renders one
serialized resource as Envoy's JSON for config dumps.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401  (registers the type)
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: F401
from envoy.config.listener.v3 import listener_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.service.status.v3 import csds_pb2
from google.protobuf import (
    any_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
)
from google.protobuf.message import DecodeError, Message

from pymesh.bootstrap import Node
from pymesh.errors import XdsError
from pymesh.xds.codec.discovery import encode_node
from pymesh.xds.resource_types import ResourceType

__all__ = [
    "CSDS_SERVICE",
    "ResourceStatusLike",
    "StatusRequest",
    "decode_status_request",
    "decode_status_response",
    "encode_status_response",
    "resource_to_json",
]

CSDS_SERVICE = "envoy.service.status.v3.ClientStatusDiscoveryService"

_CLIENT_STATUS = {
    "REQUESTED": config_dump_shared_pb2.REQUESTED,
    "ACKED": config_dump_shared_pb2.ACKED,
    "NACKED": config_dump_shared_pb2.NACKED,
    "DOES_NOT_EXIST": config_dump_shared_pb2.DOES_NOT_EXIST,
    "RECEIVED_ERROR": config_dump_shared_pb2.RECEIVED_ERROR,
    "TIMEOUT": config_dump_shared_pb2.TIMEOUT,
}


class ResourceStatusLike(Protocol):
    """What :meth:`pymesh.xds.client.XdsClient.resource_statuses` reports per resource."""

    @property
    def rtype(self) -> ResourceType: ...
    @property
    def name(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def raw(self) -> bytes | None: ...
    @property
    def last_updated(self) -> float: ...
    @property
    def error(self) -> str | None: ...
    @property
    def failed_version(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """A decoded ``ClientStatusRequest``. Node matchers are ignored, as gRPC does: this
    process has exactly one xDS client."""

    exclude_resource_contents: bool = False
    node_id: str = ""


def decode_status_request(data: bytes) -> StatusRequest:
    """Parse a serialized ``ClientStatusRequest``; ``XdsError`` if it is not one."""
    proto = csds_pb2.ClientStatusRequest()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise XdsError(f"invalid ClientStatusRequest: {exc}") from exc
    return StatusRequest(
        exclude_resource_contents=proto.exclude_resource_contents, node_id=proto.node.id
    )


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    whole = int(seconds)
    ts.seconds = whole
    ts.nanos = int((seconds - whole) * 1e9)
    return ts


def encode_status_response(
    node: Node,
    statuses: Iterable[ResourceStatusLike],
    *,
    exclude_resource_contents: bool = False,
    client_scope: str = "",
) -> bytes:
    """Serialize a ``ClientStatusResponse`` describing one xDS client."""
    config = csds_pb2.ClientConfig(client_scope=client_scope)
    config.node.CopyFrom(encode_node(node))
    ordered = sorted(statuses, key=lambda s: (s.rtype.type_url, s.name))
    for status in ordered:
        generic = config.generic_xds_configs.add(
            type_url=status.rtype.type_url,
            name=status.name,
            version_info=status.version,
            client_status=_CLIENT_STATUS.get(status.status, config_dump_shared_pb2.UNKNOWN),
        )
        if status.raw is not None and not exclude_resource_contents:
            generic.xds_config.CopyFrom(
                any_pb2.Any(type_url=status.rtype.type_url, value=status.raw)
            )
        if status.last_updated:
            generic.last_updated.CopyFrom(_timestamp(status.last_updated))
        if status.error is not None and status.status == "NACKED":
            # Only the current NACK is an error state; a later ACK supersedes an old one.
            failure = generic.error_state
            failure.details = status.error
            failure.version_info = status.failed_version or ""
            if status.last_updated:
                failure.last_update_attempt.CopyFrom(_timestamp(status.last_updated))
    response = csds_pb2.ClientStatusResponse()
    response.config.append(config)
    return bytes(response.SerializeToString())


def decode_status_response(data: bytes) -> dict[str, Any]:
    """A serialized ``ClientStatusResponse`` as Envoy's JSON (for tools and tests)."""
    proto = csds_pb2.ClientStatusResponse()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise XdsError(f"invalid ClientStatusResponse: {exc}") from exc
    return _to_dict(proto)


def _to_dict(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def resource_to_json(type_url: str, raw: bytes) -> dict[str, Any] | None:
    """Envoy's JSON for one serialized resource of ``type_url`` (``None`` if unparsable).

    ``Any`` fields inside (filters, typed configs) are rendered when their type is known to
    the protobuf runtime, and otherwise as a ``google.protobuf.Struct`` holding
    ``unknown_type`` and ``value_base64``.
    """
    message_name = type_url.rsplit("/", 1)[-1]
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(message_name)
    except KeyError:
        return None
    message = message_factory.GetMessageClass(descriptor)()
    try:
        message.ParseFromString(raw)
    except DecodeError:
        return None
    try:
        return _to_dict(message)
    except (TypeError, KeyError, ValueError):
        # An Any of a type this process does not know (Istio's private extensions, ...):
        # render it as a Struct naming the type, and everything else normally.
        _neutralize_unknown_any(message)
        return _to_dict(message)


def _neutralize_unknown_any(message: Message) -> None:
    """Replace every ``Any`` whose type is unknown here by a ``Struct`` that names it."""
    pool = descriptor_pool.Default()
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, Message)]
        else:
            items = value if _is_repeated(field) else [value]
        for item in items:
            if isinstance(item, any_pb2.Any):
                name = item.type_url.rsplit("/", 1)[-1]
                try:
                    pool.FindMessageTypeByName(name)
                except KeyError:
                    note = struct_pb2.Struct()
                    note.update(
                        {
                            "unknown_type": item.type_url,
                            "value_base64": base64.b64encode(item.value).decode(),
                        }
                    )
                    item.Pack(note)
                    continue
                inner = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))()
                if item.Unpack(inner):
                    _neutralize_unknown_any(inner)
                    item.Pack(inner)
            else:
                _neutralize_unknown_any(item)


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)
