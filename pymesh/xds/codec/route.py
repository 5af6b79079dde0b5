"""RDS: validating decoder of ``envoy.config.route.v3.RouteConfiguration``.

Validation follows gRPC (A28 routing, A31 timeouts, A32 max_stream_duration, A39 filter
overrides, A42 hash policies, A44 retries) and, beyond gRPC, decodes everything Envoy's
sidecar uses for HTTP (redirects, direct responses, rewrites, mirrors, header mutations)
because the httpx data plane implements Envoy's route semantics. A supported field with an
unsupported value raises :class:`ResourceError` naming the dotted field; fields we do not
implement are ignored.

Routes whose match uses ``tls_context``, ``dynamic_metadata`` or ``filter_state`` are
dropped (they never match here), as are routes naming an optional cluster specifier plugin
(gRPC's rule): ignoring such criteria would route more requests than Envoy does.

Each rejection in the test tables is backed by a real peer (Envoy ``--mode validate``,
grpcio's C-core xDS client), except two deliberate ones: an empty resource name, and
direct-response bodies read from a file (a control plane must not make us read files).
Where Envoy is lenient we are too (deprecated ``total_weight`` that does not add up,
non-strict header names, a ``*`` inside a domain, which is then literal). Regexes are RE2:
``\\z`` and ``\\Q..\\E`` are translated for :mod:`re`; Unicode classes (``\\pL``) are not
supported and NACKed.

Resolution done here, once, so the data plane never has to: a route without its own retry
policy gets its virtual host's (Envoy: the route's policy replaces the vhost's entirely).
Envoy has no virtual-host-level hash policy, so hash policies are per route only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.extensions.path.rewrite.uri_template.v3 import uri_template_rewrite_pb2
from envoy.type.matcher.v3 import regex_pb2

from pymesh.model.route import (
    NO_HEADER_MUTATIONS,
    AppendAction,
    ConnectionSourceIpHash,
    CookieHash,
    DirectResponseAction,
    FilterStateHash,
    HashPolicy,
    HeaderHash,
    HeaderMutations,
    HeaderToAdd,
    NonForwardingAction,
    PathMatchKind,
    QueryParameterHash,
    QueryParameterMatcher,
    RedirectAction,
    RegexRewrite,
    RequestMirrorPolicy,
    RetryPolicy,
    Route,
    RouteAction,
    RouteActionType,
    RouteConfiguration,
    RouteMatch,
    UnsupportedAction,
    VirtualHost,
    WeightedCluster,
)
from pymesh.xds.codec._common import (
    Ctx,
    decode_fractional_percent,
    decode_header_matcher,
    decode_regex_matcher,
    decode_string_matcher,
    duration,
    index,
    join,
    metadata_to_mapping,
    optional_bool,
    optional_duration,
    optional_uint32,
    parse_message,
    type_name_of,
    unpack_any,
    unwrap_any,
)
from pymesh.xds.codec._registry import Decoded, register
from pymesh.xds.codec.http_filters import decode_filter_overrides
from pymesh.xds.resource_types import ResourceType

__all__ = ["RETRY_ON_TOKENS", "decode_route_configuration", "decode_route_configuration_bytes"]

_TYPE = ResourceType.ROUTE_CONFIGURATION.short_name

RETRY_ON_TOKENS = frozenset(
    {
        # HTTP (x-envoy-retry-on)
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        # gRPC (x-envoy-retry-grpc-on)
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
"""``retry_on`` tokens Envoy knows; others are dropped (Envoy ignores them too)."""

_MAX_UINT32 = 0xFFFFFFFF
# Envoy validates header names non-strictly: anything but NUL, CR and LF (and not empty).
_HEADER_NAME = re.compile(r"^[^\x00\r\n]+$")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_DEFAULT_MAX_DIRECT_RESPONSE_BODY = 4096
_RETRY_HOST_PREDICATES = {
    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate": (
        "envoy.retry_host_predicates.previous_hosts"
    ),
    "envoy.extensions.retry.host.omit_canary_hosts.v3.OmitCanaryHostsPredicate": (
        "envoy.retry_host_predicates.omit_canary_hosts"
    ),
    "envoy.extensions.retry.host.omit_host_metadata.v3.OmitHostMetadataConfig": (
        "envoy.retry_host_predicates.omit_host_metadata"
    ),
}
"""Retry host predicates by config type, with their canonical Envoy names."""
_URI_TEMPLATE_MATCH = "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
_URI_TEMPLATE_REWRITE = "envoy.extensions.path.rewrite.uri_template.v3.UriTemplateRewriteConfig"


# --------------------------------------------------------------------------- headers


def _check_header_name(name: str, ctx: Ctx, path: str) -> str:
    lowered = name.lower()
    if not _HEADER_NAME.match(lowered):
        raise ctx.error(path, f"invalid header name {name!r}")
    return lowered


def _check_header_value(value: str, ctx: Ctx, path: str) -> str:
    # Envoy's non-strict HTTP_HEADER_VALUE rule: no NUL, CR or LF.
    if _BAD_VALUE.search(value):
        raise ctx.error(path, "header value contains NUL, CR or LF")
    return value


def _headers_to_add(
    options: Iterable[base_pb2.HeaderValueOption], ctx: Ctx, path: str
) -> tuple[HeaderToAdd, ...]:
    out = []
    for i, opt in enumerate(options):
        opath = index(path, i)
        key = _check_header_name(opt.header.key, ctx, join(opath, "header.key"))
        if key.startswith(":") or key == "host":
            # Envoy: ":-prefixed or host headers may not be modified" via headers_to_add.
            raise ctx.error(join(opath, "header.key"), f"cannot add header {key!r}")
        if opt.header.value and opt.header.raw_value:
            raise ctx.error(join(opath, "header"), "both value and raw_value are set")
        value = opt.header.value or opt.header.raw_value.decode("latin-1")
        _check_header_value(value, ctx, join(opath, "header.value"))
        try:
            action = AppendAction(opt.append_action)
        except ValueError:
            raise ctx.error(
                join(opath, "append_action"), f"unknown append_action {opt.append_action}"
            ) from None
        if opt.HasField("append"):
            if opt.append_action != 0:
                raise ctx.error(join(opath, "append"), "append and append_action both set")
            action = (
                AppendAction.APPEND_IF_EXISTS_OR_ADD
                if opt.append.value
                else AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
            )
        out.append(HeaderToAdd(key, value, action, opt.keep_empty_value))
    return tuple(out)


def _headers_to_remove(names: Iterable[str], ctx: Ctx, path: str) -> tuple[str, ...]:
    out = []
    for i, name in enumerate(names):
        key = _check_header_name(name, ctx, index(path, i))
        if key.startswith(":") or key == "host":
            raise ctx.error(index(path, i), f"cannot remove header {key!r}")
        out.append(key)
    return tuple(out)


def _header_mutations(msg: object, ctx: Ctx, path: str) -> HeaderMutations:
    m: Any = msg  # any message with the four *_headers_to_* fields
    if not (
        m.request_headers_to_add
        or m.request_headers_to_remove
        or m.response_headers_to_add
        or m.response_headers_to_remove
    ):
        return NO_HEADER_MUTATIONS  # the common case, kept cheap
    return HeaderMutations(
        request_headers_to_add=_headers_to_add(
            m.request_headers_to_add,
            ctx,
            join(path, "request_headers_to_add"),
        ),
        request_headers_to_remove=_headers_to_remove(
            m.request_headers_to_remove,
            ctx,
            join(path, "request_headers_to_remove"),
        ),
        response_headers_to_add=_headers_to_add(
            m.response_headers_to_add,
            ctx,
            join(path, "response_headers_to_add"),
        ),
        response_headers_to_remove=_headers_to_remove(
            m.response_headers_to_remove,
            ctx,
            join(path, "response_headers_to_remove"),
        ),
    )


# --------------------------------------------------------------------------- match


_TEMPLATE_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@]+")
_TEMPLATE_VAR_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_]{0,15}")
_TEMPLATE_PRINTABLE = re.compile(r"/[!-~]*")


def _check_uri_template(template: str, ctx: Ctx, path: str) -> None:
    """Envoy's URI template syntax (``parseURLPatternSyntax``): ``/``-separated segments that
    are literals, ``*``, ``**`` or variables ``{name}`` / ``{name=a/*/**}``; the last one may
    carry a literal suffix (``/{file}.txt``); at most 5 distinct variables; nothing that globs
    after a ``**``."""
    if len(template) > 256 or not _TEMPLATE_PRINTABLE.fullmatch(template):
        raise ctx.error(path, f"invalid URI template {template!r}")
    rest = template[1:]
    names: set[str] = set()
    text_glob = False
    while rest:
        ops: list[str] = []
        ok = True
        if rest.startswith("**"):
            ops, rest = ["**"], rest[2:]
        elif rest.startswith("*"):
            ops, rest = ["*"], rest[1:]
        elif rest.startswith("{"):
            close = rest.find("}")
            name, eq, spec = rest[1:close].partition("=")
            ok = close != -1 and bool(_TEMPLATE_VAR_NAME.fullmatch(name)) and name not in names
            names.add(name)
            if eq:
                parts = spec.split("/")
                ok = ok and all(p in ("*", "**") or _TEMPLATE_LITERAL.fullmatch(p) for p in parts)
                ops = [p for p in parts if p in ("*", "**")]
            else:
                ops = ["*"]  # a bare variable is a path glob
            rest = rest[close + 1 :]
        else:
            literal = rest.split("/", 1)[0]
            ok = bool(_TEMPLATE_LITERAL.fullmatch(literal))
            rest = rest[len(literal) :]
        for op in ops:
            ok = ok and not text_glob
            text_glob = op == "**"
        if rest and rest != "/":
            if rest[0] == "/":
                rest = rest[1:]
            else:  # a suffix: the rest of the template, one literal without '/'
                ok = ok and bool(_TEMPLATE_LITERAL.fullmatch(rest))
                rest = ""
        elif rest == "/":
            rest = ""
        if not ok or len(names) > 5:
            raise ctx.error(path, f"invalid URI template {template!r}")


_TEMPLATE_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)")


def _check_template_rewrite(rewrite: str, match_template: str | None, ctx: Ctx, path: str) -> None:
    """Envoy: a URI template rewrite needs a URI template match, starts with ``/`` and only
    uses variables the match template defines."""
    if match_template is None:
        raise ctx.error(path, "a URI template rewrite needs a uri_template path_match_policy")
    if not rewrite.startswith("/"):
        raise ctx.error(path, f"invalid URI template rewrite {rewrite!r}")
    defined = set(_TEMPLATE_VAR.findall(match_template))
    for name in _TEMPLATE_VAR.findall(rewrite):
        if name not in defined:
            raise ctx.error(path, f"rewrite uses undefined variable {name!r}")


def _route_match(m: rc.RouteMatch, ctx: Ctx, path: str) -> RouteMatch:
    kind = m.WhichOneof("path_specifier")
    case_sensitive = optional_bool(m, "case_sensitive")
    regex = None
    value = ""
    if kind in ("prefix", "path"):
        value = getattr(m, kind)
        pk = PathMatchKind(kind)
    elif kind == "path_separated_prefix":
        value = m.path_separated_prefix
        if not value.startswith("/") or (len(value) > 1 and value.endswith("/")):
            raise ctx.error(join(path, kind), "must start with '/' and not end with '/'")
        if "?" in value or "#" in value:
            raise ctx.error(join(path, kind), "must not contain '?' or '#'")
        pk = PathMatchKind.PATH_SEPARATED_PREFIX
    elif kind == "safe_regex":
        regex = decode_regex_matcher(m.safe_regex, ctx, join(path, kind))
        value = m.safe_regex.regex
        pk = PathMatchKind.SAFE_REGEX
    elif kind == "path_match_policy":
        ppath = join(path, kind)
        ext = m.path_match_policy
        cfg = unwrap_any(ext.typed_config, ctx, join(ppath, "typed_config"))
        if cfg.type_name != _URI_TEMPLATE_MATCH:
            raise ctx.error(
                join(ppath, "typed_config"), f"unsupported path matcher {cfg.type_url!r}"
            )
        tm = unpack_any(cfg, uri_template_match_pb2.UriTemplateMatchConfig, ctx, ppath)
        _check_uri_template(tm.path_template, ctx, join(ppath, "typed_config.path_template"))
        value = tm.path_template
        pk = PathMatchKind.URI_TEMPLATE
    elif kind == "connect_matcher":
        pk = PathMatchKind.CONNECT
    else:
        raise ctx.error(path, "route match has no path specifier")
    headers = tuple(
        decode_header_matcher(h, ctx, index(join(path, "headers"), i))
        for i, h in enumerate(m.headers)
    )
    params = []
    for i, q in enumerate(m.query_parameters):
        qpath = index(join(path, "query_parameters"), i)
        if not q.name:
            raise ctx.error(join(qpath, "name"), "empty query parameter name")
        qk = q.WhichOneof("query_parameter_match_specifier")
        if qk == "string_match":
            sm = decode_string_matcher(q.string_match, ctx, join(qpath, "string_match"))
            params.append(QueryParameterMatcher(q.name, string_match=sm))
        elif qk == "present_match" and not q.present_match:
            # Envoy: present_match false never matches (kept so the route stays in order).
            params.append(QueryParameterMatcher(q.name, present_match=False))
        else:
            params.append(QueryParameterMatcher(q.name, present_match=True))
    fraction = None
    if m.HasField("runtime_fraction"):
        fraction = decode_fractional_percent(
            m.runtime_fraction.default_value, ctx, join(path, "runtime_fraction.default_value")
        )
    return RouteMatch(
        path_kind=pk,
        path=value,
        regex=regex,
        case_sensitive=True if case_sensitive is None else case_sensitive,
        headers=headers,
        query_parameters=tuple(params),
        runtime_fraction=fraction,
        grpc=m.HasField("grpc"),
    )


# --------------------------------------------------------------------------- policies


def _regex_rewrite(m: regex_pb2.RegexMatchAndSubstitute, ctx: Ctx, path: str) -> RegexRewrite:
    if not m.HasField("pattern"):
        raise ctx.error(join(path, "pattern"), "regex rewrite without pattern")
    return RegexRewrite(decode_regex_matcher(m.pattern, ctx, join(path, "pattern")), m.substitution)


def decode_retry_policy(p: rc.RetryPolicy, ctx: Ctx, path: str) -> RetryPolicy:
    """``route.v3.RetryPolicy`` (gRFC A44 plus Envoy's HTTP conditions)."""
    tokens = {t.strip() for t in p.retry_on.split(",") if t.strip()}
    retry_on = frozenset(tokens & RETRY_ON_TOKENS)
    num_retries = optional_uint32(p, "num_retries")
    base, max_ = 0.025, None
    if p.HasField("retry_back_off"):
        bo, bpath = p.retry_back_off, join(path, "retry_back_off")
        if not bo.HasField("base_interval"):
            raise ctx.error(join(bpath, "base_interval"), "base_interval is required")
        base = duration(bo.base_interval, ctx, join(bpath, "base_interval"))
        if base <= 0:
            raise ctx.error(join(bpath, "base_interval"), "base_interval must be > 0")
        max_ = optional_duration(bo, "max_interval", ctx, bpath)
        if max_ is not None and max_ < base:
            raise ctx.error(join(bpath, "max_interval"), "max_interval must be >= base_interval")
    # Envoy accepts any number here; one outside 100..599 simply never matches.
    codes = [int(code) for code in p.retriable_status_codes]
    predicates = []
    for i, pred in enumerate(p.retry_host_predicate):
        ppath = index(join(path, "retry_host_predicate"), i)
        name = _RETRY_HOST_PREDICATES.get(type_name_of(pred.typed_config.type_url))
        if name is None and pred.name in _RETRY_HOST_PREDICATES.values():
            name = pred.name
        if name is None:
            raise ctx.error(ppath, f"unsupported retry host predicate {pred.name!r}")
        predicates.append(name)
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=1 if num_retries is None else num_retries,
        per_try_timeout=optional_duration(p, "per_try_timeout", ctx, path),
        per_try_idle_timeout=optional_duration(p, "per_try_idle_timeout", ctx, path),
        base_interval=base,
        max_interval=10 * base if max_ is None else max_,
        retriable_status_codes=tuple(codes),
        retriable_headers=tuple(
            decode_header_matcher(h, ctx, index(join(path, "retriable_headers"), i))
            for i, h in enumerate(p.retriable_headers)
        ),
        retriable_request_headers=tuple(
            decode_header_matcher(h, ctx, index(join(path, "retriable_request_headers"), i))
            for i, h in enumerate(p.retriable_request_headers)
        ),
        retry_host_predicates=tuple(predicates),
        host_selection_retry_max_attempts=max(1, p.host_selection_retry_max_attempts),
        retry_priority=p.retry_priority.name if p.HasField("retry_priority") else None,
    )


def _hash_policy(h: rc.RouteAction.HashPolicy, ctx: Ctx, path: str) -> HashPolicy | None:
    kind = h.WhichOneof("policy_specifier")
    sub = join(path, kind or "policy_specifier")
    t = h.terminal
    if kind == "header":
        if not h.header.header_name:
            raise ctx.error(join(sub, "header_name"), "empty header_name")
        name = _check_header_name(h.header.header_name, ctx, join(sub, "header_name"))
        rw = None
        if h.header.HasField("regex_rewrite"):
            rw = _regex_rewrite(h.header.regex_rewrite, ctx, join(sub, "regex_rewrite"))
        return HeaderHash(name, rw, t)
    if kind == "cookie":
        if not h.cookie.name:
            raise ctx.error(join(sub, "name"), "empty cookie name")
        ttl = optional_duration(h.cookie, "ttl", ctx, sub)
        return CookieHash(h.cookie.name, ttl, h.cookie.path, t)
    if kind == "connection_properties":
        # source_ip false hashes nothing: Envoy skips such a policy.
        return ConnectionSourceIpHash(t) if h.connection_properties.source_ip else None
    if kind == "query_parameter":
        if not h.query_parameter.name:
            raise ctx.error(join(sub, "name"), "empty query parameter name")
        return QueryParameterHash(h.query_parameter.name, t)
    if kind == "filter_state":
        if not h.filter_state.key:
            raise ctx.error(join(sub, "key"), "empty filter state key")
        return FilterStateHash(h.filter_state.key, t)
    raise ctx.error(path, "hash policy has no policy specifier")


def _mirrors(
    policies: Iterable[rc.RouteAction.RequestMirrorPolicy], ctx: Ctx, path: str
) -> tuple[RequestMirrorPolicy, ...]:
    out = []
    for i, mp in enumerate(policies):
        mpath = index(path, i)
        if not mp.cluster:
            if mp.cluster_header:
                continue  # mirroring to a header-named cluster is not implemented: ignored
            raise ctx.error(join(mpath, "cluster"), "mirror policy without cluster")
        fraction = None
        if mp.HasField("runtime_fraction"):
            fraction = decode_fractional_percent(
                mp.runtime_fraction.default_value,
                ctx,
                join(mpath, "runtime_fraction.default_value"),
            )
        out.append(RequestMirrorPolicy(mp.cluster, fraction, optional_bool(mp, "trace_sampled")))
    return tuple(out)


# --------------------------------------------------------------------------- actions

_NOT_FOUND_CODES = {0: 503, 1: 404, 2: 500}
_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}


def _weighted_clusters(
    wc: rc.WeightedCluster, ctx: Ctx, path: str
) -> tuple[tuple[WeightedCluster, ...], int | None]:
    clusters: list[WeightedCluster] = []
    total = 0
    cpath = join(path, "clusters")
    if not wc.clusters:
        raise ctx.error(cpath, "weighted_clusters has no clusters")
    for i, c in enumerate(wc.clusters):
        epath = index(cpath, i)
        header = None
        if not c.name:
            if not c.cluster_header:
                raise ctx.error(join(epath, "name"), "weighted cluster without name")
            header = _check_header_name(c.cluster_header, ctx, join(epath, "cluster_header"))
        weight = c.weight.value if c.HasField("weight") else 0
        total += weight
        if total > _MAX_UINT32:
            raise ctx.error(join(epath, "weight"), "sum of weights exceeds uint32")
        clusters.append(
            WeightedCluster(
                name=c.name,
                weight=weight,
                cluster_header=header,
                typed_per_filter_config=decode_filter_overrides(
                    c.typed_per_filter_config, ctx, join(epath, "typed_per_filter_config")
                ),
                headers=_header_mutations(c, ctx, epath),
                host_rewrite_literal=_check_header_value(
                    c.host_rewrite_literal, ctx, join(epath, "host_rewrite_literal")
                )
                or None,
            )
        )
    if total == 0:
        raise ctx.error(cpath, "sum of weighted cluster weights is zero")
    # total_weight is deprecated: Envoy (and gRPC) pick by the sum of the weights and accept
    # a total_weight that differs; it is kept, for display only.
    return tuple(clusters), optional_uint32(wc, "total_weight")


def _route_action(
    a: rc.RouteAction,
    ctx: Ctx,
    path: str,
    vhost_retry: RetryPolicy | None,
    match_template: str | None,
) -> RouteAction:
    kind = a.WhichOneof("cluster_specifier")
    cluster = cluster_header = None
    weighted: tuple[WeightedCluster, ...] = ()
    total_weight = None
    if kind == "cluster":
        if not a.cluster:
            raise ctx.error(join(path, "cluster"), "empty cluster name")
        cluster = a.cluster
    elif kind == "weighted_clusters":
        weighted, total_weight = _weighted_clusters(
            a.weighted_clusters, ctx, join(path, "weighted_clusters")
        )
    elif kind == "cluster_header":
        cluster_header = _check_header_name(a.cluster_header, ctx, join(path, "cluster_header"))
    elif kind == "inline_cluster_specifier_plugin":
        raise ctx.error(join(path, kind), "cluster specifier plugins are not supported")
    else:
        raise ctx.error(path, "route action has no cluster specifier")

    if a.prefix_rewrite and a.HasField("regex_rewrite"):
        raise ctx.error(join(path, "regex_rewrite"), "prefix_rewrite and regex_rewrite both set")
    regex_rewrite = None
    if a.HasField("regex_rewrite"):
        regex_rewrite = _regex_rewrite(a.regex_rewrite, ctx, join(path, "regex_rewrite"))
    template_rewrite = None
    if a.HasField("path_rewrite_policy"):
        ppath = join(path, "path_rewrite_policy.typed_config")
        cfg = unwrap_any(a.path_rewrite_policy.typed_config, ctx, ppath)
        if cfg.type_name != _URI_TEMPLATE_REWRITE:
            raise ctx.error(ppath, f"unsupported path rewrite {cfg.type_url!r}")
        tr = unpack_any(cfg, uri_template_rewrite_pb2.UriTemplateRewriteConfig, ctx, ppath)
        template_rewrite = tr.path_template_rewrite
        _check_template_rewrite(
            template_rewrite, match_template, ctx, join(ppath, "path_template_rewrite")
        )

    host_kind = a.WhichOneof("host_rewrite_specifier")
    host_literal = None
    if host_kind == "host_rewrite_literal":
        host_literal = _check_header_value(
            a.host_rewrite_literal, ctx, join(path, "host_rewrite_literal")
        )
    auto_host = host_kind == "auto_host_rewrite" and a.auto_host_rewrite.value
    host_header = None
    if host_kind == "host_rewrite_header":
        host_header = _check_header_name(
            a.host_rewrite_header, ctx, join(path, "host_rewrite_header")
        )

    msd = grpc_max = grpc_offset = None
    if a.HasField("max_stream_duration"):
        mpath = join(path, "max_stream_duration")
        m = a.max_stream_duration
        msd = optional_duration(m, "max_stream_duration", ctx, mpath)
        grpc_max = optional_duration(m, "grpc_timeout_header_max", ctx, mpath)
        grpc_offset = optional_duration(m, "grpc_timeout_header_offset", ctx, mpath)

    retry = vhost_retry
    if a.HasField("retry_policy"):
        retry = decode_retry_policy(a.retry_policy, ctx, join(path, "retry_policy"))

    hashes = []
    for i, h in enumerate(a.hash_policy):
        hp = _hash_policy(h, ctx, index(join(path, "hash_policy"), i))
        if hp is not None:
            hashes.append(hp)

    code = _NOT_FOUND_CODES.get(a.cluster_not_found_response_code)
    if code is None:
        raise ctx.error(join(path, "cluster_not_found_response_code"), "unknown response code")

    return RouteAction(
        cluster=cluster,
        weighted_clusters=weighted,
        total_weight=total_weight,
        cluster_header=cluster_header,
        cluster_not_found_response_code=code,
        prefix_rewrite=a.prefix_rewrite or None,
        regex_rewrite=regex_rewrite,
        path_template_rewrite=template_rewrite,
        host_rewrite_literal=host_literal,
        auto_host_rewrite=auto_host,
        host_rewrite_header=host_header,
        timeout=optional_duration(a, "timeout", ctx, path),
        idle_timeout=optional_duration(a, "idle_timeout", ctx, path),
        max_stream_duration=msd,
        grpc_timeout_header_max=grpc_max,
        grpc_timeout_header_offset=grpc_offset,
        max_grpc_timeout=optional_duration(a, "max_grpc_timeout", ctx, path),
        grpc_timeout_offset=optional_duration(a, "grpc_timeout_offset", ctx, path),
        retry_policy=retry,
        hash_policies=tuple(hashes),
        request_mirror_policies=_mirrors(
            a.request_mirror_policies, ctx, join(path, "request_mirror_policies")
        ),
    )


def _redirect(r: rc.RedirectAction, ctx: Ctx, path: str) -> RedirectAction:
    scheme_kind = r.WhichOneof("scheme_rewrite_specifier")
    scheme = None
    if scheme_kind == "https_redirect" and r.https_redirect:
        scheme = "https"
    elif scheme_kind == "scheme_redirect" and r.scheme_redirect:
        scheme = r.scheme_redirect.lower()
    path_kind = r.WhichOneof("path_rewrite_specifier")
    regex_rewrite = None
    if path_kind == "regex_rewrite":
        regex_rewrite = _regex_rewrite(r.regex_rewrite, ctx, join(path, "regex_rewrite"))
    code = _REDIRECT_CODES.get(r.response_code)
    if code is None:
        raise ctx.error(join(path, "response_code"), f"unknown response code {r.response_code}")
    return RedirectAction(
        scheme_redirect=scheme,
        host_redirect=r.host_redirect or None,
        port_redirect=r.port_redirect or None,
        path_redirect=r.path_redirect if path_kind == "path_redirect" else None,
        prefix_rewrite=r.prefix_rewrite if path_kind == "prefix_rewrite" else None,
        regex_rewrite=regex_rewrite,
        response_code=code,
        strip_query=r.strip_query,
    )


def _direct_response(
    d: rc.DirectResponseAction, ctx: Ctx, path: str, max_body: int
) -> DirectResponseAction:
    if not 200 <= d.status < 600:
        raise ctx.error(join(path, "status"), f"status {d.status} not in [200, 600)")
    body = None
    if d.HasField("body"):
        bpath = join(path, "body")
        kind = d.body.WhichOneof("specifier")
        if kind == "inline_string":
            body = d.body.inline_string.encode()
        elif kind == "inline_bytes":
            body = d.body.inline_bytes
        elif kind is None:
            raise ctx.error(bpath, "body needs inline_string or inline_bytes")
        else:
            raise ctx.error(join(bpath, kind), f"body from {kind} is not supported (inline only)")
        if len(body) > max_body:
            raise ctx.error(bpath, f"body larger than {max_body} bytes")
    return DirectResponseAction(int(d.status), body)


# --------------------------------------------------------------------------- routes / vhosts


@dataclass(slots=True)
class _Env:
    """Route-configuration-wide facts the per-route decoding needs."""

    plugins: dict[str, bool]
    max_body: int
    seen_domains: dict[str, str] = field(default_factory=dict)


def _route(
    r: rc.Route,
    ctx: Ctx,
    path: str,
    vhost_retry: RetryPolicy | None,
    env: _Env,
) -> Route | None:
    if not r.HasField("match"):
        raise ctx.error(join(path, "match"), "route without match")
    match = _route_match(r.match, ctx, join(path, "match"))
    if r.match.HasField("tls_context") or r.match.dynamic_metadata or r.match.filter_state:
        # Criteria we cannot evaluate: such a route never matches (dropping it is the same
        # thing), rather than matching more requests than Envoy would.
        return None
    kind = r.WhichOneof("action")
    apath = join(path, kind or "action")
    action: RouteActionType
    if kind == "route":
        if r.route.WhichOneof("cluster_specifier") == "cluster_specifier_plugin":
            name = r.route.cluster_specifier_plugin
            if name not in env.plugins:
                raise ctx.error(join(apath, "cluster_specifier_plugin"), f"unknown plugin {name!r}")
            return None  # an optional unsupported plugin: gRPC ignores the route
        template = match.path if match.path_kind is PathMatchKind.URI_TEMPLATE else None
        action = _route_action(r.route, ctx, apath, vhost_retry, template)
    elif kind == "redirect":
        action = _redirect(r.redirect, ctx, apath)
    elif kind == "direct_response":
        action = _direct_response(r.direct_response, ctx, apath, env.max_body)
    elif kind == "non_forwarding_action":
        action = NonForwardingAction()
    elif kind is None:
        raise ctx.error(path, "route has no action")
    else:
        action = UnsupportedAction(kind)
    decorator = None
    if r.HasField("decorator"):
        decorator = r.decorator.operation
        if not decorator:
            raise ctx.error(join(path, "decorator.operation"), "empty decorator operation")
    return Route(
        match=match,
        action=action,
        name=r.name,
        decorator_operation=decorator or None,
        typed_per_filter_config=decode_filter_overrides(
            r.typed_per_filter_config, ctx, join(path, "typed_per_filter_config")
        ),
        headers=_header_mutations(r, ctx, path),
        metadata=metadata_to_mapping(r.metadata),
    )


def _check_domain(domain: str, ctx: Ctx, path: str) -> str:
    # As in Envoy, a "*" that is neither leading nor trailing is literal (an exact domain).
    if not domain:
        raise ctx.error(path, "empty domain")
    return domain.lower()


def _virtual_host(
    v: rc.VirtualHost,
    ctx: Ctx,
    path: str,
    env: _Env,
) -> VirtualHost:
    if not v.domains:
        raise ctx.error(join(path, "domains"), "virtual host has no domains")
    domains = []
    for i, d in enumerate(v.domains):
        dpath = index(join(path, "domains"), i)
        domain = _check_domain(d, ctx, dpath)
        if domain in env.seen_domains:
            raise ctx.error(dpath, f"domain {domain!r} also in {env.seen_domains[domain]}")
        env.seen_domains[domain] = path
        domains.append(domain)
    retry = None
    if v.HasField("retry_policy"):
        retry = decode_retry_policy(v.retry_policy, ctx, join(path, "retry_policy"))
    routes = []
    for i, r in enumerate(v.routes):
        route = _route(r, ctx, index(join(path, "routes"), i), retry, env)
        if route is not None:
            routes.append(route)
    return VirtualHost(
        name=v.name,
        domains=tuple(domains),
        routes=tuple(routes),
        retry_policy=retry,
        typed_per_filter_config=decode_filter_overrides(
            v.typed_per_filter_config, ctx, join(path, "typed_per_filter_config")
        ),
        headers=_header_mutations(v, ctx, path),
        request_mirror_policies=_mirrors(
            v.request_mirror_policies, ctx, join(path, "request_mirror_policies")
        ),
        include_request_attempt_count=v.include_request_attempt_count,
        include_attempt_count_in_response=v.include_attempt_count_in_response,
    )


def _plugins(specs: Sequence[rc.ClusterSpecifierPlugin], ctx: Ctx, path: str) -> dict[str, bool]:
    """Declared cluster specifier plugins. We support none: a non-optional one is an error;
    optional ones are recorded so that routes using them are dropped (gRPC behaviour)."""
    out: dict[str, bool] = {}
    for i, spec in enumerate(specs):
        ppath = index(join(path, "cluster_specifier_plugins"), i)
        name = spec.extension.name
        if not name:
            raise ctx.error(join(ppath, "extension.name"), "plugin without name")
        if name in out:
            raise ctx.error(join(ppath, "extension.name"), f"duplicate plugin {name!r}")
        if not spec.is_optional:
            raise ctx.error(
                join(ppath, "extension.typed_config"),
                f"unsupported cluster specifier plugin "
                f"{spec.extension.typed_config.type_url!r} ({name})",
            )
        out[name] = True
    return out


def decode_route_configuration(
    rc_msg: route_pb2.RouteConfiguration, ctx: Ctx, path: str = ""
) -> RouteConfiguration:
    """Decode a ``RouteConfiguration`` message (RDS resource, or an HCM's inline
    ``route_config`` with ``path`` set to its dotted location in the listener)."""
    plugins = _plugins(rc_msg.cluster_specifier_plugins, ctx, path)
    max_body = optional_uint32(rc_msg, "max_direct_response_body_size_bytes")
    max_body = _DEFAULT_MAX_DIRECT_RESPONSE_BODY if max_body is None else max_body
    env = _Env(plugins, max_body)
    vhosts = tuple(
        _virtual_host(v, ctx, index(join(path, "virtual_hosts"), i), env)
        for i, v in enumerate(rc_msg.virtual_hosts)
    )
    internal = tuple(
        _check_header_name(h, ctx, index(join(path, "internal_only_headers"), i))
        for i, h in enumerate(rc_msg.internal_only_headers)
    )
    return RouteConfiguration(
        name=rc_msg.name,
        virtual_hosts=vhosts,
        headers=_header_mutations(rc_msg, ctx, path),
        internal_only_headers=internal,
        typed_per_filter_config=decode_filter_overrides(
            rc_msg.typed_per_filter_config, ctx, join(path, "typed_per_filter_config")
        ),
        request_mirror_policies=_mirrors(
            rc_msg.request_mirror_policies, ctx, join(path, "request_mirror_policies")
        ),
        ignore_port_in_host_matching=rc_msg.ignore_port_in_host_matching,
        most_specific_header_mutations_wins=rc_msg.most_specific_header_mutations_wins,
        validate_clusters=optional_bool(rc_msg, "validate_clusters"),
    )


def decode_route_configuration_bytes(data: bytes) -> RouteConfiguration:
    """Parse and validate a serialized ``RouteConfiguration``."""
    ctx = Ctx(_TYPE)
    msg = parse_message(route_pb2.RouteConfiguration, data, ctx)
    if not msg.name:
        raise ctx.error("name", "empty resource name")
    return decode_route_configuration(msg, ctx.named(msg.name))


@register(ResourceType.ROUTE_CONFIGURATION)
def _decode(data: bytes) -> Decoded:
    value = decode_route_configuration_bytes(data)
    return Decoded(value.name, value)
