"""Seeds and mutators shared by the hypothesis tests and the atheris driver.

Seeds are the xDS fixtures of the codec tests (real istiod and grpc shapes) as serialized
protos; the mutator walks a proto and replaces field values with hostile ones (huge, empty,
negative, NaN, out-of-range enums, garbage ``Any`` payloads), so the decoders see
structurally valid messages with hostile contents, not only random bytes.
"""

from __future__ import annotations

import importlib
import math
import pathlib
import pkgutil
from collections.abc import Callable
from typing import Any

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from udpa.type.v1 import typed_struct_pb2  # noqa: F401

import pymesh.xds.codec
from pymesh.xds.resource_types import ResourceType

# The codec modules import every extension proto they decode (Any payloads in the seeds).
for _module in pkgutil.iter_modules(pymesh.xds.codec.__path__):
    importlib.import_module(f"pymesh.xds.codec.{_module.name}")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "xds"
_TYPES: dict[str, tuple[type[Message], ResourceType]] = {
    "cds": (cluster_pb2.Cluster, ResourceType.CLUSTER),
    "lds": (listener_pb2.Listener, ResourceType.LISTENER),
    "rds": (route_pb2.RouteConfiguration, ResourceType.ROUTE_CONFIGURATION),
    "eds": (endpoint_pb2.ClusterLoadAssignment, ResourceType.CLUSTER_LOAD_ASSIGNMENT),
}
# Two istiod cluster fixtures carry Istio-private Any types no public proto package has.
_UNPARSABLE = {"cds_istio_outbound_ratings.yaml", "cds_istio_outbound_reviews_v1.yaml"}


def seeds() -> dict[ResourceType, list[Message]]:
    """Parsed fixture protos per resource type."""
    out: dict[ResourceType, list[Message]] = {rt: [] for _, rt in _TYPES.values()}
    for path in sorted(FIXTURES.glob("*.yaml")):
        if path.name in _UNPARSABLE:
            continue
        cls, rt = _TYPES[path.name[:3]]
        out[rt].append(json_format.ParseDict(yaml.safe_load(path.read_text()), cls()))
    return out


HOSTILE_STRINGS = (
    "",
    "x" * 70_000,
    "\x00",
    "*",
    "..",
    "/../../etc/passwd",
    "(a+)+$",
    "(((((((((((((((((((((((((((((((((((a)))))))))))))))))))))))))))))))))))",
    "[",
    "\\",
    "%",
    "\u202e\ufeff\U0001f4a9",
    "a" * 300 + ":" + "9" * 30,
    "127.0.0.1",
    "::1",
    "outbound|0|x|",
    "type.googleapis.com/",
    "spiffe://",
)
HOSTILE_INTS = (0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1)
HOSTILE_FLOATS = (0.0, -1.0, math.nan, math.inf, -math.inf, 1e308, -1e-308)

Choose = Callable[[int], int]  # choose(n) -> an index in range(n)


def _scalar(field: FieldDescriptor, choose: Choose) -> Any:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return HOSTILE_STRINGS[choose(len(HOSTILE_STRINGS))]
    if t == FieldDescriptor.TYPE_BYTES:
        return [b"", b"\xff" * 100, b"\x0a\xff\xff\xff\xff\x0f", b"\x00" * 5][choose(4)]
    if t == FieldDescriptor.TYPE_BOOL:
        return bool(choose(2))
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return HOSTILE_FLOATS[choose(len(HOSTILE_FLOATS))]
    if t == FieldDescriptor.TYPE_ENUM:
        return [0, 1, 2, 7, 99, 2**31 - 1][choose(6)]
    unsigned = t in (
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
    )
    bits = (
        32
        if t
        in (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_SFIXED32,
        )
        else 64
    )
    lo, hi = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    fits = [v for v in HOSTILE_INTS if lo <= v <= hi]
    return fits[choose(len(fits))]


def mutate(msg: Message, choose: Choose, *, depth: int = 0, budget: list[int]) -> None:
    """Replace some set fields of ``msg`` (recursively) with hostile values.

    ``choose(n)`` is the source of decisions (hypothesis or atheris data); ``budget`` caps
    the number of edits (a one-element list, decremented).
    """
    if depth > 12 or budget[0] <= 0:
        return
    for field, value in list(msg.ListFields()):
        if budget[0] <= 0:
            return
        action = choose(6)  # 0-2 leave (recurse into messages), 3 replace, 4 clear, 5 dup
        is_msg = field.type == FieldDescriptor.TYPE_MESSAGE
        repeated = field.is_repeated
        if action == 4:
            budget[0] -= 1
            msg.ClearField(field.name)
            continue
        if is_msg and field.message_type.GetOptions().map_entry:
            continue
        if repeated:
            if action == 5 and len(value) > 0:
                budget[0] -= 1
                if is_msg:
                    value.add().CopyFrom(value[0])
                else:
                    value.append(value[0])
            elif is_msg:
                for item in value:
                    _message(item, field, choose, action, depth, budget)
            elif action == 3:
                budget[0] -= 1
                value[choose(len(value))] = _scalar(field, choose)
        elif is_msg:
            _message(value, field, choose, action, depth, budget)
        elif action == 3:
            budget[0] -= 1
            setattr(msg, field.name, _scalar(field, choose))


def _message(  # noqa: PLR0917
    value: Message,
    field: FieldDescriptor,
    choose: Choose,
    action: int,
    depth: int,
    budget: list[int],
) -> None:
    if field.message_type.full_name == "google.protobuf.Any" and action == 3:
        budget[0] -= 1
        if choose(2):
            value.value = bytes([choose(256) for _ in range(choose(40))])
        else:
            value.type_url = HOSTILE_STRINGS[choose(len(HOSTILE_STRINGS))]
        return
    mutate(value, choose, depth=depth + 1, budget=budget)


def flip_bytes(data: bytes, choose: Choose, edits: int) -> bytes:
    """Byte-level damage to a serialized message: truncate, flip, insert, delete."""
    buf = bytearray(data)
    for _ in range(edits):
        if not buf:
            break
        i = choose(len(buf))
        kind = choose(4)
        if kind == 0:
            del buf[i:]
        elif kind == 1:
            buf[i] ^= 1 << choose(8)
        elif kind == 2:
            buf[i:i] = bytes([choose(256)])
        else:
            del buf[i]
    return bytes(buf)
