"""Envoy's HTTP route semantics over the decoded RDS models.

``route_request`` picks the route of a virtual host for a request (the virtual host itself
comes from :func:`pymesh.model.route.select_virtual_host`); ``choose_cluster`` /
``pick_cluster`` pick the upstream cluster of a route action; ``rewrite_request`` applies
the header mutations, host rewrite and path rewrite Envoy applies before forwarding;
``response_header_ops`` gives the response-side header mutations; ``redirect_location``
builds a redirect's ``location``.

Matching follows Envoy's ``RouteEntryImplBase::matchRoute`` and the per-kind ``matches``:

* routes are tried in order; the first whose every condition holds wins;
* the path is ``:path`` without its query and fragment: ``prefix``, ``path`` (exact) and
  ``path_separated_prefix`` honour ``case_sensitive`` (ASCII case folding); ``safe_regex``
  and URI templates must match the whole path and ignore ``case_sensitive``;
  ``path_separated_prefix`` also needs the path to end or continue with ``/`` right after
  the prefix;
* header matchers see all values of a header joined with ``,``; a missing header matches
  only ``present_match: false`` (or, inverted, ``present_match: true``) unless
  ``treat_missing_header_as_empty``; ``invert_match`` flips the result for a present header;
  ``range_match`` parses the value as Envoy's ``SimpleAtoi`` (ASCII digits, optional sign,
  surrounding whitespace) and tests ``[start, end)``;
* query parameters are not percent-decoded; the first value of a name is matched;
  ``present_match: false`` matches when the parameter is absent (checked against Envoy);
* ``grpc`` requires ``content-type`` ``application/grpc`` or ``application/grpc+...``
  (or ``RequestInfo.grpc``);
* ``runtime_fraction`` draws ONE random value per request, shared by every route of the
  table, as Envoy (which uses the stream's random id): two routes at 50 % do not split the
  traffic 25/25/50, the second never matches what the first refused.

Pseudo-headers ``:authority``, ``:path``, ``:method`` and ``:scheme`` are matched against the
request's fields; ``host`` is ``:authority`` too (Envoy's header map aliases the two).

Performance: each virtual host compiles once into a tuple of per-route predicates (cached by
identity, the models are immutable), so matching a 10-route table costs a few µs; see
``bench/routing_bench.py``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pymesh.core.headers_ops import HeaderOps, compile_header_ops
from pymesh.core.types import Headers, RequestInfo
from pymesh.model.matcher import MatchKind, StringMatcher
from pymesh.model.route import (
    HeaderMatcher,
    HeaderMutations,
    PathMatchKind,
    QueryParameterMatcher,
    RedirectAction,
    RegexRewrite,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)

__all__ = [
    "ClusterChoice",
    "RouteResult",
    "auto_host_rewrite",
    "choose_cluster",
    "header_matches",
    "is_grpc_request",
    "match_route",
    "pick_cluster",
    "redirect_location",
    "regex_substitute",
    "request_header_matches",
    "request_header_ops",
    "response_header_ops",
    "rewrite_request",
    "route_request",
    "select_vhost",
    "uri_template_regex",
]

_MAX_CACHE = 4096
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_ATOI = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)[ \t\n\v\f\r]*", re.ASCII)
_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _lower(value: str) -> str:
    """ASCII-only lower-casing (absl's ``AsciiStrToLower``), as Envoy compares."""
    return value.lower() if value.isascii() else value.translate(_ASCII_LOWER)


def _strip_query(path: str) -> str:
    """Envoy's ``PathUtil::removeQueryAndFragment``."""
    q = path.find("?")
    f = path.find("#")
    if q == -1:
        return path if f == -1 else path[:f]
    if f == -1 or q < f:
        return path[:q]
    return path[:f]


def is_grpc_request(request: RequestInfo) -> bool:
    """Envoy's ``Grpc::Common::isGrpcRequestHeaders``: content-type ``application/grpc``
    exactly or followed by ``+`` (``application/grpc-web`` is not gRPC)."""
    if request.grpc:
        return True
    ct = request.headers.get("content-type")
    if ct is None or not ct.startswith("application/grpc"):
        return False
    return len(ct) == 16 or ct[16] == "+"


# --------------------------------------------------------------------------- request view


class _Req:
    """What matching looks at, computed at most once per request."""

    __slots__ = ("_lower_path", "_query", "_rng", "_rv", "path_only", "request")

    def __init__(
        self, request: RequestInfo, rng: random.Random | None, path_only: str, lower: str | None
    ) -> None:
        self.request = request
        self.path_only = path_only
        self._lower_path = lower
        self._query: dict[str, str] | None = None
        self._rng = rng
        self._rv: int | None = None

    def lower_path(self) -> str:
        lp = self._lower_path
        if lp is None:
            lp = self._lower_path = _lower(self.path_only)
        return lp

    def header(self, name: str) -> str | None:
        if name[0] == ":":
            req = self.request
            if name == ":authority":
                return req.authority
            if name == ":path":
                return req.path
            if name == ":method":
                return req.method
            if name == ":scheme":
                return req.scheme
            return None
        if name == "host":
            return self.request.authority  # Envoy's header map aliases host to :authority
        return self.request.headers.get(name)

    def header_values(self, name: str) -> list[str]:
        if name[0] == ":" or name == "host":
            value = self.header(name)
            return [] if value is None else [value]
        return self.request.headers.get_all(name)

    def query(self) -> dict[str, str]:
        q = self._query
        if q is None:
            q = self._query = _parse_query(self.request.path)
        return q

    def random_value(self) -> int:
        rv = self._rv
        if rv is None:
            # Never None here: only request_header_matches builds a view without an RNG,
            # and header matchers draw nothing.
            assert self._rng is not None
            rv = self._rv = self._rng.getrandbits(64)
        return rv


def _parse_query(path: str) -> dict[str, str]:
    """Envoy's ``QueryParamsMulti::parseQueryString`` keeping each name's first value; no
    percent-decoding; the fragment is not part of the query."""
    start = path.find("?")
    if start == -1:
        return {}
    query = path[start + 1 :]
    hash_at = query.find("#")
    if hash_at != -1:
        query = query[:hash_at]
    out: dict[str, str] = {}
    for param in query.split("&"):
        name, sep, value = param.partition("=")
        if name not in out:
            out[name] = value if sep else ""
    return out


# --------------------------------------------------------------------------- compilation

_Pred = Callable[[_Req], bool]
_StrPred = Callable[[str], bool]


def _string_pred(m: StringMatcher) -> _StrPred:
    kind = m.kind
    if kind is MatchKind.REGEX:
        rx = m._regex  # the compiled form the model carries
        assert rx is not None
        fullmatch = rx.fullmatch
        return lambda v: fullmatch(v) is not None
    pattern = m.pattern
    if m.ignore_case:
        p = _lower(pattern)
        if kind is MatchKind.EXACT:
            return lambda v: _lower(v) == p
        if kind is MatchKind.PREFIX:
            return lambda v: _lower(v).startswith(p)
        if kind is MatchKind.SUFFIX:
            return lambda v: _lower(v).endswith(p)
        return lambda v: p in _lower(v)
    if kind is MatchKind.EXACT:
        return lambda v: v == pattern
    if kind is MatchKind.PREFIX:
        return lambda v: v.startswith(pattern)
    if kind is MatchKind.SUFFIX:
        return lambda v: v.endswith(pattern)
    return lambda v: pattern in v


def _atoi_in(r_start: int, r_end: int) -> _StrPred:
    def check(v: str) -> bool:
        m = _ATOI.fullmatch(v)
        if m is None:
            return False
        n = int(m.group(1))
        return _INT64_MIN <= n <= _INT64_MAX and r_start <= n < r_end

    return check


class _HeaderSource(Protocol):
    def header_values(self, name: str) -> list[str]: ...


class _HeadersOnly:
    """Header matching over a bare header list (e.g. a response's, ``:status`` included)."""

    __slots__ = ("headers",)

    def __init__(self, headers: Headers) -> None:
        self.headers = headers

    def header_values(self, name: str) -> list[str]:
        return self.headers.get_all(name)


def _header_pred(hm: HeaderMatcher) -> Callable[[_HeaderSource], bool]:
    name = hm.name
    invert = hm.invert_match
    missing_empty = hm.treat_missing_header_as_empty
    if hm.string_match is not None:
        spec = _string_pred(hm.string_match)
        present_kind = False
        present = True
    elif hm.range_match is not None:
        spec = _atoi_in(hm.range_match.start, hm.range_match.end)
        present_kind = False
        present = True
    else:
        present_kind = True
        present = True if hm.present_match is None else hm.present_match
        spec = (lambda v: True) if present else (lambda v: False)
    # A missing header (and no treat_missing_header_as_empty): only a present matcher can
    # match, and then exactly when ``present_match == invert_match``.
    missing_result = present_kind and present == invert

    def check(r: _HeaderSource) -> bool:
        values = r.header_values(name)
        if not values:
            if not missing_empty:
                return missing_result
            return spec("") != invert
        if len(values) == 1:
            return spec(values[0]) != invert
        return any(spec(v) for v in values) != invert

    return check


def _query_pred(qm: QueryParameterMatcher) -> _Pred:
    name = qm.name
    if qm.string_match is not None:
        spec = _string_pred(qm.string_match)

        def check(r: _Req) -> bool:
            value = r.query().get(name)
            return value is not None and spec(value)

        return check
    if not qm.present_match:
        return lambda r: name not in r.query()
    return lambda r: name in r.query()


def _path_pred(m: RouteMatch) -> _Pred | None:
    """The path condition; ``None`` when any path matches (empty prefix)."""
    kind = m.path_kind
    value = m.path
    if kind is PathMatchKind.PREFIX:
        if not value:
            return None
        if m.case_sensitive:
            return lambda r: r.path_only.startswith(value)
        lv = _lower(value)
        return lambda r: r.lower_path().startswith(lv)
    if kind is PathMatchKind.PATH:
        if m.case_sensitive:
            return lambda r: r.path_only == value
        lv = _lower(value)
        return lambda r: r.lower_path() == lv
    if kind is PathMatchKind.PATH_SEPARATED_PREFIX:
        n = len(value)
        lv = value if m.case_sensitive else _lower(value)
        cs = m.case_sensitive

        def sep_check(r: _Req) -> bool:
            p = r.path_only if cs else r.lower_path()
            return p.startswith(lv) and (len(p) == n or p[n] == "/")

        return sep_check
    if kind is PathMatchKind.SAFE_REGEX:
        assert m.regex is not None
        spec = _string_pred(m.regex)
        return lambda r: spec(r.path_only)
    if kind is PathMatchKind.URI_TEMPLATE:
        rx = uri_template_regex(value)
        return lambda r: rx.fullmatch(r.path_only) is not None
    # CONNECT matcher: only CONNECT requests (never produced by the HTTP adapters).
    return lambda r: r.request.method == "CONNECT"


# Path kinds the matching loop tests inline (no call): most routes fail on the path.
_ANY, _PREFIX, _EXACT, _PREFIX_CI, _EXACT_CI = range(5)


def _route_entry(route: Route) -> tuple[int, str, _Pred | None, Route]:
    """``(path kind, path value, predicate for the rest or None, route)``."""
    m = route.match
    preds: list[_Pred] = []
    kind, value = _ANY, ""
    if m.path_kind is PathMatchKind.PREFIX:
        if not m.path:
            kind = _ANY
        else:
            kind = _PREFIX if m.case_sensitive else _PREFIX_CI
            value = m.path if m.case_sensitive else _lower(m.path)
    elif m.path_kind is PathMatchKind.PATH:
        kind = _EXACT if m.case_sensitive else _EXACT_CI
        value = m.path if m.case_sensitive else _lower(m.path)
    else:
        path = _path_pred(m)
        assert path is not None
        preds.append(path)
    if m.grpc:
        preds.append(lambda r: is_grpc_request(r.request))
    preds.extend(_header_pred(h) for h in m.headers)
    preds.extend(_query_pred(q) for q in m.query_parameters)
    fraction = m.runtime_fraction
    if fraction is not None:
        # Last: the random draw is made only when everything else matched.
        preds.append(lambda r: fraction.hits(r.random_value()))
    pred: _Pred | None
    if not preds:
        pred = None
    elif len(preds) == 1:
        pred = preds[0]
    elif len(preds) == 2:
        a, b = preds
        pred = lambda r: a(r) and b(r)  # noqa: E731
    else:
        all_preds = tuple(preds)
        pred = lambda r: all(p(r) for p in all_preds)  # noqa: E731
    return kind, value, pred, route


_compiled: dict[tuple[int, str], tuple[object, Any]] = {}
"""Compiled forms by ``id`` of the immutable model object; each entry keeps the object alive
so its ``id`` cannot be reused while cached. Cleared wholesale when it grows too big."""


def _cached(key_obj: object, build: Callable[[], Any], tag: str = "") -> Any:
    key = (id(key_obj), tag)
    hit = _compiled.get(key)
    if hit is not None and hit[0] is key_obj:
        return hit[1]
    value = build()
    if len(_compiled) >= _MAX_CACHE:
        _compiled.clear()
    _compiled[key] = (key_obj, value)
    return value


_vhosts: dict[int, tuple[VirtualHost, tuple[tuple[int, str, _Pred | None, Route], ...]]] = {}
"""Compiled route tables by ``id`` of the (immutable, kept alive here) virtual host."""


def _entries(vhost: VirtualHost) -> tuple[tuple[int, str, _Pred | None, Route], ...]:
    hit = _vhosts.get(id(vhost))
    if hit is not None and hit[0] is vhost:
        return hit[1]
    entries = tuple(_route_entry(r) for r in vhost.routes)
    if len(_vhosts) >= _MAX_CACHE:
        _vhosts.clear()
    _vhosts[id(vhost)] = (vhost, entries)
    return entries


_matchers: dict[int, tuple[HeaderMatcher, Callable[[_HeaderSource], bool]]] = {}


def _compiled_matcher(matcher: HeaderMatcher) -> Callable[[_HeaderSource], bool]:
    hit = _matchers.get(id(matcher))
    if hit is not None and hit[0] is matcher:
        return hit[1]
    pred = _header_pred(matcher)
    if len(_matchers) >= _MAX_CACHE:
        _matchers.clear()
    _matchers[id(matcher)] = (matcher, pred)
    return pred


def request_header_matches(matcher: HeaderMatcher, request: RequestInfo) -> bool:
    """Envoy's ``HeaderUtility::matchHeaders`` for one matcher against a request, exactly as
    route matching does it (checked against Envoy): any value of a repeated header may
    match, pseudo-headers and ``host`` come from the request's fields. For the route
    conditions of other filters (retriable request headers, fault headers, RBAC)."""
    path = request.path
    view = _Req(request, None, _strip_query(path), None)
    return _compiled_matcher(matcher)(view)


def header_matches(matcher: HeaderMatcher, headers: Headers) -> bool:
    """:func:`request_header_matches` over a bare header list (a response's, with
    ``:status`` if the caller puts it there: retriable response headers)."""
    return _compiled_matcher(matcher)(_HeadersOnly(headers))


# --------------------------------------------------------------------------- matching


def route_request(vhost: VirtualHost, request: RequestInfo, *, rng: random.Random) -> Route | None:
    """The first route of ``vhost`` matching ``request`` (Envoy order), or ``None``
    (Envoy answers 404 ``route_not_found``). ``rng`` feeds ``runtime_fraction``."""
    path = request.path
    path_only = _strip_query(path) if ("?" in path or "#" in path) else path
    lower: str | None = None
    r: _Req | None = None
    hit = _vhosts.get(id(vhost))  # (_entries inlined: one call less per request)
    entries = hit[1] if hit is not None and hit[0] is vhost else _entries(vhost)
    for kind, value, pred, route in entries:
        if kind == _PREFIX:
            if not path_only.startswith(value):
                continue
        elif kind == _EXACT:
            if path_only != value:
                continue
        elif kind != _ANY:
            if lower is None:
                lower = _lower(path_only)
            if kind == _PREFIX_CI:
                if not lower.startswith(value):
                    continue
            elif lower != value:
                continue
        if pred is None:
            return route
        if r is None:
            r = _Req(request, rng, path_only, lower)
        if pred(r):
            return route
    return None


@dataclass(frozen=True, slots=True)
class RouteResult:
    """A virtual host and the route chosen in it."""

    vhost: VirtualHost
    route: Route


class _VhostIndex:
    """Envoy's virtual host lookup structure: exact domains in a dict, then suffix and prefix
    wildcards by length (longest first, one dict per length), then ``*``. Same answers as
    :func:`pymesh.model.route.select_virtual_host` (a property test checks it) in O(number
    of distinct wildcard lengths) instead of O(domains)."""

    __slots__ = ("default", "exact", "ignore_port", "prefixes", "suffixes")

    def __init__(self, config: RouteConfiguration) -> None:
        self.exact: dict[str, VirtualHost] = {}
        suffixes: dict[int, dict[str, VirtualHost]] = {}
        prefixes: dict[int, dict[str, VirtualHost]] = {}
        self.default: VirtualHost | None = None
        self.ignore_port = config.ignore_port_in_host_matching
        for vh in config.virtual_hosts:
            for domain in vh.domains:
                if domain == "*":
                    if self.default is None:
                        self.default = vh
                elif domain.startswith("*"):
                    suffixes.setdefault(len(domain) - 1, {}).setdefault(domain[1:], vh)
                elif domain.endswith("*"):
                    prefixes.setdefault(len(domain) - 1, {}).setdefault(domain[:-1], vh)
                else:
                    self.exact.setdefault(domain, vh)
        self.suffixes = sorted(suffixes.items(), reverse=True)
        self.prefixes = sorted(prefixes.items(), reverse=True)

    def lookup(self, authority: str) -> VirtualHost | None:
        host = authority.lower()
        if self.ignore_port:
            host = _strip_port(host)
        vh = self.exact.get(host)
        if vh is not None:
            return vh
        n = len(host)
        for length, table in self.suffixes:
            if length < n:  # a wildcard matches at least one character
                vh = table.get(host[n - length :])
                if vh is not None:
                    return vh
        for length, table in self.prefixes:
            if length < n:
                vh = table.get(host[:length])
                if vh is not None:
                    return vh
        return self.default


def _strip_port(authority: str) -> str:
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end != -1 else authority
    if authority.count(":") == 1:
        return authority.rsplit(":", 1)[0]
    return authority


def select_vhost(config: RouteConfiguration, authority: str) -> VirtualHost | None:
    """The virtual host of ``config`` for ``authority``, through a per-configuration index
    built once (semantics of :func:`pymesh.model.route.select_virtual_host`)."""
    index: _VhostIndex = _cached(config, lambda: _VhostIndex(config), "vhosts")
    return index.lookup(authority)


def match_route(
    config: RouteConfiguration, request: RequestInfo, *, rng: random.Random
) -> RouteResult | None:
    """Virtual host by authority, then the route: ``None`` when either is missing."""
    vhost = select_vhost(config, request.authority)
    if vhost is None:
        return None
    route = route_request(vhost, request, rng=rng)
    return None if route is None else RouteResult(vhost, route)


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True, slots=True)
class ClusterChoice:
    """The cluster a route action sends one request to. ``name`` is empty when the cluster
    comes from a request header that is missing (Envoy: ``cluster_not_found``).
    ``weighted`` is the chosen ``weighted_clusters`` entry, whose header mutations and host
    rewrite apply (see :func:`rewrite_request`)."""

    name: str
    weighted: WeightedCluster | None = None


