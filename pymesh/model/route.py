"""Route configuration models (RDS): virtual hosts, routes, matchers and actions.

These carry everything an Envoy sidecar uses for HTTP routing so that the policy core can
implement Envoy's route semantics. Defaults follow the Envoy API; where the proto says "unset"
means something (e.g. the route timeout, 15 s in Envoy), the model keeps ``None`` and the
consumer applies the default, so that "unset" and "explicitly 15 s" stay distinguishable.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pymesh.model.matcher import StringMatcher

__all__ = [
    "DEFAULT_ROUTE_TIMEOUT",
    "NO_HEADER_MUTATIONS",
    "AppendAction",
    "CidrRange",
    "ConnectionSourceIpHash",
    "CookieHash",
    "DirectResponseAction",
    "FilterConfigOverride",
    "FilterStateHash",
    "FractionalPercent",
    "HashPolicy",
    "HeaderHash",
    "HeaderMatcher",
    "HeaderMutations",
    "HeaderToAdd",
    "Int64Range",
    "NonForwardingAction",
    "OpaqueConfig",
    "PathMatchKind",
    "QueryParameterHash",
    "QueryParameterMatcher",
    "RedirectAction",
    "RegexRewrite",
    "RequestMirrorPolicy",
    "RetryPolicy",
    "Route",
    "RouteAction",
    "RouteActionType",
    "RouteConfiguration",
    "RouteMatch",
    "UnsupportedAction",
    "VirtualHost",
    "WeightedCluster",
    "select_virtual_host",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    # Read-only mappings are not hashable, so dataclasses need a factory for the default.
    return _EMPTY


DEFAULT_ROUTE_TIMEOUT = 15.0
"""Envoy's route timeout when ``RouteAction.timeout`` is unset (seconds)."""


@dataclass(frozen=True, slots=True)
class FractionalPercent:
    """``numerator / denominator`` (Envoy ``type.v3.FractionalPercent``).

    ``denominator`` is 100, 10 000 or 1 000 000. Envoy draws ``random % denominator`` and
    compares it with ``numerator``; :meth:`hits` does the same with an injected random value.
    A numerator above the denominator means "always".
    """

    numerator: int
    denominator: int = 100

    @property
    def fraction(self) -> float:
        """The probability in ``[0, 1]``."""
        return min(self.numerator, self.denominator) / self.denominator

    def hits(self, random_value: int) -> bool:
        """Whether a draw of ``random_value`` (any non-negative int) falls inside."""
        return random_value % self.denominator < self.numerator


