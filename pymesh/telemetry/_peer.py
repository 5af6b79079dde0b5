"""Peer metadata exchange, as Istio's ``istio.metadata_exchange`` HTTP filter does it.

Each side of a request tells the other who it is, so both reporters can fill the peer's
workload labels (``source_*`` on the server, ``destination_*`` on the client) even without
mTLS or endpoint metadata:

- ``x-envoy-peer-metadata-id``: the node id (``sidecar~IP~POD.NS~NS.svc.cluster.local``);
- ``x-envoy-peer-metadata``: base64 of a serialized ``google.protobuf.Struct`` holding the
  node metadata keys Istio's stats plugin reads: ``NAME``, ``NAMESPACE``, ``LABELS`` (a
  nested Struct: ``app``, ``version``, the canonical service name / revision),
  ``WORKLOAD_NAME``, ``CLUSTER_ID``, ``MESH_ID``, ``SERVICE_ACCOUNT``.

The client writes both headers on every outbound request (HTTP headers; gRPC metadata,
same keys); the server reads them into its ``source_*`` labels and answers with its own in
the response headers (gRPC: initial metadata), which the client reads into its
``destination_*`` labels. Istio's ambient mode (ztunnel / waypoints) carries the same
facts in the W3C ``baggage`` header (``k8s.namespace.name``, ``k8s.deployment.name``,
``service.name``, ``service.version``, ``k8s.cluster.name``): it is read too, never written.

The Struct is encoded and decoded here by hand (its wire format is small and fixed), so
telemetry needs no protobuf runtime: our own header is encoded once per process, and a
peer's decoded value is memoized per header value (a workload sends the same one always).
"""

from __future__ import annotations

import base64
import binascii
import struct
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pymesh.telemetry._labels import Workload

if TYPE_CHECKING:
    from pymesh.bootstrap import Node

__all__ = [
    "BAGGAGE",
    "METADATA",
    "METADATA_ID",
    "PeerDecoder",
    "decode_struct",
    "encode_struct",
    "exchange_baggage",
    "exchange_headers",
    "hide_exchange",
    "is_exchange_baggage",
    "node_exchange_metadata",
    "workload_of_baggage",
    "workload_of_metadata",
]

METADATA = "x-envoy-peer-metadata"
METADATA_ID = "x-envoy-peer-metadata-id"
BAGGAGE = "baggage"

_KEYS = (
    "NAME",
    "NAMESPACE",
    "WORKLOAD_NAME",
    "CLUSTER_ID",
    "MESH_ID",
    "SERVICE_ACCOUNT",
)
_LABEL_KEYS = (
    "app",
    "version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
)
_CANONICAL_NAME = "service.istio.io/canonical-name"
_CANONICAL_REVISION = "service.istio.io/canonical-revision"
_MAX_HEADER = 8192
"""A peer metadata header longer than this is ignored (Envoy's default header limit)."""
_MAX_MEMO = 1024


# --------------------------------------------------------------------------- wire format
# google.protobuf.Struct: map<string, Value> fields = 1 (entries: key = 1, value = 2).
# Value: null_value = 1 (varint), number_value = 2 (double), string_value = 3,
# bool_value = 4 (varint), struct_value = 5, list_value = 6 (ListValue: repeated Value = 1).


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _encode_value(value: object) -> bytes:
    if value is None:
        return _varint(1 << 3) + b"\x00"
    if isinstance(value, bool):
        return _varint(4 << 3) + (b"\x01" if value else b"\x00")
    if isinstance(value, (int, float)):
        return _varint(2 << 3 | 1) + struct.pack("<d", float(value))
    if isinstance(value, str):
        return _field(3, value.encode())
    if isinstance(value, Mapping):
        return _field(5, encode_struct(value))
    if isinstance(value, (list, tuple)):
        return _field(6, b"".join(_field(1, _encode_value(v)) for v in value))
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def encode_struct(fields: Mapping[str, object]) -> bytes:
    """``fields`` (JSON values) as a serialized ``google.protobuf.Struct`` (entries in
    key order, so the header is the same bytes every time)."""
    return b"".join(
        _field(1, _field(1, str(k).encode()) + _field(2, _encode_value(v)))
        for k, v in sorted(fields.items())
    )


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def varint(self) -> int:
        n = shift = 0
        while True:
            if self.pos >= self.end or shift > 63:
                raise ValueError("truncated varint")
            byte = self.data[self.pos]
            self.pos += 1
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return n
            shift += 7

    def fields(self) -> Any:
        """``(field number, wire type, value)``: ints for varints/fixed, a sub-reader for
        length-delimited fields."""
        while self.pos < self.end:
            tag = self.varint()
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                yield number, wire, self.varint()
            elif wire == 1:
                if self.pos + 8 > self.end:
                    raise ValueError("truncated fixed64")
                chunk = self.data[self.pos : self.pos + 8]
                self.pos += 8
                yield number, wire, chunk
            elif wire == 2:
                size = self.varint()
                if self.pos + size > self.end:
                    raise ValueError("truncated field")
                sub = _Reader(self.data, self.pos, self.pos + size)
                self.pos += size
                yield number, wire, sub
            elif wire == 5:
                self.pos += 4
                if self.pos > self.end:
                    raise ValueError("truncated fixed32")
            else:
                raise ValueError(f"unsupported wire type {wire}")

    def text(self) -> str:
        return self.data[self.pos : self.end].decode()