def _first_header(request: RequestInfo, name: str) -> str:
    values = request.headers.get_all(name)
    return values[0] if values else ""


def pick_cluster(action: RouteAction, request: RequestInfo, *, rng: random.Random) -> ClusterChoice:
    """Envoy's choice: the cluster, the first value of ``cluster_header``, or for
    ``weighted_clusters`` a value drawn uniformly in ``[0, sum of weights)`` located in the
    cumulative weights (clusters of weight 0 are never chosen)."""
    if action.cluster is not None:
        return ClusterChoice(action.cluster)
    if action.cluster_header is not None:
        return ClusterChoice(_first_header(request, action.cluster_header))
    clusters = action.weighted_clusters
    if not clusters:
        return ClusterChoice("")
    total = 0
    for c in clusters:
        total += c.weight
    draw = rng.getrandbits(64) % total
    end = 0
    chosen = clusters[-1]
    for c in clusters:
        end += c.weight
        if draw < end:
            chosen = c
            break
    if chosen.cluster_header is not None:
        return ClusterChoice(_first_header(request, chosen.cluster_header), chosen)
    return ClusterChoice(chosen.name, chosen)


def choose_cluster(action: RouteAction, request: RequestInfo, *, rng: random.Random) -> str:
    """The cluster name :func:`pick_cluster` chooses."""
    return pick_cluster(action, request, rng=rng).name


