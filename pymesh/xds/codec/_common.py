"""Helpers shared by every validating decoder (LDS, RDS, CDS, EDS).

Every helper takes a :class:`Ctx` (which resource is being decoded) and the dotted ``path`` of
the field it looks at, so that a failure anywhere becomes one :class:`ResourceError` naming
the resource and the exact field, e.g.
``RouteConfiguration 'r': field virtual_hosts[0].routes[3].route.timeout: ...``.

The functions here are a stable interface: the CDS/EDS decoders use them too.
"""

from __future__ import annotations

import ipaddress
import math
import re
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.protobuf.struct_pb2 import Struct, Value

from pymesh.errors import ResourceError
from pymesh.model.common import SocketAddress
from pymesh.model.matcher import MatchKind, StringMatcher
from pymesh.model.route import CidrRange, FractionalPercent, HeaderMatcher, Int64Range

__all__ = [
    "TYPED_STRUCT_TYPE_URLS",
    "AnyConfig",
    "Ctx",
    "compile_regex",
    "decode_cidr_range",
    "decode_fractional_percent",
    "decode_header_matcher",
    "decode_percent",
    "decode_regex_matcher",
    "decode_socket_address",
    "decode_string_matcher",
    "duration",
    "freeze_json",
    "index",
    "join",
    "metadata_to_mapping",
    "optional_bool",
    "optional_duration",
    "optional_uint32",
    "parse_message",
    "struct_to_dict",
    "type_name_of",
    "unpack_any",
    "unwrap_any",
]

M = TypeVar("M", bound=Message)

# Largest Duration protobuf allows (10 000 years), see google/protobuf/duration.proto.
_MAX_DURATION_SECONDS = 315_576_000_000

TYPED_STRUCT_TYPE_URLS = frozenset(
    {
        "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type.googleapis.com/xds.type.v3.TypedStruct",
    }
)
"""``Any`` payloads that wrap another type's config as JSON (``type_url`` + ``value`` Struct)."""


@dataclass(frozen=True, slots=True)
class Ctx:
    """The resource being decoded, for error messages.

    ``type_name`` is the short type (``Listener``, ``RouteConfiguration``, ``Cluster``,
    ``ClusterLoadAssignment``); ``resource_name`` may be empty until the name is known.
    """

    type_name: str
    resource_name: str = ""

    def error(self, field: str | None, message: str) -> ResourceError:
        """Build (not raise) the error for ``field`` (dotted path; empty = the resource)."""
        return ResourceError(
            message,
            type_name=self.type_name,
            resource_name=self.resource_name,
            field=field or None,
        )

    def named(self, resource_name: str) -> Ctx:
        """The same context once the resource's name is known."""
        return Ctx(self.type_name, resource_name)


def join(path: str, name: str) -> str:
    """``join("a.b", "c") == "a.b.c"``; ``join("", "c") == "c"``."""
    return f"{path}.{name}" if path else name


def index(path: str, i: int) -> str:
    """``index("routes", 3) == "routes[3]"``."""
    return f"{path}[{i}]"


# --------------------------------------------------------------------------- parsing


def parse_message(cls: type[M], data: bytes, ctx: Ctx) -> M:
    """Parse serialized bytes as ``cls``; a parse failure is a ``ResourceError``."""
    try:
        return cls.FromString(data)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise ctx.error(None, f"cannot parse {cls.DESCRIPTOR.full_name}: {exc}") from None


def type_name_of(type_url: str) -> str:
    """The fully qualified message name of a type URL (text after the last ``/``)."""
    return type_url.rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class AnyConfig:
    """An ``Any`` with ``TypedStruct`` unwrapped.

    ``type_url`` is the effective type URL (the inner one for a ``TypedStruct``). Exactly
    one of ``value`` (serialized proto of a plain ``Any``) and ``struct`` (the JSON config
    of a ``TypedStruct``, frozen) is set.
    """

    type_url: str
    value: bytes | None = None
    struct: Mapping[str, Any] | None = None

    @property
    def type_name(self) -> str:
        return type_name_of(self.type_url)

    @property
    def is_typed_struct(self) -> bool:
        return self.struct is not None


