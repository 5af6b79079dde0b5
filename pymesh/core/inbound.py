"""The inbound filter chain of an xDS-managed server (gRFC A36, A33, A41), as pure code.

Shared by the gRPC server (``pymesh.grpc``, A36 rules) and the ASGI middleware
(``pymesh.asgi``, which also knows each connection's transport protocol, so it matches
chains the way Envoy's TLS inspector lets Envoy: ``transport_protocol`` ``tls`` /
``raw_buffer``, and ``destination_port``).

:func:`decide` takes the server's current :class:`~pymesh.model.snapshot.ServerSnapshot`, the
RPC (:class:`~pymesh.core.types.RequestInfo`) and its connection
(:class:`~pymesh.core.rbac.PeerInfo`) and answers an :class:`InboundDecision`: serve (maybe
after a fault delay) or fail with a gRPC status. The sync and asyncio interceptors in
``_server.py`` / ``aio/_server.py`` only gather the inputs, sleep the delay and act.

The order, written down once (each step says why it sits there):

1. **filter chain** for the connection (A36: destination IP prefix, source type, source IP
   prefix, source port — most specific wins, memoized per peer; chains using fields gRPC
   cannot match are never chosen; else the default chain). No chain: UNAVAILABLE (A36
   closes the connection). A chain that demands TLS on a plaintext port: UNAVAILABLE (no
   certificate provider here).
2. **route configuration** of the chain's HCM: inline, or the RDS one from the snapshot
   (missing/invalid: UNAVAILABLE, A36).
3. **virtual host** by ``:authority``, then the **route** on the method path. No match, or a
   route whose action is not ``non_forwarding_action``: UNAVAILABLE (A36).
4. the HCM's **HTTP filters in order**, each with its per-route override (route > virtual
   host > route configuration): the fault filter (delay, then abort with its gRPC status or
   the gRPC status of its HTTP status), RBAC (deny: PERMISSION_DENIED "RBAC: access denied");
   the router ends the chain. A filter that refuses stops the chain (an RBAC deny placed
   before a fault filter gets no delay, as in Envoy).
"""

from __future__ import annotations

import ipaddress
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pymesh.core.fault import ActiveFaults, decide_fault
from pymesh.core.rbac import ACCESS_DENIED, PeerInfo, evaluate_rbac
from pymesh.core.routing import route_request, select_vhost
from pymesh.core.types import RequestInfo
from pymesh.model.http_filters import FaultConfig, HttpFilter, RbacConfig, RbacPerRoute
from pymesh.model.listener import ConnectionSourceType, FilterChain, FilterChainMatch, Listener
from pymesh.model.route import (
    CidrRange,
    FilterConfigOverride,
    NonForwardingAction,
    Route,
    RouteConfiguration,
    VirtualHost,
)
from pymesh.model.snapshot import RouteConfigError, ServerSnapshot

__all__ = [
    "SERVE",
    "InboundDecision",
    "InboundState",
    "decide",
    "grpc_status_for_http",
    "select_filter_chain",
    "tls_only_message",
]

# gRPC status codes (ints: this module does not import grpcio).
OK = 0
UNKNOWN = 2
PERMISSION_DENIED = 7
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

_HTTP_TO_GRPC = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}


def grpc_status_for_http(status: int) -> int:
    """gRPC's HTTP-to-gRPC status mapping (``doc/http-grpc-status-mapping.md``)."""
    return _HTTP_TO_GRPC.get(status, UNKNOWN)


@dataclass(frozen=True, slots=True)
class InboundDecision:
    """Sleep ``delay`` seconds (``None``: none), then fail with ``code``/``message`` (``code``
    ``None``: serve). ``fault`` is the filter whose active-fault slot the call holds (release
    it when the RPC ends), if any."""

    delay: float | None = None
    code: int | None = None
    message: str = ""
    fault: ActiveFaults | None = None
    http_status: int | None = None
    """The HTTP status of a refusal (HTTP servers answer it; gRPC servers use ``code``)."""


SERVE = InboundDecision()


_CHAIN_CACHE_MAX = 4096