# --------------------------------------------------------------------------- rewrites


def _levels(
    route: Route, vhost: VirtualHost, config: RouteConfiguration | None
) -> list[HeaderMutations]:
    """Envoy applies the levels least specific last (the route configuration wins) unless
    ``most_specific_header_mutations_wins``, then the route is applied last and wins."""
    cfg = config.headers if config is not None else HeaderMutations()
    if config is not None and config.most_specific_header_mutations_wins:
        return [cfg, vhost.headers, route.headers]
    return [route.headers, vhost.headers, cfg]


def request_header_ops(
    route: Route,
    vhost: VirtualHost,
    config: RouteConfiguration | None,
    weighted: WeightedCluster | None = None,
) -> HeaderOps:
    """Request-side mutations in Envoy's order: the chosen weighted cluster's first, then
    route/vhost/config as :func:`_levels` orders them."""

    def build() -> HeaderOps:
        levels = _levels(route, vhost, config)
        if weighted is not None:
            levels.insert(0, weighted.headers)
        return compile_header_ops(levels, response=False)

    return _cached_ops(
        route=route, vhost=vhost, config=config, weighted=weighted, response=False, build=build
    )


def response_header_ops(
    route: Route,
    vhost: VirtualHost,
    config: RouteConfiguration | None,
    weighted: WeightedCluster | None = None,
) -> HeaderOps:
    """Response-side mutations (apply with ``ops.apply(headers, request)``)."""

    def build() -> HeaderOps:
        levels = _levels(route, vhost, config)
        if weighted is not None:
            levels.insert(0, weighted.headers)
        return compile_header_ops(levels, response=True)

    return _cached_ops(
        route=route, vhost=vhost, config=config, weighted=weighted, response=True, build=build
    )


