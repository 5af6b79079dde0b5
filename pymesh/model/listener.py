"""Listener models (LDS): client-side API listeners and server-side listeners (gRFC A36).

A client-side ``Listener`` (named ``host:port`` by Istio) carries an HTTP connection manager
in ``api_listener``; a server-side one (``xds.istio.io/grpc/lds/inbound/IP:PORT``) carries an
address and filter chains, each with its own HCM and downstream TLS settings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pymesh.model.common import SocketAddress
from pymesh.model.http_filters import HttpFilter
from pymesh.model.route import CidrRange, RouteConfiguration
from pymesh.model.tls import DownstreamTlsContext

__all__ = [
    "ConnectionSourceType",
    "EscapedSlashesAction",
    "FilterChain",
    "FilterChainMatch",
    "HttpConnectionManager",
    "Listener",
    "PathNormalization",
]


class EscapedSlashesAction(enum.Enum):
    """HCM ``path_with_escaped_slashes_action``: what to do with ``%2F``/``%5C`` in a path."""

    IMPLEMENTATION_SPECIFIC_DEFAULT = 0
    """Envoy's default: keep them unchanged (as ``KEEP_UNCHANGED``)."""
    KEEP_UNCHANGED = 1
    REJECT_REQUEST = 2
    """Answer 400 (gRPC: INTERNAL) to a path carrying an escaped slash."""
    UNESCAPE_AND_REDIRECT = 3
    """Unescape, then answer 307 with the unescaped path in ``location`` (gRPC: rejected)."""
    UNESCAPE_AND_FORWARD = 4
    """Unescape and carry on with the unescaped path."""


@dataclass(frozen=True, slots=True)
class PathNormalization:
    """How an inbound HCM rewrites the request path before its filters and the application
    see it (Envoy order: escaped slashes, then ``normalize_path``, then ``merge_slashes``).

    ``normalize`` is the HCM's ``normalize_path``. Envoy leaves it off when the field is
    unset; pymesh turns it on then, as istiod sets it on every sidecar (meshConfig
    ``pathNormalization`` BASE, Istio's default) and a path-based policy is unsafe without
    it. An explicit ``false`` (Istio's ``NONE``) turns it off."""

    normalize: bool = True
    merge_slashes: bool = False
    escaped_slashes: EscapedSlashesAction = EscapedSlashesAction.IMPLEMENTATION_SPECIFIC_DEFAULT


@dataclass(frozen=True, slots=True)
class HttpConnectionManager:
    """``HttpConnectionManager`` as used by pymesh.

    Exactly one of ``rds_name`` (fetch the ``RouteConfiguration`` of that name over ADS) and
    ``route_config`` (inline) is set. ``http_filters`` ends with the router filter.
    """

    http_filters: tuple[HttpFilter, ...] = ()
    rds_name: str | None = None
    route_config: RouteConfiguration | None = None
    max_stream_duration: float | None = None
    stream_idle_timeout: float | None = None
    request_timeout: float | None = None
    path_normalization: PathNormalization = PathNormalization()


class ConnectionSourceType(enum.Enum):
    ANY = 0
    SAME_IP_OR_LOOPBACK = 1
    EXTERNAL = 2


@dataclass(frozen=True, slots=True)
class FilterChainMatch:
    """``listener.v3.FilterChainMatch``: every field Envoy matches on.

    gRPC (A36) never matches a chain with ``destination_port``, ``server_names`` or
    ``application_protocols`` set, or a ``transport_protocol`` other than ``raw_buffer``
    (it has no listener filters to learn them); :attr:`grpc_matchable` says whether the
    chain can match in that model.
    """

    destination_port: int | None = None
    prefix_ranges: tuple[CidrRange, ...] = ()
    source_type: ConnectionSourceType = ConnectionSourceType.ANY
    source_prefix_ranges: tuple[CidrRange, ...] = ()
    source_ports: tuple[int, ...] = ()
    transport_protocol: str = ""
    application_protocols: tuple[str, ...] = ()
    server_names: tuple[str, ...] = ()

    @property
    def grpc_matchable(self) -> bool:
        return (
            self.destination_port is None
            and not self.server_names
            and not self.application_protocols
            and self.transport_protocol in ("", "raw_buffer")
        )


@dataclass(frozen=True, slots=True)
class FilterChain:
    """One filter chain of a server listener: its match, its HCM, and its downstream TLS
    (``None`` = plaintext)."""

    name: str
    match: FilterChainMatch
    hcm: HttpConnectionManager
    tls: DownstreamTlsContext | None = None


@dataclass(frozen=True, slots=True)
class Listener:
    """``listener.v3.Listener``. Client-side: ``api_listener`` set. Server-side: ``address``
    and ``filter_chains`` / ``default_filter_chain``."""

    name: str
    address: SocketAddress | None = None
    api_listener: HttpConnectionManager | None = None
    filter_chains: tuple[FilterChain, ...] = ()
    default_filter_chain: FilterChain | None = None

    @property
    def is_server(self) -> bool:
        return self.api_listener is None

    def _hcms(self) -> list[HttpConnectionManager]:
        hcms = [fc.hcm for fc in self.filter_chains]
        if self.default_filter_chain is not None:
            hcms.append(self.default_filter_chain.hcm)
        if self.api_listener is not None:
            hcms.append(self.api_listener)
        return hcms

    def route_config_names(self) -> frozenset[str]:
        """Every RDS name referenced by the API listener and all filter chains."""
        return frozenset(h.rds_name for h in self._hcms() if h.rds_name is not None)