def unwrap_any(any_msg: AnyProto, ctx: Ctx, path: str) -> AnyConfig:
    """Look through ``udpa.type.v1.TypedStruct`` / ``xds.type.v3.TypedStruct`` wrappers."""
    if any_msg.type_url in TYPED_STRUCT_TYPE_URLS:
        from xds.type.v3 import typed_struct_pb2

        # Both TypedStruct messages have the same wire shape (1: type_url, 2: value).
        ts = typed_struct_pb2.TypedStruct()
        try:
            ts.ParseFromString(any_msg.value)
        except (DecodeError, RecursionError, ValueError) as exc:
            raise ctx.error(path, f"cannot parse TypedStruct: {exc}") from None
        if not ts.type_url:
            raise ctx.error(join(path, "type_url"), "TypedStruct without type_url")
        return AnyConfig(ts.type_url, struct=freeze_json(struct_to_dict(ts.value)))
    return AnyConfig(any_msg.type_url, value=any_msg.value)


def unpack_any(any_msg: AnyProto | AnyConfig, cls: type[M], ctx: Ctx, path: str) -> M:
    """Decode an ``Any`` (plain or ``TypedStruct``-wrapped) as ``cls``.

    The type URL must name ``cls``; a ``TypedStruct``'s JSON is parsed as ``cls`` the way
    ``json_format`` would parse it.
    """
    cfg = unwrap_any(any_msg, ctx, path) if isinstance(any_msg, AnyProto) else any_msg
    want = cls.DESCRIPTOR.full_name
    if cfg.type_name != want:
        raise ctx.error(path, f"expected {want}, got type URL {cfg.type_url!r}")
    msg = cls()
    try:
        if cfg.struct is not None:
            json_format.ParseDict(_thaw(cfg.struct), msg, ignore_unknown_fields=True)
        else:
            msg.ParseFromString(cfg.value or b"")
    except (json_format.ParseError, DecodeError, RecursionError, ValueError, TypeError) as exc:
        raise ctx.error(path, f"cannot parse {want}: {exc}") from None
    return msg


# --------------------------------------------------------------------------- JSON / metadata


def struct_to_dict(struct: Struct) -> dict[str, Any]:
    """A ``google.protobuf.Struct`` as a plain ``dict`` (numbers are ``float``)."""
    return {k: _value_to_py(v) for k, v in struct.fields.items()}


