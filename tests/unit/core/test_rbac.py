"""RBAC evaluator (``pymesh.core.rbac``), gRFC A41 semantics, as one table."""

from __future__ import annotations

import ipaddress
from types import MappingProxyType

import pytest

from pymesh.core.rbac import ACCESS_DENIED, PeerInfo, evaluate_filters, evaluate_rbac
from pymesh.core.types import Headers, RequestInfo
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
    RbacRules,
    RequestedServerName,
    UrlPathRule,
)
from pymesh.model.matcher import StringMatcher
from pymesh.model.route import CidrRange, HeaderMatcher

SPIFFE = "spiffe://cluster.local/ns/default/sa/productpage"


def _req(path: str = "/pkg.Svc/Get", **headers: str) -> RequestInfo:
    return RequestInfo(
        method="POST",
        authority="ratings:9080",
        path=path,
        headers=Headers([(k.replace("_", "-"), v) for k, v in headers.items()]),
        grpc=True,
    )


PLAIN = PeerInfo(source_ip="10.1.2.3", destination_ip="10.0.0.9", destination_port=9080)
MTLS = PeerInfo(
    source_ip="10.1.2.3",
    destination_ip="10.0.0.9",
    destination_port=9080,
    tls=True,
    uri_sans=(SPIFFE,),
    dns_sans=("productpage.default.svc",),
    subject="CN=productpage",
)
CERT_NO_URI = PeerInfo(source_ip="10.1.2.3", tls=True, dns_sans=("a.example",), subject="CN=x")
CERT_SUBJECT_ONLY = PeerInfo(source_ip="10.1.2.3", tls=True, subject="CN=x")


def cidr(text: str) -> CidrRange:
    return CidrRange(ipaddress.ip_network(text))


def header(name: str, value: str) -> HeaderRule:
    return HeaderRule(HeaderMatcher(name, string_match=StringMatcher.exact(value)))


def principal(m: StringMatcher | None) -> AuthenticatedPrincipal:
    return AuthenticatedPrincipal(m)


# (id, permission, principal, request, peer, policy matches?)
CASES: list[tuple[str, Permission, Principal, RequestInfo, PeerInfo, bool]] = [
    ("any/any", AnyRule(), AnyRule(), _req(), PLAIN, True),
    ("header hit", header("x-user", "a"), AnyRule(), _req(x_user="a"), PLAIN, True),
    ("header miss", header("x-user", "a"), AnyRule(), _req(x_user="b"), PLAIN, False),
    ("header absent", header("x-user", "a"), AnyRule(), _req(), PLAIN, False),
    (
        "repeated header any value",
        header("x-user", "a"),
        AnyRule(),
        RequestInfo("POST", "h", "/p", Headers([("x-user", "b"), ("x-user", "a")]), grpc=True),
        PLAIN,
        True,
    ),
    (":path pseudo header", header(":path", "/pkg.Svc/Get"), AnyRule(), _req(), PLAIN, True),
    (":method pseudo header", header(":method", "POST"), AnyRule(), _req(), PLAIN, True),
    (
        ":authority pseudo header",
        header(":authority", "ratings:9080"),
        AnyRule(),
        _req(),
        PLAIN,
        True,
    ),
    ("host is :authority", header("host", "ratings:9080"), AnyRule(), _req(), PLAIN, True),
    (
        "url_path prefix",
        UrlPathRule(StringMatcher.prefix("/pkg.Svc/")),
        AnyRule(),
        _req(),
        PLAIN,
        True,
    ),
    (
        "url_path ignores query",
        UrlPathRule(StringMatcher.exact("/p")),
        AnyRule(),
        _req("/p?x=1"),
        PLAIN,
        True,
    ),
    (
        "url_path miss",
        UrlPathRule(StringMatcher.exact("/pkg.Svc/Put")),
        AnyRule(),
        _req(),
        PLAIN,
        False,
    ),
    ("destination port", DestinationPort(9080), AnyRule(), _req(), PLAIN, True),
    ("destination port miss", DestinationPort(9081), AnyRule(), _req(), PLAIN, False),
    (
        "destination port range half-open",
        DestinationPortRange(9000, 9080),
        AnyRule(),
        _req(),
        PLAIN,
        False,
    ),
    ("destination port range", DestinationPortRange(9000, 9081), AnyRule(), _req(), PLAIN, True),
    ("destination ip", DestinationIp(cidr("10.0.0.0/24")), AnyRule(), _req(), PLAIN, True),
    ("destination ip miss", DestinationIp(cidr("10.0.1.0/24")), AnyRule(), _req(), PLAIN, False),
    ("source ip", AnyRule(), IpRule(cidr("10.1.0.0/16")), _req(), PLAIN, True),
    ("source ip miss", AnyRule(), IpRule(cidr("192.168.0.0/16")), _req(), PLAIN, False),
    (
        "ipv4 rule, ipv6 peer",
        AnyRule(),
        IpRule(cidr("0.0.0.0/0")),
        _req(),
        PeerInfo(source_ip="::1"),
        False,
    ),
    ("authenticated: plaintext never", AnyRule(), principal(None), _req(), PLAIN, False),
    (
        "authenticated: plaintext never (exact)",
        AnyRule(),
        principal(StringMatcher.exact("")),
        _req(),
        PLAIN,
        False,
    ),
    ("authenticated: any cert", AnyRule(), principal(None), _req(), MTLS, True),
    (
        "authenticated: URI SAN",
        AnyRule(),
        principal(StringMatcher.exact(SPIFFE)),
        _req(),
        MTLS,
        True,
    ),
    (
        "authenticated: URI SAN suffix",
        AnyRule(),
        principal(StringMatcher.suffix("/sa/productpage")),
        _req(),
        MTLS,
        True,
    ),
    (
        "authenticated: DNS SAN beside URI SANs (A41)",
        AnyRule(),
        principal(StringMatcher.exact("productpage.default.svc")),
        _req(),
        MTLS,
        True,
    ),
    (
        "authenticated: no SAN matches",
        AnyRule(),
        principal(StringMatcher.exact("CN=other")),
        _req(),
        MTLS,
        False,
    ),
    (
        "authenticated: TLS without client cert matches ''",
        AnyRule(),
        principal(StringMatcher.exact("")),
        _req(),
        PeerInfo(tls=True),
        True,
    ),
    (
        "authenticated: DNS SAN without URI",
        AnyRule(),
        principal(StringMatcher.exact("a.example")),
        _req(),
        CERT_NO_URI,
        True,
    ),
    (
        "authenticated: subject last",
        AnyRule(),
        principal(StringMatcher.exact("CN=x")),
        _req(),
        CERT_SUBJECT_ONLY,
        True,
    ),
    (
        "and all",
        AndRule((header("a", "1"), header("b", "2"))),
        AnyRule(),
        _req(a="1", b="2"),
        PLAIN,
        True,
    ),
    (
        "and one missing",
        AndRule((header("a", "1"), header("b", "2"))),
        AnyRule(),
        _req(a="1"),
        PLAIN,
        False,
    ),
    ("or one", OrRule((header("a", "1"), header("b", "2"))), AnyRule(), _req(b="2"), PLAIN, True),
    ("not", NotRule(header("a", "1")), AnyRule(), _req(a="2"), PLAIN, True),
    ("not hit", NotRule(header("a", "1")), AnyRule(), _req(a="1"), PLAIN, False),
    ("metadata never matches", MetadataRule("f"), AnyRule(), _req(), PLAIN, False),
    ("inverted metadata always", MetadataRule("f", invert=True), AnyRule(), _req(), PLAIN, True),
    ("not metadata", NotRule(MetadataRule("f")), AnyRule(), _req(), PLAIN, True),
    ("sni is empty", RequestedServerName(StringMatcher.exact("")), AnyRule(), _req(), PLAIN, True),
    (
        "sni set never",
        RequestedServerName(StringMatcher.exact("x")),
        AnyRule(),
        _req(),
        PLAIN,
        False,
    ),
    (
        "permission and principal both",
        header("a", "1"),
        IpRule(cidr("10.0.0.0/8")),
        _req(a="1"),
        PLAIN,
        True,
    ),
    ("principal fails", header("a", "1"), IpRule(cidr("11.0.0.0/8")), _req(a="1"), PLAIN, False),
]