def _decode_value(r: _Reader, depth: int) -> object:
    out: object = None
    for number, wire, v in r.fields():
        if number == 1 and wire == 0:
            out = None
        elif number == 2 and wire == 1:
            out = struct.unpack("<d", v)[0]
        elif number == 3 and wire == 2:
            out = v.text()
        elif number == 4 and wire == 0:
            out = bool(v)
        elif number == 5 and wire == 2:
            out = _decode_struct(v, depth + 1)
        elif number == 6 and wire == 2:
            out = [_decode_value(item, depth + 1) for n, w, item in v.fields() if n == 1 and w == 2]
    return out


def _decode_struct(r: _Reader, depth: int) -> dict[str, object]:
    if depth > 16:
        raise ValueError("Struct nested too deep")
    out: dict[str, object] = {}
    for number, wire, entry in r.fields():
        if number != 1 or wire != 2:
            continue
        key = ""
        value: object = None
        for n, w, v in entry.fields():
            if n == 1 and w == 2:
                key = v.text()
            elif n == 2 and w == 2:
                value = _decode_value(v, depth)
        out[key] = value
    return out


def decode_struct(data: bytes) -> dict[str, object]:
    """A serialized ``google.protobuf.Struct`` as a dict (raises ``ValueError`` if bad)."""
    try:
        return _decode_struct(_Reader(data), 0)
    except UnicodeDecodeError as exc:
        raise ValueError(f"bad UTF-8 in Struct: {exc}") from None


# --------------------------------------------------------------------------- workloads


def node_exchange_metadata(node: Node) -> dict[str, object]:
    """What this workload tells its peers: the node metadata keys Istio exchanges."""
    meta = node.metadata
    out: dict[str, object] = {}
    for key in _KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value:
            out[key] = value
    if "NAMESPACE" not in out and node.namespace:
        out["NAMESPACE"] = node.namespace
    if "NAME" not in out and node.pod_name:
        out["NAME"] = node.pod_name
    labels = {k: v for k, v in node.labels.items() if k in _LABEL_KEYS}
    if labels:
        out["LABELS"] = labels
    return out


def exchange_headers(node: Node | None) -> tuple[tuple[str, str], ...]:
    """``(x-envoy-peer-metadata-id, x-envoy-peer-metadata)`` headers for ``node`` (none
    without a node)."""
    if node is None:
        return ()
    encoded = base64.b64encode(encode_struct(node_exchange_metadata(node))).decode("ascii")
    out = [(METADATA, encoded)]
    if node.id:
        out.insert(0, (METADATA_ID, node.id))
    return tuple(out)


def exchange_baggage(node: Node | None) -> str:
    """This workload as an ambient-style W3C ``baggage`` value (``""`` without a node)."""
    if node is None:
        return ""
    labels = node.labels
    entries = (
        ("k8s.cluster.name", node.cluster_id),
        ("k8s.namespace.name", node.namespace),
        ("k8s.deployment.name", node.workload_name),
        ("service.name", labels.get(_CANONICAL_NAME) or labels.get("app", "")),
        ("service.version", labels.get(_CANONICAL_REVISION) or labels.get("version", "")),
    )
    return ",".join(f"{k}={_baggage_escape(v)}" for k, v in entries if v)


_BAGGAGE_KEYS = frozenset(
    (
        "k8s.cluster.name",
        "k8s.namespace.name",
        "k8s.deployment.name",
        "service.name",
        "service.version",
    )
)
"""The keys of :func:`exchange_baggage`."""


def is_exchange_baggage(value: object) -> bool:
    """Whether ``value`` is a ``baggage`` a pymesh peer wrote for the exchange (only the
    keys :func:`exchange_baggage` writes)."""
    if not isinstance(value, str) or not value:
        return False
    return all(item.partition("=")[0].strip() in _BAGGAGE_KEYS for item in value.split(","))