_ops: dict[tuple[int, int, int, int, bool], tuple[tuple[object, ...], HeaderOps]] = {}


def _cached_ops(
    *,
    route: Route,
    vhost: VirtualHost,
    config: RouteConfiguration | None,
    weighted: WeightedCluster | None,
    response: bool,
    build: Callable[[], HeaderOps],
) -> HeaderOps:
    key = (id(route), id(vhost), id(config), id(weighted), response)
    hit = _ops.get(key)
    if hit is not None:
        o = hit[0]
        if o[0] is route and o[1] is vhost and o[2] is config and o[3] is weighted:
            return hit[1]
    ops = build()
    if len(_ops) >= _MAX_CACHE:
        _ops.clear()
    # The objects stay alive in the entry, so their ids cannot be reused while it exists.
    _ops[key] = ((route, vhost, config, weighted), ops)
    return ops


def _matched_prefix(route: Route, path_only: str) -> str:
    """The part of the path a prefix rewrite replaces (Envoy's ``matched_path``)."""
    kind = route.match.path_kind
    if kind is PathMatchKind.SAFE_REGEX or kind is PathMatchKind.CONNECT:
        return path_only
    return route.match.path


def _rewrite_path(route: Route, action: RouteAction, path: str) -> str | None:
    """The new ``:path`` (query kept), or ``None`` when no rewrite is configured."""
    path_only = _strip_query(path)
    if action.prefix_rewrite is not None:
        matched = _matched_prefix(route, path_only)
        return action.prefix_rewrite + path[len(matched) :]
    if action.regex_rewrite is not None:
        rw = action.regex_rewrite
        new = _regex_replace_all(rw.pattern, rw.substitution, path_only)
        return new + path[len(path_only) :]
    if action.path_template_rewrite is not None:
        if route.match.path_kind is not PathMatchKind.URI_TEMPLATE:
            return None
        new_path = _template_rewrite(route.match.path, action.path_template_rewrite, path_only)
        if new_path is None:
            return path  # Envoy: a failed template rewrite keeps the old path
        return new_path + path[len(path_only) :]
    return None


