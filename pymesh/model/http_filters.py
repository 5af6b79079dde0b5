"""HTTP filter configuration models: router, fault injection (gRFC A33), RBAC (gRFC A41).

The decoders in :mod:`pymesh.xds.codec.http_filters` build these; the policy core evaluates
them later. They carry everything the Envoy protos say, not only what gRPC uses.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pymesh.model.matcher import StringMatcher
from pymesh.model.route import CidrRange, FractionalPercent, HeaderMatcher, OpaqueConfig

__all__ = [
    "FILTER_ROUTER",
    "AndRule",
    "AnyRule",
    "AuthenticatedPrincipal",
    "DestinationIp",
    "DestinationPort",
    "DestinationPortRange",
    "FaultAbort",
    "FaultConfig",
    "FaultDelay",
    "HeaderRule",
    "HttpFilter",
    "IpRule",
    "IpSource",
    "MetadataRule",
    "NotRule",
    "OrRule",
    "Permission",
    "Principal",
    "RbacAction",
    "RbacConfig",
    "RbacPerRoute",
    "RbacPolicy",
    "RbacRules",
    "RequestedServerName",
    "RouterConfig",
    "UrlPathRule",
]

FILTER_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """``envoy.extensions.filters.http.router.v3.Router`` (the terminal filter)."""

    suppress_envoy_headers: bool = False
    start_child_span: bool = False
    respect_expected_rq_timeout: bool = False


# --------------------------------------------------------------------------- fault (A33)


@dataclass(frozen=True, slots=True)
class FaultDelay:
    """Delay ``fixed_delay`` seconds, or (``header_delay``) the ``x-envoy-fault-delay-request``
    header's milliseconds, for ``percentage`` of requests."""

    percentage: FractionalPercent
    fixed_delay: float | None = None
    header_delay: bool = False


@dataclass(frozen=True, slots=True)
class FaultAbort:
    """Abort with ``http_status`` or ``grpc_status``, or (``header_abort``) per the
    ``x-envoy-fault-abort-request`` / ``-grpc-request`` headers, for ``percentage``."""

    percentage: FractionalPercent
    http_status: int | None = None
    grpc_status: int | None = None
    header_abort: bool = False


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """``envoy.extensions.filters.http.fault.v3.HTTPFault`` (filter config and per-route
    override alike). ``max_active_faults`` ``None`` = unlimited."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    upstream_cluster: str = ""
    downstream_nodes: tuple[str, ...] = ()
    headers: tuple[HeaderMatcher, ...] = ()
    max_active_faults: int | None = None
    disable_downstream_cluster_stats: bool = False


# --------------------------------------------------------------------------- RBAC (A41)


class RbacAction(enum.Enum):
    """``ALLOW``: only matching requests pass; ``DENY``: matching requests are refused;
    ``LOG``: Envoy only records the decision, gRPC ignores the filter (A41)."""

    ALLOW = 0
    DENY = 1
    LOG = 2


@dataclass(frozen=True, slots=True)
class AndRule:
    """All of ``rules`` (``and_rules`` / ``and_ids``)."""

    rules: tuple[Permission | Principal, ...]


@dataclass(frozen=True, slots=True)
class OrRule:
    """Any of ``rules`` (``or_rules`` / ``or_ids``)."""

    rules: tuple[Permission | Principal, ...]


@dataclass(frozen=True, slots=True)
class NotRule:
    rule: Permission | Principal


@dataclass(frozen=True, slots=True)
class AnyRule:
    """``any: true``: always matches."""


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """Match a request header (``:authority`` and ``host`` are equivalent)."""

    matcher: HeaderMatcher


@dataclass(frozen=True, slots=True)
class UrlPathRule:
    """Match the path without query (``type.matcher.v3.PathMatcher``)."""

    matcher: StringMatcher


@dataclass(frozen=True, slots=True)
class MetadataRule:
    """Envoy dynamic metadata matcher: never matches in pymesh (as in gRPC, A41), but kept
    so that ``not`` around it still evaluates correctly."""

    filter: str = ""
    invert: bool = False


@dataclass(frozen=True, slots=True)
class RequestedServerName:
    """SNI matcher (A41: the server name is taken as empty)."""

    matcher: StringMatcher


@dataclass(frozen=True, slots=True)
class DestinationIp:
    cidr: CidrRange


@dataclass(frozen=True, slots=True)
class DestinationPort:
    port: int


@dataclass(frozen=True, slots=True)
class DestinationPortRange:
    """Half-open ``[start, end)``."""

    start: int
    end: int


class IpSource(enum.Enum):
    SOURCE_IP = "source_ip"
    DIRECT_REMOTE_IP = "direct_remote_ip"
    REMOTE_IP = "remote_ip"


@dataclass(frozen=True, slots=True)
class IpRule:
    """Peer address inside ``cidr`` (``source``: which address Envoy would take)."""

    cidr: CidrRange
    source: IpSource = IpSource.DIRECT_REMOTE_IP


@dataclass(frozen=True, slots=True)
class AuthenticatedPrincipal:
    """``authenticated``: TLS peer whose URI SAN, else DNS SAN, else subject matches
    ``principal_name``; ``None`` matches any TLS connection (A41)."""

    principal_name: StringMatcher | None = None


Permission = (
    AndRule
    | OrRule
    | NotRule
    | AnyRule
    | HeaderRule
    | UrlPathRule
    | DestinationIp
    | DestinationPort
    | DestinationPortRange
    | MetadataRule
    | RequestedServerName
)
Principal = (
    AndRule
    | OrRule
    | NotRule
    | AnyRule
    | HeaderRule
    | UrlPathRule
    | IpRule
    | AuthenticatedPrincipal
    | MetadataRule
)


@dataclass(frozen=True, slots=True)
class RbacPolicy:
    """A policy matches when any permission and any principal match."""

    permissions: tuple[Permission, ...]
    principals: tuple[Principal, ...]


@dataclass(frozen=True, slots=True)
class RbacRules:
    """``config.rbac.v3.RBAC``. ``policies`` keeps the resource's order (sorted by name,
    which is what Envoy's map iteration gives for reporting)."""

    action: RbacAction
    policies: Mapping[str, RbacPolicy] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class RbacConfig:
    """``envoy.extensions.filters.http.rbac.v3.RBAC``. ``rules`` ``None`` = no enforcement
    (everything allowed); ``shadow_rules`` are ignored."""

    rules: RbacRules | None = None


@dataclass(frozen=True, slots=True)
class RbacPerRoute:
    """``RBACPerRoute``: ``rbac`` ``None`` disables RBAC on the route."""

    rbac: RbacConfig | None = None


# --------------------------------------------------------------------------- filter list


@dataclass(frozen=True, slots=True)
class HttpFilter:
    """One entry of an HCM's ``http_filters``.

    ``config`` is :class:`RouterConfig`, :class:`FaultConfig`, :class:`RbacConfig`, or an
    :class:`~pymesh.model.route.OpaqueConfig` for a filter we recognise but do not run
    (telemetry-only Istio extensions, CORS, stateful session). Unknown filters marked
    ``is_optional`` are dropped by the decoder and never appear here. ``disabled`` is the
    HCM flag: the filter runs only where a route's ``typed_per_filter_config`` enables it.
    """

    name: str
    type_url: str
    config: RouterConfig | FaultConfig | RbacConfig | OpaqueConfig
    is_optional: bool = False
    disabled: bool = False

    @property
    def is_router(self) -> bool:
        return isinstance(self.config, RouterConfig)
