"""Istio's resource names and small proto helpers shared by the builders."""

from __future__ import annotations

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

__all__ = [
    "INBOUND_PREFIX",
    "MAX_U32",
    "cluster_name",
    "duration",
    "pack",
    "parse_cluster_name",
]

INBOUND_PREFIX = "xds.istio.io/grpc/lds/inbound/"
MAX_U32 = 2**32 - 1


def cluster_name(port: int, subset: str, host: str) -> str:
    """``outbound|PORT|SUBSET|HOST`` (also the route configuration name, subset empty)."""
    return f"outbound|{port}|{subset}|{host}"


def parse_cluster_name(name: str) -> tuple[int, str, str] | None:
    """``(port, subset, host)`` of an ``outbound|PORT|SUBSET|HOST`` name, or ``None``."""
    parts = name.split("|")
    if len(parts) != 4 or parts[0] != "outbound" or not parts[1].isdigit() or not parts[3]:
        return None
    return int(parts[1]), parts[2], parts[3]


def pack(message: Message) -> AnyProto:
    out = AnyProto()
    out.Pack(message)
    return out


def duration(seconds: float) -> Duration:
    d = Duration()
    whole = int(seconds)
    d.seconds = whole
    d.nanos = round((seconds - whole) * 1e9)
    return d