def rewrite_request(  # noqa: PLR0917 - the positional order is the shared interface
    route: Route,
    action: RouteAction,
    vhost: VirtualHost,
    route_config: RouteConfiguration | None,
    request: RequestInfo,
    cluster_choice: ClusterChoice | str | None = None,
) -> RequestInfo:
    """The request as Envoy forwards it (``finalizeRequestHeaders``): the weighted cluster's
    header mutations and host rewrite, then route/vhost/config mutations, then the host
    rewrite (literal, or from a header; ``auto_host_rewrite`` needs the chosen endpoint and
    is left to the caller), then the path rewrite (prefix, regex or URI template), with
    ``x-envoy-original-path`` holding the path before a rewrite."""
    weighted = cluster_choice.weighted if isinstance(cluster_choice, ClusterChoice) else None
    headers = request.headers
    authority = request.authority
    ops = request_header_ops(route, vhost, route_config, weighted)
    if ops:
        headers = ops.apply(headers, request)
    # The weighted cluster's host rewrite comes after its own header mutations and before
    # the route's levels in Envoy; those never touch the authority, so the order is moot.
    if weighted is not None and weighted.host_rewrite_literal:
        authority = weighted.host_rewrite_literal
    if action.host_rewrite_literal:
        authority = action.host_rewrite_literal
    elif action.host_rewrite_header is not None:
        values = headers.get_all(action.host_rewrite_header)
        if values and values[0]:
            authority = values[0]
    path = request.path
    new_path = _rewrite_path(route, action, path)
    if new_path is not None:
        headers = headers.with_set("x-envoy-original-path", path)
        path = new_path
    if path is request.path and authority is request.authority and headers is request.headers:
        return request
    return RequestInfo(
        method=request.method,
        authority=authority,
        path=path,
        headers=headers,
        scheme=request.scheme,
        source_ip=request.source_ip,
        grpc=request.grpc,
    )