def _value_to_py(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "null_value" or kind is None:
        return None
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    return [_value_to_py(v) for v in value.list_value.values]


def freeze_json(value: Any) -> Any:
    """Make a JSON-like value immutable: dicts become read-only mappings, lists tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: freeze_json(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze_json(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


_NO_METADATA: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({})


def metadata_to_mapping(metadata: base_pb2.Metadata) -> Mapping[str, Mapping[str, Any]]:
    """``core.v3.Metadata.filter_metadata`` as a frozen ``{filter: {key: json}}``.

    ``typed_filter_metadata`` is ignored (nothing we implement reads it).
    """
    if not metadata.filter_metadata:
        return _NO_METADATA
    return types.MappingProxyType(
        {name: freeze_json(struct_to_dict(s)) for name, s in metadata.filter_metadata.items()}
    )


# --------------------------------------------------------------------------- scalars


def duration(d: Duration, ctx: Ctx, path: str) -> float:
    """A ``Duration`` as float seconds; negative or out-of-range values are errors."""
    seconds, nanos = d.seconds, d.nanos
    if not 0 <= seconds <= _MAX_DURATION_SECONDS:
        raise ctx.error(path, f"duration seconds out of range: {seconds}")
    if not 0 <= nanos <= 999_999_999:
        raise ctx.error(path, f"duration nanos out of range: {nanos}")
    return seconds + nanos / 1e9


def optional_duration(msg: Message, field: str, ctx: Ctx, path: str) -> float | None:
    """``msg.<field>`` as seconds, or ``None`` when unset. ``path`` is the path of ``msg``."""
    if not msg.HasField(field):
        return None
    return duration(getattr(msg, field), ctx, join(path, field))


def optional_uint32(msg: Message, field: str) -> int | None:
    """A ``UInt32Value`` (or other wrapper) field's value, or ``None`` when unset."""
    if not msg.HasField(field):
        return None
    return int(getattr(msg, field).value)


def optional_bool(msg: Message, field: str) -> bool | None:
    """A ``BoolValue`` field's value, or ``None`` when unset."""
    if not msg.HasField(field):
        return None
    return bool(getattr(msg, field).value)


_DENOMINATORS = {
    percent_pb2.FractionalPercent.HUNDRED: 100,
    percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
    percent_pb2.FractionalPercent.MILLION: 1_000_000,
}


def decode_fractional_percent(
    fp: percent_pb2.FractionalPercent, ctx: Ctx, path: str
) -> FractionalPercent:
    """A ``FractionalPercent``; an unknown denominator is an error.

    A numerator above the denominator is kept (it means 100 %, as in Envoy).
    """
    denominator = _DENOMINATORS.get(fp.denominator)
    if denominator is None:
        raise ctx.error(join(path, "denominator"), f"unknown denominator {fp.denominator}")
    return FractionalPercent(int(fp.numerator), denominator)


def decode_percent(p: percent_pb2.Percent, ctx: Ctx, path: str) -> float:
    """A ``type.v3.Percent`` as a float in ``[0, 100]``."""
    value = p.value
    if math.isnan(value) or not 0.0 <= value <= 100.0:
        raise ctx.error(join(path, "value"), f"percent must be in [0, 100], got {value}")
    return float(value)


# --------------------------------------------------------------------------- matchers

# RE2 (what Envoy and gRPC use) rejects backreferences and lookaround; Python accepts them.
_NOT_RE2 = re.compile(r"\\[1-9]|\(\?<?[=!]|\(\?P=|\\[gk]<")


def _re2_to_python(pattern: str) -> str:
    """Rewrite the RE2 escapes Python spells differently: ``\\z`` (end of text) becomes
    ``\\Z`` and ``\\Q...\\E`` (literal text) is escaped. Other syntax is shared or fails
    to compile (e.g. ``\\pL`` Unicode classes), which the caller reports."""
    if "\\" not in pattern:
        return pattern
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch != "\\" or i + 1 == n:
            out.append(ch)
            i += 1
            continue
        nxt = pattern[i + 1]
        if nxt == "z":
            out.append("\\Z")
            i += 2
        elif nxt == "Q":
            end = pattern.find("\\E", i + 2)
            literal = pattern[i + 2 :] if end == -1 else pattern[i + 2 : end]
            out.append(re.escape(literal))
            i = n if end == -1 else end + 2
        else:
            out.append(pattern[i : i + 2])
            i += 2
    return "".join(out)


def compile_regex(pattern: str, ctx: Ctx, path: str) -> re.Pattern[str]:
    """Compile an RE2 pattern with :mod:`re`; errors and non-RE2 syntax are NACKed."""
    if _NOT_RE2.search(pattern):
        raise ctx.error(path, f"regex {pattern!r} uses syntax RE2 does not support")
    try:
        with warnings.catch_warnings():
            # e.g. "possible nested set": harmless for RE2 syntax, noisy for us.
            warnings.simplefilter("ignore", FutureWarning)
            return re.compile(_re2_to_python(pattern))
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise ctx.error(path, f"invalid regex {pattern!r}: {exc}") from None


def decode_regex_matcher(m: regex_pb2.RegexMatcher, ctx: Ctx, path: str) -> StringMatcher:
    """A ``RegexMatcher`` as a regex :class:`StringMatcher` (full-match semantics).

    ``pattern`` keeps the RE2 text; the compiled regex is its Python equivalent.
    """
    compiled = compile_regex(m.regex, ctx, join(path, "regex"))
    return StringMatcher(MatchKind.REGEX, m.regex, False, compiled)


def decode_string_matcher(m: string_pb2.StringMatcher, ctx: Ctx, path: str) -> StringMatcher:
    """A ``type.matcher.v3.StringMatcher``.

    As in gRPC: exactly one pattern must be set; prefix/suffix/contains must not be empty;
    ``ignore_case`` with ``safe_regex`` is rejected. ``custom`` matchers are unsupported.
    """
    kind = m.WhichOneof("match_pattern")
    ic = m.ignore_case
    if kind == "exact":
        return StringMatcher.exact(m.exact, ignore_case=ic)
    if kind in ("prefix", "suffix", "contains"):
        value = getattr(m, kind)
        if not value:
            raise ctx.error(join(path, kind), f"empty {kind} matcher")
        return getattr(StringMatcher, kind)(value, ignore_case=ic)  # type: ignore[no-any-return]
    if kind == "safe_regex":
        if ic:
            raise ctx.error(join(path, "ignore_case"), "ignore_case is not allowed with safe_regex")
        return decode_regex_matcher(m.safe_regex, ctx, join(path, "safe_regex"))
    if kind is None:
        raise ctx.error(path, "string matcher has no pattern")
    raise ctx.error(join(path, kind), f"unsupported string matcher {kind}")


# --------------------------------------------------------------------------- addresses


def decode_socket_address(addr: address_pb2.Address, ctx: Ctx, path: str) -> SocketAddress:
    """A ``core.v3.Address`` that must be a TCP ``socket_address`` with a numeric port."""
    kind = addr.WhichOneof("address")
    if kind != "socket_address":
        raise ctx.error(path, f"only socket_address is supported, got {kind or 'nothing'}")
    sa = addr.socket_address
    sa_path = join(path, "socket_address")
    if sa.protocol != address_pb2.SocketAddress.TCP:
        raise ctx.error(join(sa_path, "protocol"), "only TCP is supported")
    if not sa.address:
        raise ctx.error(join(sa_path, "address"), "empty address")
    if sa.WhichOneof("port_specifier") != "port_value":
        raise ctx.error(join(sa_path, "port_value"), "a numeric port_value is required")
    if sa.port_value > 65535:
        raise ctx.error(join(sa_path, "port_value"), f"port out of range: {sa.port_value}")
    return SocketAddress(sa.address, int(sa.port_value))


def decode_cidr_range(c: address_pb2.CidrRange, ctx: Ctx, path: str) -> CidrRange:
    """A ``core.v3.CidrRange``; host bits beyond ``prefix_len`` are masked and a length past
    the address size is clamped (as Envoy and gRPC do)."""
    try:
        addr = ipaddress.ip_address(c.address_prefix)
    except ValueError:
        raise ctx.error(
            join(path, "address_prefix"), f"invalid IP address {c.address_prefix!r}"
        ) from None
    prefix_len = c.prefix_len.value if c.HasField("prefix_len") else addr.max_prefixlen
    # Envoy and gRPC both accept a length past the address size: it means the full address.
    prefix_len = min(prefix_len, addr.max_prefixlen)
    return CidrRange(ipaddress.ip_network(f"{addr}/{prefix_len}", strict=False))


_LEGACY_HEADER_MATCH = {
    "exact_match": StringMatcher.exact,
    "prefix_match": StringMatcher.prefix,
    "suffix_match": StringMatcher.suffix,
    "contains_match": StringMatcher.contains,
}


def decode_header_matcher(
    m: route_components_pb2.HeaderMatcher, ctx: Ctx, path: str
) -> HeaderMatcher:
    """A ``route.v3.HeaderMatcher`` (routes, retry policies, fault and RBAC filters).

    The header name is required and lower-cased. Legacy ``*_match`` fields fold into
    ``string_match``. No matcher at all means "present" (Envoy's historical behaviour).
    """
    name = m.name.lower()
    if not name:
        raise ctx.error(join(path, "name"), "empty header name")
    kind = m.WhichOneof("header_match_specifier")
    common = {
        "invert_match": m.invert_match,
        "treat_missing_header_as_empty": m.treat_missing_header_as_empty,
    }
    if kind in _LEGACY_HEADER_MATCH:
        value = getattr(m, kind)
        if kind != "exact_match" and not value:
            raise ctx.error(join(path, kind), f"empty {kind}")
        return HeaderMatcher(name, string_match=_LEGACY_HEADER_MATCH[kind](value), **common)
    if kind == "safe_regex_match":
        rm = decode_regex_matcher(m.safe_regex_match, ctx, join(path, kind))
        return HeaderMatcher(name, string_match=rm, **common)
    if kind == "string_match":
        sm = decode_string_matcher(m.string_match, ctx, join(path, kind))
        return HeaderMatcher(name, string_match=sm, **common)
    if kind == "range_match":
        r = m.range_match
        return HeaderMatcher(name, range_match=Int64Range(r.start, r.end), **common)
    if kind == "present_match":
        return HeaderMatcher(name, present_match=m.present_match, **common)
    return HeaderMatcher(name, present_match=True, **common)