@dataclass(frozen=True, slots=True)
class CidrRange:
    """An IP prefix (``core.v3.CidrRange``)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    def contains(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return addr.version == self.network.version and addr in self.network

    def __str__(self) -> str:
        return str(self.network)


@dataclass(frozen=True, slots=True)
class OpaqueConfig:
    """Config of an extension we recognise (or may ignore) but do not interpret.

    ``config`` is its JSON form when it came as a ``TypedStruct``, else empty.
    """

    type_url: str
    config: Mapping[str, Any] = field(default_factory=_empty)


@dataclass(frozen=True, slots=True)
class FilterConfigOverride:
    """One ``typed_per_filter_config`` entry (vhost, route or weighted cluster).

    ``config`` is the decoded per-route model of the filter (e.g. ``FaultConfig``,
    ``RbacPerRoute``) or an :class:`OpaqueConfig`; ``None`` when ``disabled`` carries no
    config. ``disabled`` is ``envoy.config.route.v3.FilterConfig.disabled``.
    """

    config: object | None
    disabled: bool = False
    is_optional: bool = False


class AppendAction(enum.Enum):
    """``core.v3.HeaderValueOption.HeaderAppendAction``."""

    APPEND_IF_EXISTS_OR_ADD = 0
    ADD_IF_ABSENT = 1
    OVERWRITE_IF_EXISTS_OR_ADD = 2
    OVERWRITE_IF_EXISTS = 3


@dataclass(frozen=True, slots=True)
class HeaderToAdd:
    """A header to add (``core.v3.HeaderValueOption``). ``key`` is lower-cased."""

    key: str
    value: str
    append_action: AppendAction = AppendAction.APPEND_IF_EXISTS_OR_ADD
    keep_empty_value: bool = False


@dataclass(frozen=True, slots=True)
class HeaderMutations:
    """Headers added/removed on requests and responses at one level (route/vhost/config)."""

    request_headers_to_add: tuple[HeaderToAdd, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    response_headers_to_add: tuple[HeaderToAdd, ...] = ()
    response_headers_to_remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.request_headers_to_add
            or self.request_headers_to_remove
            or self.response_headers_to_add
            or self.response_headers_to_remove
        )


NO_HEADER_MUTATIONS = HeaderMutations()


@dataclass(frozen=True, slots=True)
class Int64Range:
    """Half-open ``[start, end)``."""

    start: int
    end: int

    def contains(self, value: int) -> bool:
        return self.start <= value < self.end


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """``route.v3.HeaderMatcher``. Exactly one of ``string_match``, ``range_match`` and
    ``present_match`` is set (legacy ``exact_match``/``prefix_match``/... are folded into
    ``string_match``). ``name`` is lower-cased."""

    name: str
    string_match: StringMatcher | None = None
    range_match: Int64Range | None = None
    present_match: bool | None = None
    invert_match: bool = False
    treat_missing_header_as_empty: bool = False


@dataclass(frozen=True, slots=True)
class QueryParameterMatcher:
    """``route.v3.QueryParameterMatcher``. With ``string_match`` the first value must match;
    otherwise ``present_match`` True requires the parameter and False requires its absence
    (what Envoy 1.40 does, checked by the route conformance test)."""

    name: str
    string_match: StringMatcher | None = None
    present_match: bool = False


class PathMatchKind(enum.Enum):
    PREFIX = "prefix"
    PATH = "path"
    SAFE_REGEX = "safe_regex"
    PATH_SEPARATED_PREFIX = "path_separated_prefix"
    URI_TEMPLATE = "uri_template"
    CONNECT = "connect_matcher"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """``route.v3.RouteMatch``. ``path`` holds the prefix/path/template text; for
    ``SAFE_REGEX`` ``regex`` is the compiled matcher. ``grpc`` requires a gRPC request."""

    path_kind: PathMatchKind
    path: str = ""
    regex: StringMatcher | None = None
    case_sensitive: bool = True
    headers: tuple[HeaderMatcher, ...] = ()
    query_parameters: tuple[QueryParameterMatcher, ...] = ()
    runtime_fraction: FractionalPercent | None = None
    grpc: bool = False


# --- hash policies (gRFC A42; Envoy route.v3.RouteAction.HashPolicy) ---


@dataclass(frozen=True, slots=True)
class HeaderHash:
    header_name: str
    regex_rewrite: RegexRewrite | None = None
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class CookieHash:
    name: str
    ttl: float | None = None
    path: str = ""
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionSourceIpHash:
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class QueryParameterHash:
    name: str
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class FilterStateHash:
    key: str
    terminal: bool = False


HashPolicy = HeaderHash | CookieHash | ConnectionSourceIpHash | QueryParameterHash | FilterStateHash


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    """``type.matcher.v3.RegexMatchAndSubstitute`` (``substitution`` uses ``\\1`` groups)."""

    pattern: StringMatcher
    substitution: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``route.v3.RetryPolicy`` (gRFC A44 for gRPC; all of Envoy's HTTP conditions too).

    ``retry_on`` holds the recognised tokens (``5xx``, ``gateway-error``, ``reset``,
    ``connect-failure``, ``refused-stream``, ``retriable-4xx``, ``retriable-status-codes``,
    ``retriable-headers``, ``cancelled``, ``deadline-exceeded``, ``internal``,
    ``resource-exhausted``, ``unavailable``, ...); unknown tokens are dropped, as Envoy does.
    """

    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1
    per_try_timeout: float | None = None
    per_try_idle_timeout: float | None = None
    base_interval: float = 0.025
    max_interval: float = 0.25
    retriable_status_codes: tuple[int, ...] = ()
    retriable_headers: tuple[HeaderMatcher, ...] = ()
    retriable_request_headers: tuple[HeaderMatcher, ...] = ()
    retry_host_predicates: tuple[str, ...] = ()
    host_selection_retry_max_attempts: int = 1
    retry_priority: str | None = None


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    """One entry of ``weighted_clusters``: a cluster ``name``, or (``name`` empty) the
    request header ``cluster_header`` naming the cluster."""

    name: str
    weight: int
    cluster_header: str | None = None
    typed_per_filter_config: Mapping[str, FilterConfigOverride] = field(default_factory=_empty)
    headers: HeaderMutations = NO_HEADER_MUTATIONS
    host_rewrite_literal: str | None = None