def auto_host_rewrite(action: RouteAction, request: RequestInfo, hostname: str) -> RequestInfo:
    """``auto_host_rewrite``: once the attempt's endpoint is chosen, its ``hostname`` (EDS
    ``Endpoint.hostname``, or the DNS name of a DNS cluster) becomes the authority; an empty
    hostname keeps the request's (Envoy does the same)."""
    if not action.auto_host_rewrite or not hostname or hostname == request.authority:
        return request
    return RequestInfo(
        method=request.method,
        authority=hostname,
        path=request.path,
        headers=request.headers,
        scheme=request.scheme,
        source_ip=request.source_ip,
        grpc=request.grpc,
    )


# --------------------------------------------------------------------------- redirects


def _regex_replace_all(pattern: StringMatcher, substitution: str, value: str) -> str:
    """RE2 ``GlobalReplace`` with ``\\N`` group references (``\\\\`` is a backslash)."""
    rx = pattern._regex
    assert rx is not None

    def expand(m: re.Match[str]) -> str:
        out = []
        i = 0
        n = len(substitution)
        while i < n:
            c = substitution[i]
            if c == "\\" and i + 1 < n:
                d = substitution[i + 1]
                if d.isdigit():
                    out.append(m.group(int(d)) or "")
                    i += 2
                    continue
                if d == "\\":
                    out.append("\\")
                    i += 2
                    continue
            out.append(c)
            i += 1
        return "".join(out)

    # RE2's GlobalReplace, not re.sub: an empty match right where the previous match ended
    # is skipped (re.sub takes it: "b*" -> "-" turns "ab" into "-a--", RE2 into "-a-").
    out: list[str] = []
    pos, n, last_end, count = 0, len(value), -1, 0
    while pos <= n:
        m = rx.search(value, pos)
        if m is None:
            break
        start, end = m.span()
        if pos < start:
            out.append(value[pos:start])
        if start == end and start == last_end:
            if start < n:
                out.append(value[start])
            pos = start + 1
            continue
        out.append(expand(m))
        pos = last_end = end
        count += 1
    if count == 0:
        return value
    if pos < n:
        out.append(value[pos:])
    return "".join(out)