def _config(action: RbacAction, policy: RbacPolicy | None) -> RbacConfig:
    policies = {} if policy is None else {"p": policy}
    return RbacConfig(RbacRules(action, MappingProxyType(policies)))


@pytest.mark.parametrize(
    ("permission", "principal_", "request_", "peer", "matches"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_policy_table(
    permission: Permission,
    principal_: Principal,
    request_: RequestInfo,
    peer: PeerInfo,
    matches: bool,
) -> None:
    policy = RbacPolicy((permission,), (principal_,))
    allow = evaluate_rbac(_config(RbacAction.ALLOW, policy), request_, peer)
    deny = evaluate_rbac(_config(RbacAction.DENY, policy), request_, peer)
    assert allow.allowed is matches
    assert deny.allowed is (not matches)
    assert (allow.policy == "p") is matches


def test_actions_and_empty_policies() -> None:
    req = _req()
    # No rules: no enforcement. LOG is ignored by gRPC.
    assert evaluate_rbac(RbacConfig(None), req, PLAIN).allowed
    assert evaluate_rbac(None, req, PLAIN).allowed
    assert evaluate_rbac(
        _config(RbacAction.LOG, RbacPolicy((AnyRule(),), (AnyRule(),))), req, PLAIN
    ).allowed
    # ALLOW with no policy denies everything; DENY with no policy allows everything.
    assert not evaluate_rbac(_config(RbacAction.ALLOW, None), req, PLAIN).allowed
    assert evaluate_rbac(_config(RbacAction.DENY, None), req, PLAIN).allowed
    # A policy needs a permission AND a principal: empty lists match nothing.
    assert not evaluate_rbac(
        _config(RbacAction.ALLOW, RbacPolicy((), (AnyRule(),))), req, PLAIN
    ).allowed


def test_filters_in_order_first_deny_decides() -> None:
    deny_bad = _config(RbacAction.DENY, RbacPolicy((header("x-user", "bad"),), (AnyRule(),)))
    allow_mtls = _config(RbacAction.ALLOW, RbacPolicy((AnyRule(),), (principal(None),)))
    assert not evaluate_filters([deny_bad, allow_mtls], _req(x_user="bad"), MTLS).allowed
    assert evaluate_filters([deny_bad, allow_mtls], _req(x_user="good"), MTLS).allowed
    assert not evaluate_filters([deny_bad, allow_mtls], _req(x_user="good"), PLAIN).allowed
    decision = evaluate_filters([deny_bad, allow_mtls], _req(x_user="bad"), MTLS)
    assert decision.policy == "p"
    assert ACCESS_DENIED == "RBAC: access denied"