class InboundState:
    """What a server keeps across RPCs: the active-fault counters per fault filter name
    (``max_active_faults``), the random source of fault draws, and the filter chain chosen
    per (listener, source IP, destination IP) — a connection's chain only depends on those,
    so it is computed once instead of on every RPC."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._faults: dict[str, ActiveFaults] = {}
        self._lock = threading.Lock()
        self._chains: dict[
            tuple[int, str | None, str | None, int | None, str | None],
            tuple[Listener, FilterChain | None],
        ] = {}

    def filter_chain(
        self, listener: Listener, peer: PeerInfo, transport: str | None = None
    ) -> FilterChain | None:
        """:func:`select_filter_chain`, memoized (benign races: same answer either way)."""
        # The source port only matters to listeners with chains listing ports (then the
        # cache holds one entry per connection, bounded by _CHAIN_CACHE_MAX).
        port = peer.source_port if _uses_source_ports(listener) else None
        key = (id(listener), peer.source_ip, peer.destination_ip, port, transport)
        hit = self._chains.get(key)
        if hit is not None and hit[0] is listener:
            return hit[1]
        chain = select_filter_chain(listener, peer, transport=transport)
        if len(self._chains) >= _CHAIN_CACHE_MAX:
            self._chains.clear()
        self._chains[key] = (listener, chain)
        return chain

    def active_faults(self, name: str) -> ActiveFaults:
        found = self._faults.get(name)
        if found is None:
            with self._lock:
                found = self._faults.setdefault(name, ActiveFaults())
        return found


# --------------------------------------------------------------------------- filter chains


def _uses_source_ports(listener: Listener) -> bool:
    return any(c.match.source_ports for c in listener.filter_chains)


def _is_local(source: str, destination: str | None) -> bool:
    try:
        addr = ipaddress.ip_address(source)
    except ValueError:
        return False
    return addr.is_loopback or (destination is not None and source == destination)


def _prefix_rank(ranges: Sequence[CidrRange], ip: str | None) -> int | None:
    """Length of the longest range containing ``ip``; -1 when there are no ranges (matches
    anything, least specific); ``None`` when ranges exist and none contains ``ip``."""
    if not ranges:
        return -1
    best: int | None = None
    for r in ranges:
        if ip is not None and r.contains(ip):
            best = max(best if best is not None else -1, r.network.prefixlen)
    return best


def _narrow(
    chains: list[FilterChain], rank_of: Callable[[FilterChain], int | None]
) -> list[FilterChain]:
    ranked = [(r, c) for c in chains if (r := rank_of(c)) is not None]
    if not ranked:
        return []
    top = max(r for r, _ in ranked)
    return [c for r, c in ranked if r == top]


def _http_matchable(match: FilterChainMatch, peer: PeerInfo, transport: str) -> bool:
    """Whether an HTTP server that knows the connection's transport protocol (and SNI) can
    match a chain: ALPN-based chains are never matched (no listener filter reads ALPN)."""
    return (
        match.transport_protocol in ("", transport)
        and not match.application_protocols
        and (not match.server_names or peer.server_name in match.server_names)
        and (match.destination_port is None or match.destination_port == peer.destination_port)
    )


def select_filter_chain(
    listener: Listener, peer: PeerInfo, *, transport: str | None = None
) -> FilterChain | None:
    """A36 filter chain selection for a connection from ``peer.source_ip`` to
    ``peer.destination_ip``/``destination_port``; the default chain when none matches.

    ``transport`` (``"tls"`` or ``"raw_buffer"``), given by servers that see the connection's
    first bytes (the ASGI server), adds Envoy's stages: destination port, server name and
    transport protocol, a chain naming the value beating a chain leaving it empty. gRPC
    (``None``) keeps A36's rule: chains using those fields never match.
    """
    if transport is None:
        chains = [c for c in listener.filter_chains if c.match.grpc_matchable]
    else:
        chains = [c for c in listener.filter_chains if _http_matchable(c.match, peer, transport)]
    src, dst = peer.source_ip, peer.destination_ip
    local = src is not None and _is_local(src, dst)

    def dport_rank(c: FilterChain) -> int | None:
        return 0 if c.match.destination_port is None else 1

    def dest_rank(c: FilterChain) -> int | None:
        return _prefix_rank(c.match.prefix_ranges, dst)

    def sni_rank(c: FilterChain) -> int | None:
        return 1 if c.match.server_names else 0

    def transport_rank(c: FilterChain) -> int | None:
        return 1 if c.match.transport_protocol else 0

    def type_rank(c: FilterChain) -> int | None:
        t = c.match.source_type
        if t is ConnectionSourceType.ANY:
            return 0
        if (t is ConnectionSourceType.SAME_IP_OR_LOOPBACK) == local:
            return 1
        return None

    def source_rank(c: FilterChain) -> int | None:
        return _prefix_rank(c.match.source_prefix_ranges, src)

    def port_rank(c: FilterChain) -> int | None:
        ports = c.match.source_ports
        if not ports:
            return 0
        return 1 if peer.source_port in ports else None

    stages: tuple[Callable[[FilterChain], int | None], ...] = (
        dest_rank,
        type_rank,
        source_rank,
        port_rank,
    )
    if transport is not None:
        stages = (dport_rank, dest_rank, sni_rank, transport_rank, *stages[1:])
    for rank in stages:
        chains = _narrow(chains, rank)
        if not chains:
            return listener.default_filter_chain
    return chains[0]


# --------------------------------------------------------------------------- decision


def _override(
    name: str, route: Route, vhost: VirtualHost, config: RouteConfiguration
) -> FilterConfigOverride | None:
    return (
        route.typed_per_filter_config.get(name)
        or vhost.typed_per_filter_config.get(name)
        or config.typed_per_filter_config.get(name)
    )


def _fault_config(
    f: HttpFilter, route: Route, vhost: VirtualHost, config: RouteConfiguration
) -> FaultConfig | None:
    base = f.config
    assert isinstance(base, FaultConfig)
    override = _override(f.name, route, vhost, config)
    if override is not None:
        if override.disabled:
            return None
        if isinstance(override.config, FaultConfig):
            base = override.config
    elif f.disabled:
        return None
    return base


def _rbac_config(
    f: HttpFilter, route: Route, vhost: VirtualHost, config: RouteConfiguration
) -> RbacConfig | None:
    base = f.config
    assert isinstance(base, RbacConfig)
    override = _override(f.name, route, vhost, config)
    if override is not None:
        if override.disabled:
            return None
        if isinstance(override.config, RbacPerRoute):
            return override.config.rbac
        if isinstance(override.config, RbacConfig):
            return override.config
    elif f.disabled:
        return None
    return base


def _fail(code: int, message: str, http_status: int = 503) -> InboundDecision:
    return InboundDecision(code=code, message=message, http_status=http_status)


def decide(
    snapshot: ServerSnapshot,
    request: RequestInfo,
    peer: PeerInfo,
    state: InboundState,
    *,
    secure: bool = False,
    transport: str | None = None,
    chain: FilterChain | None = None,
) -> InboundDecision:
    """The inbound verdict for one RPC (see the module's order). ``secure``: the port the
    RPC came on is a TLS port (so a chain demanding TLS is satisfied). ``transport``: the
    connection's transport protocol when the server knows it (see
    :func:`select_filter_chain`; ``"tls"`` implies ``secure``). ``chain``: the
    connection's filter chain when the caller already selected it
    (:meth:`InboundState.filter_chain` with the same arguments), else selected here."""
    secure = secure or transport == "tls"
    if chain is None:
        chain = state.filter_chain(snapshot.listener, peer, transport)
    if chain is None:
        return _fail(UNAVAILABLE, "no matching filter chain in the xDS listener")
    if chain.tls is not None and not secure:
        return _fail(
            UNAVAILABLE,
            f"filter chain {chain.name!r} requires TLS but this port is plaintext "
            "(no certificate provider)",
        )
    hcm = chain.hcm
    config: RouteConfiguration | RouteConfigError | None = hcm.route_config
    if config is None and hcm.rds_name is not None:
        config = snapshot.route_configs.get(hcm.rds_name)
    if config is None or isinstance(config, RouteConfigError):
        why = config.message if isinstance(config, RouteConfigError) else "not received"
        return _fail(UNAVAILABLE, f"route configuration {hcm.rds_name!r}: {why}")
    vhost = select_vhost(config, request.authority)
    if vhost is None:
        return _fail(UNAVAILABLE, f"no virtual host for authority {request.authority!r}", 404)
    route = route_request(vhost, request, rng=state.rng)
    if route is None:
        return _fail(UNAVAILABLE, f"no route matched {request.path!r}", 404)
    if not isinstance(route.action, NonForwardingAction):
        return _fail(UNAVAILABLE, "the matched route is not a non-forwarding route")
    delay: float | None = None
    held: ActiveFaults | None = None
    for f in hcm.http_filters:
        if isinstance(f.config, FaultConfig):
            fault = _fault_config(f, route, vhost, config)
            if fault is None:
                continue
            counter = state.active_faults(f.name)
            decision = decide_fault(
                fault, request, rng=state.rng, active_faults=counter.count, cluster=""
            )
            if decision.active and held is None:
                counter.start()
                held = counter
            if decision.delay is not None:
                delay = (delay or 0.0) + decision.delay
            if decision.abort_status is not None:
                code = decision.abort_grpc_status
                if code is None:
                    code = grpc_status_for_http(decision.abort_status)
                return InboundDecision(
                    delay, code, "fault filter abort", held, decision.abort_status
                )
        elif isinstance(f.config, RbacConfig):
            rbac = _rbac_config(f, route, vhost, config)
            if not evaluate_rbac(rbac, request, peer).allowed:
                return InboundDecision(delay, PERMISSION_DENIED, ACCESS_DENIED, held, 403)
        elif f.is_router:
            break
    if delay is None and held is None:
        return SERVE
    return InboundDecision(delay, None, "", held)


def tls_only_message(listener: Listener, *, secure: bool) -> str | None:
    """Why a plaintext port cannot serve with ``listener`` at all (every chain it could pick
    demands TLS), or ``None``."""
    if secure:
        return None
    chains = [c for c in listener.filter_chains if c.match.grpc_matchable]
    if listener.default_filter_chain is not None:
        chains.append(listener.default_filter_chain)
    if chains and all(c.tls is not None for c in chains):
        return (
            f"listener {listener.name!r} requires TLS (mTLS per PeerAuthentication) but the "
            "port is plaintext: no certificate provider serves it (bind it with "
            "add_secure_port(address, pymesh.grpc.mesh_server_credentials()))"
        )
    return None