def hide_exchange(metadata: Any) -> tuple[Any, ...] | None:
    """gRPC ``metadata`` (``(key, value)`` items) without the metadata exchange, as the
    application behind Istio's sidecar sees it: no ``x-envoy-peer-metadata`` /
    ``x-envoy-peer-metadata-id``, nor the exchange's ``baggage`` form that goes with an id
    (a ``baggage`` with other keys is the application's and stays). ``None`` when there is
    nothing to hide (the usual case: no copy)."""
    if not metadata:
        return None
    has_id = False
    found = False
    for item in metadata:
        key = item[0]
        if key == METADATA_ID:
            has_id = found = True
        elif key == METADATA:
            found = True
    if not found:
        return None
    return tuple(
        item
        for item in metadata
        if item[0] not in _EXCHANGE_KEYS
        and not (has_id and item[0] == BAGGAGE and is_exchange_baggage(item[1]))
    )


_EXCHANGE_KEYS = frozenset((METADATA, METADATA_ID))


def _baggage_escape(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-._~/" else f"%{ord(c):02X}" for c in value)


def workload_of_metadata(fields: Mapping[str, object]) -> Workload:
    """A peer's :class:`Workload` from its exchanged node metadata."""

    def text(key: str) -> str:
        value = fields.get(key)
        return value if isinstance(value, str) else ""

    raw_labels = fields.get("LABELS")
    labels = (
        {k: v for k, v in raw_labels.items() if isinstance(v, str)}
        if isinstance(raw_labels, Mapping)
        else {}
    )
    return Workload.from_node(
        workload=text("WORKLOAD_NAME") or text("NAME"),
        namespace=text("NAMESPACE"),
        labels=labels,
        cluster_id=text("CLUSTER_ID"),
    )


def workload_of_baggage(value: str) -> Workload | None:
    """A peer's :class:`Workload` from an ambient-style W3C ``baggage`` header, or ``None``
    when it names no workload."""
    entries: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if sep:
            entries[key.strip()] = urllib.parse.unquote(val.split(";", 1)[0].strip())
    workload = next(
        (
            entries[k]
            for k in (
                "k8s.deployment.name",
                "k8s.statefulset.name",
                "k8s.daemonset.name",
                "k8s.pod.name",
            )
            if entries.get(k)
        ),
        "",
    )
    if not workload and not entries.get("service.name"):
        return None
    labels = {}
    if entries.get("service.name"):
        labels["service.istio.io/canonical-name"] = entries["service.name"]
        labels["app"] = entries["service.name"]
    if entries.get("service.version"):
        labels["service.istio.io/canonical-revision"] = entries["service.version"]
        labels["version"] = entries["service.version"]
    return Workload.from_node(
        workload=workload,
        namespace=entries.get("k8s.namespace.name", ""),
        labels=labels,
        cluster_id=entries.get("k8s.cluster.name", ""),
    )


_NOBODY = Workload.from_node(workload="", namespace="", labels={}, cluster_id="")
"""What empty metadata names (treated as no peer)."""


class PeerDecoder:
    """Header value -> peer :class:`Workload`, memoized (bounded; a bad value is memoized
    as ``None`` too, so a misbehaving peer costs one lookup per request)."""

    __slots__ = ("_baggage", "_memo")

    def __init__(self) -> None:
        self._memo: dict[str, Workload | None] = {}
        self._baggage: dict[str, Workload | None] = {}

    def metadata(self, value: str | None) -> Workload | None:
        """The workload of an ``x-envoy-peer-metadata`` value (``None``: absent or bad)."""
        if not value:
            return None
        memo = self._memo
        try:
            return memo[value]
        except KeyError:
            pass
        found: Workload | None = None
        if len(value) <= _MAX_HEADER:
            try:
                fields = decode_struct(base64.b64decode(value, validate=True))
            except (ValueError, binascii.Error):
                fields = None
            if fields:
                found = workload_of_metadata(fields)
                if found == _NOBODY:
                    found = None
        if len(memo) >= _MAX_MEMO:
            memo.clear()
        memo[value] = found
        return found

    def baggage(self, value: str | None) -> Workload | None:
        """The workload of a W3C ``baggage`` value (ambient), or ``None``."""
        if not value:
            return None
        memo = self._baggage
        try:
            return memo[value]
        except KeyError:
            pass
        found = workload_of_baggage(value) if len(value) <= _MAX_HEADER else None
        if len(memo) >= _MAX_MEMO:
            memo.clear()
        memo[value] = found
        return found

    def from_headers(self, get: Any) -> Workload | None:
        """The peer of a request or response whose headers ``get(name)`` reads."""
        return self.metadata(get(METADATA)) or self.baggage(get(BAGGAGE))