def regex_substitute(rewrite: RegexRewrite, value: str) -> str:
    """Apply a ``RegexMatchAndSubstitute`` to ``value`` as Envoy does (RE2 ``GlobalReplace``
    semantics; see the routing docs). Also what the header hash policy's ``regex_rewrite``
    needs."""
    return _regex_replace_all(rewrite.pattern, rewrite.substitution, value)


def _request_host(request: RequestInfo, new_scheme: str, new_port: str) -> str:
    """Envoy's ``Utility::processRequestHost``: drop the request's port when a new port is
    set, or when the scheme changes and the port is the old scheme's default."""
    host = request.authority
    if not host:
        return ""
    if host[0] == "[":
        end = host.rfind("]:")
        end = end + 1 if end != -1 else -1
    else:
        end = host.rfind(":")
    if end != -1:
        port = host[end:]
        remove = bool(new_port)
        if new_scheme != request.scheme:
            remove |= request.scheme == "https" and port == ":443"
            remove |= request.scheme == "http" and port == ":80"
        if remove:
            return host[:end]
    return host


def redirect_location(
    action: RedirectAction, request: RequestInfo, *, route: Route | None = None
) -> str:
    """The ``location`` of a redirect (Envoy's ``Utility::newUri`` after the redirect's path
    rewrite). ``route`` is needed for ``prefix_rewrite`` (the matched prefix is replaced)."""
    path = request.path
    path_only = _strip_query(path)
    if action.regex_rewrite is not None:
        rw = action.regex_rewrite
        path = _regex_replace_all(rw.pattern, rw.substitution, path_only) + path[len(path_only) :]
    elif action.prefix_rewrite is not None and action.prefix_rewrite != "":
        matched = _matched_prefix(route, path_only) if route is not None else ""
        path = action.prefix_rewrite + path[len(matched) :]

    scheme = action.scheme_redirect or request.scheme
    port = f":{action.port_redirect}" if action.port_redirect else ""
    host = action.host_redirect or _request_host(request, scheme, port)
    path_redirect = action.path_redirect
    redirect_has_query = path_redirect is not None and "?" in path_redirect
    if path_redirect:
        if redirect_has_query:
            final_path = path_redirect
        else:
            q = path.find("?")
            final_path = path_redirect + (path[q:] if q != -1 else "")
    else:
        final_path = path
    if not final_path.startswith("/"):
        final_path = "/" + final_path
    if not redirect_has_query and action.strip_query:
        q = final_path.find("?")
        if q != -1:
            final_path = final_path[:q]
    return f"{scheme}://{host}{port}{final_path}"


