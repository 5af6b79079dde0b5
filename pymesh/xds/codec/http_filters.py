"""HTTP filters: the registry of filter types we understand, and their decoders (gRFC A39).

A filter type registers its top-level config parser and (optionally) its per-route override
parser by proto message name. Checking config here is separate from building the runtime
object: the policy core reads the frozen models.

Rules (A39):

* ``http_filters`` must be non-empty, names unique and non-empty, and the last filter (and
  only the last) must be terminal (the router).
* An unknown filter type is an error unless the filter ``is_optional``; optional unknown
  filters are dropped.
* A ``typed_per_filter_config`` entry of an unknown type is an error unless it is wrapped in
  ``envoy.config.route.v3.FilterConfig`` with ``is_optional: true`` (then it is dropped).
* ``TypedStruct`` wrappers are looked through: the inner type URL decides.

Besides router, fault and RBAC, a few types are *recognised but not run* and recorded as
:class:`OpaqueConfig`: they only feed telemetry or browser-side behaviour (Istio's
``istio.*`` / ``io.istio.*`` / ``stats.PluginConfig`` extensions, ``grpc_stats``, CORS) or
a feature implemented elsewhere later (``stateful_session``), so skipping them never
changes which requests are allowed. Everything else (``ext_authz``, ``wasm``, ...) is
unknown: NACKed unless optional.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.any_pb2 import Any as AnyProto

from pymesh.model.http_filters import (
    AndRule,
    AnyRule,
    AuthenticatedPrincipal,
    DestinationIp,
    DestinationPort,
    DestinationPortRange,
    FaultAbort,
    FaultConfig,
    FaultDelay,
    HeaderRule,
    HttpFilter,
    IpRule,
    IpSource,
    MetadataRule,
    NotRule,
    OrRule,
    Permission,
    Principal,
    RbacAction,
    RbacConfig,
    RbacPerRoute,
    RbacPolicy,
    RbacRules,
    RequestedServerName,
    RouterConfig,
    UrlPathRule,
)
from pymesh.model.route import FilterConfigOverride, FractionalPercent, OpaqueConfig
from pymesh.xds.codec._common import (
    AnyConfig,
    Ctx,
    decode_cidr_range,
    decode_fractional_percent,
    decode_header_matcher,
    decode_string_matcher,
    duration,
    index,
    join,
    unpack_any,
    unwrap_any,
)

__all__ = [
    "FilterType",
    "decode_fault",
    "decode_filter_overrides",
    "decode_http_filters",
    "decode_rbac",
    "decode_rbac_per_route",
    "decode_router",
    "filter_type",
]

_Parser = Callable[[AnyConfig, Ctx, str], object]


@dataclass(frozen=True, slots=True)
class FilterType:
    """What we know about one HTTP filter type."""

    type_name: str
    parse: _Parser
    terminal: bool = False
    override_type_names: tuple[str, ...] = ()
    parse_override: _Parser | None = None


_TYPES: dict[str, FilterType] = {}
_OVERRIDES: dict[str, FilterType] = {}


def _register(ft: FilterType) -> None:
    _TYPES[ft.type_name] = ft
    for name in ft.override_type_names:
        _OVERRIDES[name] = ft


def filter_type(type_name: str) -> FilterType | None:
    """The registered filter type for a top-level config message name."""
    return _TYPES.get(type_name)


# --------------------------------------------------------------------------- router


def decode_router(cfg: AnyConfig, ctx: Ctx, path: str) -> RouterConfig:
    msg = unpack_any(cfg, router_pb2.Router, ctx, path)
    return RouterConfig(
        suppress_envoy_headers=msg.suppress_envoy_headers,
        start_child_span=msg.start_child_span,
        respect_expected_rq_timeout=msg.respect_expected_rq_timeout,
    )


# --------------------------------------------------------------------------- fault


def _percentage(msg: object, ctx: Ctx, path: str) -> FractionalPercent:
    # Envoy: an unset percentage is the proto default, 0/100.
    if not msg.HasField("percentage"):  # type: ignore[attr-defined]
        return FractionalPercent(0, 100)
    return decode_fractional_percent(msg.percentage, ctx, join(path, "percentage"))  # type: ignore[attr-defined]


def _decode_fault_msg(msg: fault_pb2.HTTPFault, ctx: Ctx, path: str) -> FaultConfig:
    delay = None
    if msg.HasField("delay"):
        d, dpath = msg.delay, join(path, "delay")
        kind = d.WhichOneof("fault_delay_secifier")
        if kind == "fixed_delay":
            delay = FaultDelay(
                _percentage(d, ctx, dpath),
                fixed_delay=duration(d.fixed_delay, ctx, join(dpath, "fixed_delay")),
            )
        elif kind == "header_delay":
            delay = FaultDelay(_percentage(d, ctx, dpath), header_delay=True)
        else:
            raise ctx.error(dpath, "delay needs fixed_delay or header_delay")
    abort = None
    if msg.HasField("abort"):
        a, apath = msg.abort, join(path, "abort")
        kind = a.WhichOneof("error_type")
        pct = _percentage(a, ctx, apath)
        if kind == "http_status":
            if not 200 <= a.http_status < 600:
                raise ctx.error(
                    join(apath, "http_status"), f"HTTP status {a.http_status} not in [200, 600)"
                )
            abort = FaultAbort(pct, http_status=a.http_status)
        elif kind == "grpc_status":
            # Any number, as in Envoy: it is sent as the grpc-status trailer verbatim.
            abort = FaultAbort(pct, grpc_status=a.grpc_status)
        elif kind == "header_abort":
            abort = FaultAbort(pct, header_abort=True)
        else:
            raise ctx.error(apath, "abort needs http_status, grpc_status or header_abort")
    headers = tuple(
        decode_header_matcher(h, ctx, index(join(path, "headers"), i))
        for i, h in enumerate(msg.headers)
    )
    return FaultConfig(
        delay=delay,
        abort=abort,
        upstream_cluster=msg.upstream_cluster,
        downstream_nodes=tuple(msg.downstream_nodes),
        headers=headers,
        max_active_faults=msg.max_active_faults.value
        if msg.HasField("max_active_faults")
        else None,
        disable_downstream_cluster_stats=msg.disable_downstream_cluster_stats,
    )


def decode_fault(cfg: AnyConfig, ctx: Ctx, path: str) -> FaultConfig:
    """``HTTPFault`` (the filter config and its per-route override share the message)."""
    return _decode_fault_msg(unpack_any(cfg, fault_pb2.HTTPFault, ctx, path), ctx, path)


# --------------------------------------------------------------------------- RBAC

# Bounds recursion on hostile input; protobuf itself caps nesting at 100 levels.
_MAX_RULE_DEPTH = 100


def _rbac_header(m: route_components_pb2.HeaderMatcher, ctx: Ctx, path: str) -> HeaderRule:
    name = m.name.lower()
    # A41: grpc-* headers and :scheme are not visible to RBAC; refuse rather than mis-match.
    if name.startswith("grpc-") or name == ":scheme":
        raise ctx.error(join(path, "name"), f"RBAC cannot match header {m.name!r}")
    return HeaderRule(decode_header_matcher(m, ctx, path))


def _url_path(m: object, ctx: Ctx, path: str) -> UrlPathRule:
    if m.WhichOneof("rule") != "path":  # type: ignore[attr-defined]
        raise ctx.error(join(path, "path"), "url_path needs a path matcher")
    return UrlPathRule(decode_string_matcher(m.path, ctx, join(path, "path")))  # type: ignore[attr-defined]


def _permission(p: rbac_config_pb2.Permission, ctx: Ctx, path: str, depth: int) -> Permission:
    if depth > _MAX_RULE_DEPTH:
        raise ctx.error(path, "permission nested too deeply")
    kind = p.WhichOneof("rule")
    sub = join(path, kind or "rule")
    if kind in ("and_rules", "or_rules"):
        rules = tuple(
            _permission(r, ctx, index(join(sub, "rules"), i), depth + 1)
            for i, r in enumerate(getattr(p, kind).rules)
        )
        return AndRule(rules) if kind == "and_rules" else OrRule(rules)
    if kind == "any":
        if not p.any:
            raise ctx.error(sub, "any must be true")
        return AnyRule()
    if kind == "not_rule":
        return NotRule(_permission(p.not_rule, ctx, sub, depth + 1))
    if kind == "header":
        return _rbac_header(p.header, ctx, sub)
    if kind == "url_path":
        return _url_path(p.url_path, ctx, sub)
    if kind == "destination_ip":
        return DestinationIp(decode_cidr_range(p.destination_ip, ctx, sub))
    if kind == "destination_port":
        if p.destination_port > 65535:
            raise ctx.error(sub, f"port out of range: {p.destination_port}")
        return DestinationPort(p.destination_port)
    if kind == "destination_port_range":
        r = p.destination_port_range
        if r.start >= r.end:
            raise ctx.error(sub, f"empty port range [{r.start}, {r.end})")
        return DestinationPortRange(r.start, r.end)
    if kind == "metadata":
        return MetadataRule(p.metadata.filter, p.metadata.invert)
    if kind == "requested_server_name":
        return RequestedServerName(decode_string_matcher(p.requested_server_name, ctx, sub))
    if kind is None:
        raise ctx.error(path, "permission has no rule")
    raise ctx.error(sub, f"unsupported RBAC permission {kind}")


_IP_SOURCES = {
    "source_ip": IpSource.SOURCE_IP,
    "direct_remote_ip": IpSource.DIRECT_REMOTE_IP,
    "remote_ip": IpSource.REMOTE_IP,
}


def _principal(p: rbac_config_pb2.Principal, ctx: Ctx, path: str, depth: int) -> Principal:
    if depth > _MAX_RULE_DEPTH:
        raise ctx.error(path, "principal nested too deeply")
    kind = p.WhichOneof("identifier")
    sub = join(path, kind or "identifier")
    if kind in ("and_ids", "or_ids"):
        ids = tuple(
            _principal(r, ctx, index(join(sub, "ids"), i), depth + 1)
            for i, r in enumerate(getattr(p, kind).ids)
        )
        return AndRule(ids) if kind == "and_ids" else OrRule(ids)
    if kind == "any":
        if not p.any:
            raise ctx.error(sub, "any must be true")
        return AnyRule()
    if kind == "not_id":
        return NotRule(_principal(p.not_id, ctx, sub, depth + 1))
    if kind == "authenticated":
        a = p.authenticated
        if not a.HasField("principal_name"):
            return AuthenticatedPrincipal()
        return AuthenticatedPrincipal(
            decode_string_matcher(a.principal_name, ctx, join(sub, "principal_name"))
        )
    if kind in _IP_SOURCES:
        return IpRule(decode_cidr_range(getattr(p, kind), ctx, sub), _IP_SOURCES[kind])
    if kind == "header":
        return _rbac_header(p.header, ctx, sub)
    if kind == "url_path":
        return _url_path(p.url_path, ctx, sub)
    if kind == "metadata":
        return MetadataRule(p.metadata.filter, p.metadata.invert)
    if kind is None:
        raise ctx.error(path, "principal has no identifier")
    raise ctx.error(sub, f"unsupported RBAC principal {kind}")


def _decode_rbac_msg(msg: rbac_pb2.RBAC, ctx: Ctx, path: str) -> RbacConfig:
    if msg.HasField("matcher"):
        raise ctx.error(join(path, "matcher"), "RBAC matcher API is not supported")
    if not msg.HasField("rules"):
        return RbacConfig(None)
    rules, rpath = msg.rules, join(path, "rules")
    try:
        action = RbacAction(rules.action)
    except ValueError:
        raise ctx.error(join(rpath, "action"), f"unknown action {rules.action}") from None
    policies: dict[str, RbacPolicy] = {}
    for name in sorted(rules.policies):
        pol = rules.policies[name]
        ppath = f"{rpath}.policies[{name}]"
        if pol.HasField("condition") or pol.HasField("checked_condition"):
            raise ctx.error(join(ppath, "condition"), "CEL conditions are not supported")
        if not pol.permissions:
            raise ctx.error(join(ppath, "permissions"), "policy needs at least one permission")
        if not pol.principals:
            raise ctx.error(join(ppath, "principals"), "policy needs at least one principal")
        policies[name] = RbacPolicy(
            permissions=tuple(
                _permission(p, ctx, index(join(ppath, "permissions"), i), 0)
                for i, p in enumerate(pol.permissions)
            ),
            principals=tuple(
                _principal(p, ctx, index(join(ppath, "principals"), i), 0)
                for i, p in enumerate(pol.principals)
            ),
        )
    return RbacConfig(RbacRules(action, MappingProxyType(policies)))


def decode_rbac(cfg: AnyConfig, ctx: Ctx, path: str) -> RbacConfig:
    """``envoy.extensions.filters.http.rbac.v3.RBAC``."""
    return _decode_rbac_msg(unpack_any(cfg, rbac_pb2.RBAC, ctx, path), ctx, path)


def decode_rbac_per_route(cfg: AnyConfig, ctx: Ctx, path: str) -> RbacPerRoute:
    """``RBACPerRoute``: an unset ``rbac`` disables the filter on the route."""
    msg = unpack_any(cfg, rbac_pb2.RBACPerRoute, ctx, path)
    if not msg.HasField("rbac"):
        return RbacPerRoute(None)
    return RbacPerRoute(_decode_rbac_msg(msg.rbac, ctx, join(path, "rbac")))


# --------------------------------------------------------------------------- opaque


def _opaque(cfg: AnyConfig, ctx: Ctx, path: str) -> OpaqueConfig:
    return OpaqueConfig(cfg.type_url, cfg.struct or MappingProxyType({}))


_ROUTER = "envoy.extensions.filters.http.router.v3.Router"
_FAULT = "envoy.extensions.filters.http.fault.v3.HTTPFault"
_RBAC = "envoy.extensions.filters.http.rbac.v3.RBAC"
_CORS = "envoy.extensions.filters.http.cors.v3."

_register(FilterType(_ROUTER, decode_router, terminal=True))
_register(
    FilterType(_FAULT, decode_fault, override_type_names=(_FAULT,), parse_override=decode_fault)
)
_register(
    FilterType(
        _RBAC,
        decode_rbac,
        override_type_names=("envoy.extensions.filters.http.rbac.v3.RBACPerRoute",),
        parse_override=decode_rbac_per_route,
    )
)
for _name, _override in (
    (
        "envoy.extensions.filters.http.cors.v3.Cors",
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
    ),
    (
        "envoy.extensions.filters.http.stateful_session.v3.StatefulSession",
        "envoy.extensions.filters.http.stateful_session.v3.StatefulSessionPerRoute",
    ),
    ("envoy.extensions.filters.http.grpc_stats.v3.FilterConfig", ""),
    ("stats.PluginConfig", ""),
):
    _register(
        FilterType(
            _name,
            _opaque,
            override_type_names=(_override,) if _override else (),
            parse_override=_opaque if _override else None,
        )
    )


def _lookup(type_name: str, table: Mapping[str, FilterType]) -> FilterType | None:
    ft = table.get(type_name)
    if ft is None and type_name.startswith(("istio.", "io.istio.")):
        # Istio's private extensions (metadata exchange, peer metadata, stats, alpn):
        # telemetry and protocol hints only, never an allow/deny decision.
        return FilterType(type_name, _opaque, parse_override=_opaque)
    return ft


# --------------------------------------------------------------------------- filter list


def decode_http_filters(
    filters: Iterable[hcm_pb2.HttpFilter], ctx: Ctx, path: str
) -> tuple[HttpFilter, ...]:
    """Validate and decode an HCM's ``http_filters`` (path is the list's dotted path)."""
    out: list[HttpFilter] = []
    seen: set[str] = set()
    items = list(filters)
    if not items:
        raise ctx.error(path, "http_filters is empty (the router filter is required)")
    for i, f in enumerate(items):
        fpath = index(path, i)
        if not f.name:
            raise ctx.error(join(fpath, "name"), "filter name is empty")
        if f.name in seen:
            raise ctx.error(join(fpath, "name"), f"duplicate filter name {f.name!r}")
        seen.add(f.name)
        last = i == len(items) - 1
        kind = f.WhichOneof("config_type")
        if kind != "typed_config":
            if f.is_optional:
                continue
            raise ctx.error(fpath, f"filter {f.name!r} has no typed_config")
        cpath = join(fpath, "typed_config")
        cfg = unwrap_any(f.typed_config, ctx, cpath)
        ft = _lookup(cfg.type_name, _TYPES)
        if ft is None:
            if f.is_optional:
                continue
            raise ctx.error(cpath, f"unsupported HTTP filter type {cfg.type_url!r} ({f.name})")
        if ft.terminal and not last:
            raise ctx.error(fpath, f"terminal filter {f.name!r} is not the last filter")
        if last and not ft.terminal:
            raise ctx.error(fpath, f"last filter {f.name!r} is not a terminal filter (router)")
        config = ft.parse(cfg, ctx, cpath)
        assert isinstance(config, RouterConfig | FaultConfig | RbacConfig | OpaqueConfig)
        out.append(HttpFilter(f.name, cfg.type_url, config, f.is_optional, f.disabled))
    if not out or not out[-1].is_router:
        raise ctx.error(path, "the last HTTP filter must be the router")
    return tuple(out)


_FILTER_CONFIG = "envoy.config.route.v3.FilterConfig"
_NO_OVERRIDES: Mapping[str, FilterConfigOverride] = MappingProxyType({})


def decode_filter_overrides(
    overrides: Mapping[str, AnyProto], ctx: Ctx, path: str
) -> Mapping[str, FilterConfigOverride]:
    """``typed_per_filter_config`` (vhost, route, weighted cluster or route config)."""
    if not overrides:
        return _NO_OVERRIDES
    out: dict[str, FilterConfigOverride] = {}
    for name in sorted(overrides):
        epath = f"{path}[{name}]"
        if not name:
            raise ctx.error(epath, "empty filter name")
        cfg = unwrap_any(overrides[name], ctx, epath)
        optional = disabled = False
        if cfg.type_name == _FILTER_CONFIG:
            wrapper = unpack_any(cfg, route_components_pb2.FilterConfig, ctx, epath)
            optional, disabled = wrapper.is_optional, wrapper.disabled
            if not wrapper.HasField("config"):
                if disabled:
                    out[name] = FilterConfigOverride(None, disabled=True, is_optional=optional)
                    continue
                raise ctx.error(join(epath, "config"), "FilterConfig without config")
            epath = join(epath, "config")
            cfg = unwrap_any(wrapper.config, ctx, epath)
        ft = _lookup(cfg.type_name, _OVERRIDES)
        if ft is None or ft.parse_override is None:
            if optional:
                continue
            raise ctx.error(epath, f"unsupported filter override type {cfg.type_url!r}")
        out[name] = FilterConfigOverride(ft.parse_override(cfg, ctx, epath), disabled, optional)
    return MappingProxyType(out)