@dataclass(frozen=True, slots=True)
class RequestMirrorPolicy:
    """Shadow traffic to ``cluster`` for ``runtime_fraction`` (``None`` = all) requests."""

    cluster: str
    runtime_fraction: FractionalPercent | None = None
    trace_sampled: bool | None = None


@dataclass(frozen=True, slots=True)
class RouteAction:
    """``route.v3.RouteAction``: forward to a cluster.

    Exactly one of ``cluster``, ``weighted_clusters`` (with ``total_weight`` only when the
    resource set it) and ``cluster_header`` is set. ``timeout`` ``None`` means unset (Envoy
    then uses :data:`DEFAULT_ROUTE_TIMEOUT`); ``0`` means no timeout. ``retry_policy`` and
    hash policies are already resolved (route's own, else the virtual host's retry policy).
    """

    cluster: str | None = None
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    total_weight: int | None = None
    cluster_header: str | None = None
    cluster_not_found_response_code: int = 503
    prefix_rewrite: str | None = None
    regex_rewrite: RegexRewrite | None = None
    path_template_rewrite: str | None = None
    host_rewrite_literal: str | None = None
    auto_host_rewrite: bool = False
    host_rewrite_header: str | None = None
    timeout: float | None = None
    idle_timeout: float | None = None
    max_stream_duration: float | None = None
    grpc_timeout_header_max: float | None = None
    grpc_timeout_header_offset: float | None = None
    max_grpc_timeout: float | None = None
    grpc_timeout_offset: float | None = None
    retry_policy: RetryPolicy | None = None
    hash_policies: tuple[HashPolicy, ...] = ()
    request_mirror_policies: tuple[RequestMirrorPolicy, ...] = ()

    def cluster_names(self) -> frozenset[str]:
        names = {wc.name for wc in self.weighted_clusters if wc.name}
        if self.cluster:
            names.add(self.cluster)
        names.update(m.cluster for m in self.request_mirror_policies)
        return frozenset(names)


@dataclass(frozen=True, slots=True)
class RedirectAction:
    """``route.v3.RedirectAction``. ``response_code`` is the HTTP status (301..308)."""

    scheme_redirect: str | None = None
    host_redirect: str | None = None
    port_redirect: int | None = None
    path_redirect: str | None = None
    prefix_rewrite: str | None = None
    regex_rewrite: RegexRewrite | None = None
    response_code: int = 301
    strip_query: bool = False

    @property
    def https_redirect(self) -> bool:
        return self.scheme_redirect == "https"


@dataclass(frozen=True, slots=True)
class DirectResponseAction:
    """``route.v3.DirectResponseAction``: answer ``status`` with ``body`` (``None`` = none)."""

    status: int
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class NonForwardingAction:
    """Server side: the request is handled locally (gRFC A36)."""


@dataclass(frozen=True, slots=True)
class UnsupportedAction:
    """A route action we do not implement (e.g. ``filter_action``); requests matching such a
    route fail (gRPC: UNAVAILABLE), as gRPC does, instead of NACKing the resource."""

    kind: str


RouteActionType = (
    RouteAction | RedirectAction | DirectResponseAction | NonForwardingAction | UnsupportedAction
)


@dataclass(frozen=True, slots=True)
class Route:
    """One route of a virtual host: a match and an action."""

    match: RouteMatch
    action: RouteActionType
    name: str = ""
    decorator_operation: str | None = None
    typed_per_filter_config: Mapping[str, FilterConfigOverride] = field(default_factory=_empty)
    headers: HeaderMutations = NO_HEADER_MUTATIONS
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty)