# --------------------------------------------------------------------------- URI templates

_LITERAL_CHARS = r"a-zA-Z0-9\-._~%!$&'()+,;:@"
_PATH_GLOB = f"[{_LITERAL_CHARS}]+"
_TEXT_GLOB = f"[{_LITERAL_CHARS}/]*"
_VAR = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*)(?:=([^}]*))?\}")


def _template_part(part: str) -> str:
    if part == "**":
        return _TEXT_GLOB
    if part == "*":
        return _PATH_GLOB
    return re.escape(part)


def _template_segments(body: str) -> tuple[list[str], str]:
    """Split a template (without its leading ``/``) into segment regexes and a suffix
    literal, as Envoy's ``parseURLPatternSyntax`` lexes it."""
    segments: list[str] = []
    suffix = ""
    rest = body
    while rest:
        if rest.startswith("**"):
            segments.append(_TEXT_GLOB)
            rest = rest[2:]
        elif rest.startswith("*"):
            segments.append(_PATH_GLOB)
            rest = rest[1:]
        elif rest.startswith("{"):
            m = _VAR.match(rest)
            if m is None:
                raise ValueError(f"invalid variable in URI template at {rest!r}")
            name, spec = m.group(1), m.group(2)
            if spec is None:
                inner = _PATH_GLOB
            else:
                inner = "/".join(_template_part(p) for p in spec.split("/"))
            segments.append(f"(?P<{name}>{inner})")
            rest = rest[m.end() :]
        else:
            lit, _, _ = rest.partition("/")
            segments.append(re.escape(lit))
            rest = rest[len(lit) :]
        if rest:
            if rest == "/":
                segments.append("")
                break
            if rest[0] == "/":
                rest = rest[1:]
            else:
                suffix = rest
                break
    return segments, suffix


def uri_template_regex(template: str) -> re.Pattern[str]:
    """The regex Envoy's ``envoy.path.match.uri_template`` matches the path against:
    ``*`` one path segment (at least one pchar), ``**`` any rest including ``/``,
    ``{name}`` / ``{name=...}`` named captures. Cached per template."""
    rx: re.Pattern[str] = _cached(template, lambda: _build_template_regex(template), "tpl")
    return rx


def _build_template_regex(template: str) -> re.Pattern[str]:
    if not template.startswith("/"):
        raise ValueError(f"URI template must start with '/': {template!r}")
    segments, suffix = _template_segments(template[1:])
    return re.compile("/" + "/".join(segments) + re.escape(suffix))


_REWRITE_VAR = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*)\}")


def _template_rewrite(match_template: str, rewrite: str, path_only: str) -> str | None:
    m = uri_template_regex(match_template).fullmatch(path_only)
    if m is None:
        return None
    groups = m.groupdict()
    out = []
    pos = 0
    for vm in _REWRITE_VAR.finditer(rewrite):
        out.append(rewrite[pos : vm.start()])
        value = groups.get(vm.group(1))
        if value is None:
            return None
        out.append(value)
        pos = vm.end()
    out.append(rewrite[pos:])
    return "".join(out)
