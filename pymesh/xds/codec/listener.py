"""LDS: validating decoder of ``envoy.config.listener.v3.Listener``.

Client side (gRFC A27/A28): ``api_listener`` holds an ``HttpConnectionManager`` whose routes
come over RDS (config source ADS or self) or inline. Server side (gRFC A36/A29/A39/A41):
``address`` plus ``filter_chains`` / ``default_filter_chain``, each chain with exactly one
network filter, an HCM, and an optional ``DownstreamTlsContext`` transport socket.

Rules that NACK (besides every sub-decoder's):

* ``api_listener`` of any type other than the v3 HCM; an HCM with ``scoped_routes``, with
  an RDS config source other than ADS/self, or without a route configuration name.
* Server listeners: missing/invalid ``address``; non-empty ``listener_filters`` or
  ``use_original_dst`` (A36); a filter chain whose filters are not exactly one HCM; two
  filter chains with the same match criteria (gRPC's overlap check).

Checked against grpcio's C-core (tests/unit/codec/test_listener.py, gRPC oracle): it NACKs
the same listeners at the same fields, except that C-core accepts ``listener_filters`` (we
keep A36's rule: chains matching on what listener filters learn would never be chosen) and
that the fault filter is accepted on server listeners here (gRPC supports it on clients
only; pymesh's server applies fault injection like Envoy's inbound sidecar does).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from pymesh.model.common import SocketAddress
from pymesh.model.listener import (
    ConnectionSourceType,
    EscapedSlashesAction,
    FilterChain,
    FilterChainMatch,
    HttpConnectionManager,
    Listener,
    PathNormalization,
)
from pymesh.xds.codec._common import (
    Ctx,
    decode_cidr_range,
    decode_socket_address,
    index,
    join,
    optional_duration,
    parse_message,
    unpack_any,
    unwrap_any,
)
from pymesh.xds.codec._registry import Decoded, register
from pymesh.xds.codec.http_filters import decode_http_filters
from pymesh.xds.codec.route import decode_route_configuration
from pymesh.xds.codec.tls import decode_downstream_transport_socket
from pymesh.xds.resource_types import ResourceType

__all__ = ["decode_http_connection_manager", "decode_listener", "decode_listener_bytes"]

_TYPE = ResourceType.LISTENER.short_name
_HCM_TYPE = hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


def decode_http_connection_manager(
    hcm: hcm_pb2.HttpConnectionManager, ctx: Ctx, path: str
) -> HttpConnectionManager:
    """An ``HttpConnectionManager`` (api_listener or a filter chain's network filter)."""
    kind = hcm.WhichOneof("route_specifier")
    rds_name = None
    route_config = None
    if kind == "rds":
        rpath = join(path, "rds")
        if not hcm.rds.route_config_name:
            raise ctx.error(join(rpath, "route_config_name"), "empty route_config_name")
        if not hcm.rds.HasField("config_source"):
            raise ctx.error(join(rpath, "config_source"), "RDS config_source is required")
        source = hcm.rds.config_source.WhichOneof("config_source_specifier")
        if source not in ("ads", "self"):
            raise ctx.error(
                join(rpath, "config_source"),
                f"RDS config_source must be ads or self, got {source or 'nothing'}",
            )
        rds_name = hcm.rds.route_config_name
    elif kind == "route_config":
        route_config = decode_route_configuration(hcm.route_config, ctx, join(path, "route_config"))
    elif kind is None:
        raise ctx.error(path, "HttpConnectionManager needs rds or route_config")
    else:
        raise ctx.error(join(path, kind), f"{kind} is not supported")
    max_stream_duration = None
    if hcm.HasField("common_http_protocol_options"):
        max_stream_duration = optional_duration(
            hcm.common_http_protocol_options,
            "max_stream_duration",
            ctx,
            join(path, "common_http_protocol_options"),
        )
    return HttpConnectionManager(
        http_filters=decode_http_filters(hcm.http_filters, ctx, join(path, "http_filters")),
        path_normalization=_path_normalization(hcm, ctx, path),
        rds_name=rds_name,
        route_config=route_config,
        max_stream_duration=max_stream_duration,
        stream_idle_timeout=optional_duration(hcm, "stream_idle_timeout", ctx, path),
        request_timeout=optional_duration(hcm, "request_timeout", ctx, path),
    )


def _path_normalization(
    hcm: hcm_pb2.HttpConnectionManager, ctx: Ctx, path: str
) -> PathNormalization:
    action = hcm.path_with_escaped_slashes_action
    try:
        escaped = EscapedSlashesAction(action)
    except ValueError:
        raise ctx.error(
            join(path, "path_with_escaped_slashes_action"), f"unknown action {action}"
        ) from None
    normalize = hcm.normalize_path.value if hcm.HasField("normalize_path") else True
    if normalize and escaped is _DEFAULT_ESCAPES and not hcm.merge_slashes:
        return _BASE  # the common case: one shared value
    return PathNormalization(normalize, hcm.merge_slashes, escaped)


_DEFAULT_ESCAPES = EscapedSlashesAction.IMPLEMENTATION_SPECIFIC_DEFAULT
_BASE = PathNormalization()


def _filter_chain_match(m: lc.FilterChainMatch, ctx: Ctx, path: str) -> FilterChainMatch:
    try:
        source_type = ConnectionSourceType(m.source_type)
    except ValueError:
        raise ctx.error(join(path, "source_type"), f"unknown source_type {m.source_type}") from None
    ports = []
    for i, p in enumerate(m.source_ports):
        if p > 65535:
            raise ctx.error(index(join(path, "source_ports"), i), f"port out of range: {p}")
        ports.append(int(p))
    dst_port = m.destination_port.value if m.HasField("destination_port") else None
    if dst_port is not None and not 1 <= dst_port <= 65535:
        raise ctx.error(join(path, "destination_port"), f"port out of range: {dst_port}")
    return FilterChainMatch(
        destination_port=dst_port,
        prefix_ranges=tuple(
            decode_cidr_range(c, ctx, index(join(path, "prefix_ranges"), i))
            for i, c in enumerate(m.prefix_ranges)
        ),
        source_type=source_type,
        source_prefix_ranges=tuple(
            decode_cidr_range(c, ctx, index(join(path, "source_prefix_ranges"), i))
            for i, c in enumerate(m.source_prefix_ranges)
        ),
        source_ports=tuple(ports),
        transport_protocol=m.transport_protocol,
        application_protocols=tuple(m.application_protocols),
        server_names=tuple(m.server_names),
    )


def _filter_chain(fc: lc.FilterChain, ctx: Ctx, path: str) -> FilterChain:
    match = _filter_chain_match(fc.filter_chain_match, ctx, join(path, "filter_chain_match"))
    hcm = None
    fpath = join(path, "filters")
    for i, f in enumerate(fc.filters):
        ipath = index(fpath, i)
        if f.WhichOneof("config_type") != "typed_config":
            raise ctx.error(ipath, f"network filter {f.name!r} has no typed_config")
        tpath = join(ipath, "typed_config")
        cfg = unwrap_any(f.typed_config, ctx, tpath)
        if cfg.type_name != _HCM_TYPE:
            raise ctx.error(tpath, f"unsupported network filter type {cfg.type_url!r}")
        if hcm is not None:
            raise ctx.error(ipath, "more than one HttpConnectionManager in a filter chain")
        msg = unpack_any(cfg, hcm_pb2.HttpConnectionManager, ctx, tpath)
        hcm = decode_http_connection_manager(msg, ctx, tpath)
    if hcm is None:
        raise ctx.error(fpath, "filter chain has no HttpConnectionManager")
    tls = None
    if fc.HasField("transport_socket"):
        tls = decode_downstream_transport_socket(
            fc.transport_socket, ctx, join(path, "transport_socket")
        )
    return FilterChain(name=fc.name, match=match, hcm=hcm, tls=tls)


def _check_overlap(chains: Iterable[FilterChain], ctx: Ctx) -> None:
    """gRPC NACKs two chains that match exactly the same connections; so do we. Each chain
    is expanded to its (destination prefix, source type, source prefix, source port)
    combinations; a combination claimed twice is an overlap."""
    seen: dict[tuple[object, ...], int] = {}
    for i, fc in enumerate(chains):
        m = fc.match
        if not m.grpc_matchable:
            continue  # never selected by gRPC's matcher: no ambiguity
        dst = [str(c) for c in m.prefix_ranges] or [""]
        src = [str(c) for c in m.source_prefix_ranges] or [""]
        ports: list[int] = list(m.source_ports) or [0]
        for key in itertools.product(dst, [m.source_type.value], src, ports):
            if key in seen:
                raise ctx.error(
                    index("filter_chains", i),
                    f"filter chain match overlaps filter_chains[{seen[key]}]",
                )
            seen[key] = i


def _server_address(lst: listener_pb2.Listener, ctx: Ctx) -> SocketAddress:
    if not lst.HasField("address"):
        raise ctx.error("address", "a server listener needs an address")
    return decode_socket_address(lst.address, ctx, "address")


def decode_listener(lst: listener_pb2.Listener, ctx: Ctx) -> Listener:
    """Decode a parsed ``Listener`` (``ctx`` already carries its name)."""
    if lst.HasField("api_listener"):
        path = "api_listener.api_listener"
        cfg = unwrap_any(lst.api_listener.api_listener, ctx, path)
        if cfg.type_name != _HCM_TYPE:
            raise ctx.error(path, f"api_listener must be an HCM, got {cfg.type_url!r}")
        msg = unpack_any(cfg, hcm_pb2.HttpConnectionManager, ctx, path)
        hcm = decode_http_connection_manager(msg, ctx, path)
        address = None
        if lst.address.WhichOneof("address") == "socket_address":
            sa = lst.address.socket_address
            if sa.WhichOneof("port_specifier") == "port_value" and sa.port_value <= 65535:
                address = SocketAddress(sa.address, int(sa.port_value))
        return Listener(name=lst.name, address=address, api_listener=hcm)

    address = _server_address(lst, ctx)
    if lst.listener_filters:
        raise ctx.error("listener_filters", "listener filters are not supported (gRFC A36)")
    if lst.HasField("use_original_dst") and lst.use_original_dst.value:
        raise ctx.error("use_original_dst", "use_original_dst is not supported (gRFC A36)")
    chains = tuple(
        _filter_chain(fc, ctx, index("filter_chains", i)) for i, fc in enumerate(lst.filter_chains)
    )
    _check_overlap(chains, ctx)
    default = None
    if lst.HasField("default_filter_chain"):
        default = _filter_chain(lst.default_filter_chain, ctx, "default_filter_chain")
    if not chains and default is None:
        # gRPC names the missing default chain; so do we.
        raise ctx.error(
            "default_filter_chain", "a server listener needs filter_chains or a default chain"
        )
    return Listener(
        name=lst.name, address=address, filter_chains=chains, default_filter_chain=default
    )


def decode_listener_bytes(data: bytes) -> Listener:
    """Parse and validate a serialized ``Listener``."""
    ctx = Ctx(_TYPE)
    msg = parse_message(listener_pb2.Listener, data, ctx)
    if not msg.name:
        raise ctx.error("name", "empty resource name")
    return decode_listener(msg, ctx.named(msg.name))


@register(ResourceType.LISTENER)
def _decode(data: bytes) -> Decoded:
    value = decode_listener_bytes(data)
    return Decoded(value.name, value)