@dataclass(frozen=True, slots=True)
class VirtualHost:
    """``route.v3.VirtualHost``. ``domains`` are lower-cased."""

    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...] = ()
    retry_policy: RetryPolicy | None = None
    typed_per_filter_config: Mapping[str, FilterConfigOverride] = field(default_factory=_empty)
    headers: HeaderMutations = NO_HEADER_MUTATIONS
    request_mirror_policies: tuple[RequestMirrorPolicy, ...] = ()
    include_request_attempt_count: bool = False
    include_attempt_count_in_response: bool = False


@dataclass(frozen=True, slots=True)
class RouteConfiguration:
    """``route.v3.RouteConfiguration`` (an RDS resource or an HCM's inline config)."""

    name: str
    virtual_hosts: tuple[VirtualHost, ...] = ()
    headers: HeaderMutations = NO_HEADER_MUTATIONS
    internal_only_headers: tuple[str, ...] = ()
    typed_per_filter_config: Mapping[str, FilterConfigOverride] = field(default_factory=_empty)
    request_mirror_policies: tuple[RequestMirrorPolicy, ...] = ()
    ignore_port_in_host_matching: bool = False
    most_specific_header_mutations_wins: bool = False
    validate_clusters: bool | None = None

    def cluster_names(self) -> frozenset[str]:
        """Every cluster a route may send to or mirror to (clusters, weighted, mirrors)."""
        names: set[str] = {m.cluster for m in self.request_mirror_policies}
        for vh in self.virtual_hosts:
            names.update(m.cluster for m in vh.request_mirror_policies)
            for route in vh.routes:
                if isinstance(route.action, RouteAction):
                    names |= route.action.cluster_names()
        return frozenset(names)

    def select_virtual_host(self, authority: str) -> VirtualHost | None:
        """The virtual host for ``authority`` (see :func:`select_virtual_host`)."""
        return select_virtual_host(
            self.virtual_hosts, authority, ignore_port=self.ignore_port_in_host_matching
        )


# --------------------------------------------------------------------------- vhost selection


def _strip_port(authority: str) -> str:
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end != -1 else authority
    if authority.count(":") == 1:
        return authority.rsplit(":", 1)[0]
    return authority


def _match_rank(domain: str, host: str) -> tuple[int, int] | None:
    """``(class, length)``; higher is better. Classes: 3 exact, 2 suffix ``*.x``/``*x``,
    1 prefix ``x*``, 0 ``*``. ``None`` when ``domain`` does not match ``host``."""
    if domain == "*":
        return (0, 0)
    if domain.startswith("*"):
        suffix = domain[1:]
        # Envoy: the wildcard must match at least one character.
        if len(host) > len(suffix) and host.endswith(suffix):
            return (2, len(suffix))
        return None
    if domain.endswith("*"):
        prefix = domain[:-1]
        if len(host) > len(prefix) and host.startswith(prefix):
            return (1, len(prefix))
        return None
    return (3, len(domain)) if domain == host else None


def select_virtual_host(
    vhosts: tuple[VirtualHost, ...] | list[VirtualHost],
    authority: str,
    *,
    ignore_port: bool = False,
) -> VirtualHost | None:
    """Pick the virtual host for ``authority`` as Envoy and gRPC do.

    Precedence: exact domain > longest suffix wildcard (``*.foo.com``, ``*-bar.foo.com``) >
    longest prefix wildcard (``foo.*``) > ``*``; a wildcard must match at least one
    character. Matching is case-insensitive and uses the whole authority, port included
    (Istio lists both ``host`` and ``host:port`` domains); with ``ignore_port`` (Envoy's
    ``ignore_port_in_host_matching``) the port is stripped first. Ties keep the first vhost.
    """
    host = authority.lower()
    if ignore_port:
        host = _strip_port(host)
    best: VirtualHost | None = None
    best_rank: tuple[int, int] | None = None
    for vh in vhosts:
        for domain in vh.domains:
            rank = _match_rank(domain, host)
            if rank is not None and (best_rank is None or rank > best_rank):
                best, best_rank = vh, rank
    return best
