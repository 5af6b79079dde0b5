"""RBAC evaluation (Envoy's ``envoy.filters.http.rbac`` as gRPC runs it, gRFC A41).

Pure code: a request (:class:`~pymesh.core.types.RequestInfo`) and what is known of its
connection (:class:`PeerInfo`) in, a decision out. The server adapter gathers the inputs and
answers ``PERMISSION_DENIED`` "RBAC: access denied" on a deny.

Theory of operation — one RBAC filter (``RbacConfig``):

=====================  ===================================================================
``rules`` is ``None``  no enforcement: allowed
action ``ALLOW``       allowed iff some policy matches (no policy: everything denied)
action ``DENY``        denied iff some policy matches (no policy: everything allowed)
action ``LOG``         gRPC ignores the filter (A41): allowed
=====================  ===================================================================

A policy matches when *any* of its permissions and *any* of its principals match. Several
RBAC filters in an HCM (Istio: DENY first, then ALLOW) are applied in order; the request
passes only if every one allows it (:func:`evaluate_filters`).

Leaf semantics (A41, checked against grpc-go's ``rbac`` engine):

- ``header``: Envoy's header matching; ``:path``, ``:method``, ``:authority`` (``host`` is the
  same) come from the request;
- ``url_path``: the path without the query string;
- ``destination_ip`` / ``destination_port`` / range: the server's local address;
- ``direct_remote_ip`` / ``remote_ip`` / ``source_ip``: the peer address (gRPC has no proxy
  protocol or XFF here, so all three are the peer's IP);
- ``authenticated``: only TLS connections; no ``principal_name`` = any TLS peer; otherwise
  any URI SAN, then any DNS SAN, then the subject of the peer certificate may match (A41 /
  grpc-go order; Envoy stops at the first non-empty kind); a TLS peer without a certificate
  matches when ``""`` does. A plaintext peer never matches;
- ``requested_server_name``: the SNI, taken as ``""`` (A41);
- ``metadata``: never matches (``invert`` flips it: then always matches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pymesh.core.routing import request_header_matches
from pymesh.core.types import RequestInfo
from pymesh.model.http_filters import (
    AndRule,
    AnyRule,
    AuthenticatedPrincipal,
    DestinationIp,
    DestinationPort,
    DestinationPortRange,
    HeaderRule,
    IpRule,
    MetadataRule,
    NotRule,
    OrRule,
    Permission,
    Principal,
    RbacAction,
    RbacConfig,
    RbacPolicy,
    RequestedServerName,
    UrlPathRule,
)

__all__ = [
    "ACCESS_DENIED",
    "PeerInfo",
    "RbacDecision",
    "evaluate_filters",
    "evaluate_rbac",
]

ACCESS_DENIED = "RBAC: access denied"
"""The message Envoy and gRPC give a request RBAC refuses."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The connection of a request, as RBAC sees it.

    ``tls`` is True for a TLS connection; the peer certificate's URI SANs, DNS SANs and
    subject (all empty: no client certificate) are the candidates for ``authenticated``
    principals.
    """

    source_ip: str | None = None
    source_port: int | None = None
    destination_ip: str | None = None
    destination_port: int | None = None
    tls: bool = False
    uri_sans: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    subject: str = ""
    server_name: str = ""


@dataclass(frozen=True, slots=True)
class RbacDecision:
    """``allowed``; ``policy`` is the name of the policy that decided (the matching ALLOW
    policy, or the matching DENY policy), ``None`` when none matched."""

    allowed: bool
    policy: str | None = None


ALLOWED = RbacDecision(True)


def _rule(rule: Permission | Principal, request: RequestInfo, peer: PeerInfo) -> bool:
    if isinstance(rule, AnyRule):
        return True
    if isinstance(rule, AndRule):
        return all(_rule(r, request, peer) for r in rule.rules)
    if isinstance(rule, OrRule):
        return any(_rule(r, request, peer) for r in rule.rules)
    if isinstance(rule, NotRule):
        return not _rule(rule.rule, request, peer)
    if isinstance(rule, HeaderRule):
        return request_header_matches(rule.matcher, request)
    if isinstance(rule, UrlPathRule):
        return rule.matcher.matches(request.path_only)
    if isinstance(rule, DestinationIp):
        return peer.destination_ip is not None and rule.cidr.contains(peer.destination_ip)
    if isinstance(rule, DestinationPort):
        return peer.destination_port == rule.port
    if isinstance(rule, DestinationPortRange):
        port = peer.destination_port
        return port is not None and rule.start <= port < rule.end
    if isinstance(rule, IpRule):
        return peer.source_ip is not None and rule.cidr.contains(peer.source_ip)
    if isinstance(rule, AuthenticatedPrincipal):
        return _authenticated(rule, peer)
    if isinstance(rule, RequestedServerName):
        return rule.matcher.matches(peer.server_name)
    if isinstance(rule, MetadataRule):
        return rule.invert
    raise TypeError(f"unknown RBAC rule {rule!r}")  # pragma: no cover - the model is closed


def _authenticated(rule: AuthenticatedPrincipal, peer: PeerInfo) -> bool:
    if not peer.tls:
        return False
    matcher = rule.principal_name
    if matcher is None:
        return True
    if not (peer.uri_sans or peer.dns_sans or peer.subject):
        return matcher.matches("")  # TLS without a client certificate (A41)
    return (
        any(matcher.matches(s) for s in peer.uri_sans)
        or any(matcher.matches(s) for s in peer.dns_sans)
        or matcher.matches(peer.subject)
    )


def policy_matches(policy: RbacPolicy, request: RequestInfo, peer: PeerInfo) -> bool:
    """Any permission and any principal match."""
    return any(_rule(p, request, peer) for p in policy.permissions) and any(
        _rule(p, request, peer) for p in policy.principals
    )


def evaluate_rbac(config: RbacConfig | None, request: RequestInfo, peer: PeerInfo) -> RbacDecision:
    """One RBAC filter's decision (see the module's table)."""
    rules = None if config is None else config.rules
    if rules is None or rules.action is RbacAction.LOG:
        return ALLOWED
    matched = next(
        (name for name, policy in rules.policies.items() if policy_matches(policy, request, peer)),
        None,
    )
    if rules.action is RbacAction.ALLOW:
        return RbacDecision(matched is not None, matched)
    return RbacDecision(matched is None, matched)


def evaluate_filters(
    configs: Sequence[RbacConfig | None], request: RequestInfo, peer: PeerInfo
) -> RbacDecision:
    """Several RBAC filters in order: the first deny decides, else allowed."""
    last = ALLOWED
    for config in configs:
        decision = evaluate_rbac(config, request, peer)
        if not decision.allowed:
            return decision
        last = decision
    return last
