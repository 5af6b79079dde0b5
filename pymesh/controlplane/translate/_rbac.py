"""Inbound security: the effective PeerAuthentication mode of a node's port, and the RBAC HTTP
filters built from the AuthorizationPolicies that select it (Istio's authz model: each rule is
a policy; ``from`` sources are ORed, fields inside one source ANDed, values of one field ORed;
``when`` conditions ANDed in; ``not*`` fields negate).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from envoy.config.core.v3 import address_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_http_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2

from pymesh.controlplane.config import MeshConfig, ProxyNode, labels_match
from pymesh.controlplane.config._types import (
    ROOT_NAMESPACE,
    AuthorizationPolicySpec,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
)
from pymesh.controlplane.translate._names import pack

__all__ = ["RBAC_FILTER", "RBAC_FILTER_DENY", "mtls_mode", "rbac_filters", "selecting_policies"]

RBAC_FILTER = "envoy.filters.http.rbac"
RBAC_FILTER_DENY = "envoy.filters.http.rbac.DENY"

P: Any = rbac_pb2.Principal
Perm: Any = rbac_pb2.Permission


def mtls_mode(config: MeshConfig, node: ProxyNode, port: int) -> str:
    """STRICT / PERMISSIVE / DISABLE for ``port`` of ``node``: workload policy (port-level
    first), then namespace policy, then mesh-wide policy in the root namespace; UNSET
    inherits; PERMISSIVE when nothing sets it."""
    workload = ns_level = mesh = None
    for pa in config.peer_authentications:
        if pa.selector:
            if pa.namespace == node.namespace and labels_match(pa.selector, node.labels):
                workload = workload or pa
        elif pa.namespace == node.namespace:
            ns_level = ns_level or pa
        elif pa.namespace == ROOT_NAMESPACE:
            mesh = mesh or pa
    chain: list[str] = []
    if workload is not None:
        chain += [workload.port_level.get(port, "UNSET"), workload.mode]
    if ns_level is not None:
        chain.append(ns_level.mode)
    if mesh is not None:
        chain.append(mesh.mode)
    for mode in chain:
        if mode != "UNSET":
            return mode
    return "PERMISSIVE"


def selecting_policies(config: MeshConfig, node: ProxyNode) -> list[AuthorizationPolicySpec]:
    out = []
    for ap in config.authorization_policies:
        if ap.namespace not in {node.namespace, ROOT_NAMESPACE}:
            continue
        if ap.selector and not labels_match(ap.selector, node.labels):
            continue
        out.append(ap)
    return out


def _string(
    value: str, *, spiffe: bool = False, ignore_case: bool = False
) -> string_pb2.StringMatcher:
    """Istio's value syntax: ``*`` any (non-empty), ``x*`` prefix, ``*x`` suffix, else exact."""
    pre = "spiffe://" if spiffe else ""
    if value == "*":
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".+"))
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=pre + value[:-1], ignore_case=ignore_case)
    if value.startswith("*"):
        return string_pb2.StringMatcher(suffix=value[1:], ignore_case=ignore_case)
    return string_pb2.StringMatcher(exact=pre + value, ignore_case=ignore_case)


def _cidr(value: str) -> address_pb2.CidrRange:
    net = ipaddress.ip_network(value, strict=False)
    out = address_pb2.CidrRange(address_prefix=str(net.network_address))
    out.prefix_len.value = net.prefixlen
    return out


def _principal_name(v: str) -> Any:
    return P(authenticated=P.Authenticated(principal_name=_string(v, spiffe=True)))


def _namespace(v: str) -> Any:
    regex = f".*/ns/{v}/.*"
    return P(
        authenticated=P.Authenticated(
            principal_name=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex))
        )
    )


def _metadata(key: str, v: str) -> Any:
    m = metadata_pb2.MetadataMatcher(filter="istio_authn")
    m.path.add(key=key)
    m.value.string_match.CopyFrom(_string(v))
    return P(metadata=m)


def _header_principal(name: str, v: str) -> Any:
    return P(header=rc.HeaderMatcher(name=name, string_match=_string(v)))


def _direct_ip(v: str) -> Any:
    return P(direct_remote_ip=_cidr(v))


def _remote_ip(v: str) -> Any:
    return P(remote_ip=_cidr(v))


def _or_p(values: Sequence[str], fn: Callable[[str], Any]) -> Any:
    items = [fn(v) for v in values]
    return items[0] if len(items) == 1 else P(or_ids=P.Set(ids=items))


def _not_p(values: Sequence[str], fn: Callable[[str], Any]) -> Any:
    return P(not_id=_or_p(values, fn))


def _and_p(items: list[Any]) -> Any:
    if not items:
        return P(any=True)
    return items[0] if len(items) == 1 else P(and_ids=P.Set(ids=items))


def _source(s: AuthzSource) -> Any:
    parts: list[Any] = []
    pairs: list[tuple[Sequence[str], Sequence[str], Callable[[str], Any]]] = [
        (s.principals, s.not_principals, _principal_name),
        (
            s.request_principals,
            s.not_request_principals,
            lambda v: _metadata("request.auth.principal", v),
        ),
        (s.namespaces, s.not_namespaces, _namespace),
        (s.ip_blocks, s.not_ip_blocks, _direct_ip),
        (s.remote_ip_blocks, s.not_remote_ip_blocks, _remote_ip),
    ]
    for pos, neg, fn in pairs:
        if pos:
            parts.append(_or_p(pos, fn))
        if neg:
            parts.append(_not_p(neg, fn))
    return _and_p(parts)


def _method(v: str) -> Any:
    return Perm(header=rc.HeaderMatcher(name=":method", string_match=_string(v)))


def _host(v: str) -> Any:
    return Perm(
        header=rc.HeaderMatcher(name=":authority", string_match=_string(v, ignore_case=True))
    )


def _path(v: str) -> Any:
    return Perm(url_path=path_pb2.PathMatcher(path=_string(v)))


def _port(v: str) -> Any:
    return Perm(destination_port=int(v))


def _dest_ip(v: str) -> Any:
    return Perm(destination_ip=_cidr(v))


def _sni(v: str) -> Any:
    return Perm(requested_server_name=_string(v))


def _or_perm(values: Sequence[str], fn: Callable[[str], Any]) -> Any:
    items = [fn(v) for v in values]
    return items[0] if len(items) == 1 else Perm(or_rules=Perm.Set(rules=items))


def _and_perm(items: list[Any]) -> Any:
    if not items:
        return Perm(any=True)
    return items[0] if len(items) == 1 else Perm(and_rules=Perm.Set(rules=items))


def _operation(o: AuthzOperation) -> Any:
    parts: list[Any] = []
    pairs: list[tuple[Sequence[str], Sequence[str], Callable[[str], Any]]] = [
        (o.hosts, o.not_hosts, _host),
        (tuple(map(str, o.ports)), tuple(map(str, o.not_ports)), _port),
        (o.methods, o.not_methods, _method),
        (o.paths, o.not_paths, _path),
    ]
    for pos, neg, fn in pairs:
        if pos:
            parts.append(_or_perm(pos, fn))
        if neg:
            parts.append(Perm(not_rule=_or_perm(neg, fn)))
    return _and_perm(parts)


def _condition(c: AuthzCondition) -> tuple[list[Any], list[Any]]:
    """A ``when`` condition becomes principal or permission parts."""
    key = c.key
    pfn: Callable[[str], Any] | None = None
    permfn: Callable[[str], Any] | None = None
    if key.startswith("request.headers["):
        header = key[len("request.headers[") : -1].lower()

        def pfn(v: str, header: str = header) -> Any:
            return _header_principal(header, v)
    elif key in ("source.ip",):
        pfn = _direct_ip
    elif key == "remote.ip":
        pfn = _remote_ip
    elif key == "source.namespace":
        pfn = _namespace
    elif key == "source.principal":
        pfn = _principal_name
    elif key.startswith("request.auth."):

        def pfn(v: str, key: str = key) -> Any:
            return _metadata(key, v)
    elif key == "destination.port":
        permfn = _port
    elif key == "destination.ip":
        permfn = _dest_ip
    elif key == "connection.sni":
        permfn = _sni
    principals: list[Any] = []
    perms: list[Any] = []
    if pfn is not None:
        if c.values:
            principals.append(_or_p(c.values, pfn))
        if c.not_values:
            principals.append(_not_p(c.not_values, pfn))
    elif permfn is not None:
        if c.values:
            perms.append(_or_perm(c.values, permfn))
        if c.not_values:
            perms.append(Perm(not_rule=_or_perm(c.not_values, permfn)))
    return principals, perms


def _policy(rule: AuthzRule) -> rbac_pb2.Policy:
    cond_p: list[Any] = []
    cond_perm: list[Any] = []
    for c in rule.conditions:
        p, q = _condition(c)
        cond_p += p
        cond_perm += q
    pol = rbac_pb2.Policy()
    sources = [_source(s) for s in rule.sources] or [P(any=True)]
    principal = sources[0] if len(sources) == 1 else P(or_ids=P.Set(ids=sources))
    pol.principals.append(_and_p([principal, *cond_p]) if cond_p else principal)
    ops = [_operation(o) for o in rule.operations] or [Perm(any=True)]
    perm = ops[0] if len(ops) == 1 else Perm(or_rules=Perm.Set(rules=ops))
    pol.permissions.append(_and_perm([perm, *cond_perm]) if cond_perm else perm)
    return pol


def _rbac(action: int, policies: list[AuthorizationPolicySpec]) -> rbac_pb2.RBAC:
    out = rbac_pb2.RBAC(action=action)  # type: ignore[arg-type]
    for ap in policies:
        for i, rule in enumerate(ap.rules):
            out.policies[f"ns[{ap.namespace}]-policy[{ap.name}]-rule[{i}]"].CopyFrom(_policy(rule))
    return out


def rbac_filters(config: MeshConfig, node: ProxyNode, port: int) -> list[hcm_pb2.HttpFilter]:
    """DENY filter (when any DENY policy has rules), then ALLOW filter (when any ALLOW
    policy selects the node: an ALLOW policy without rules allows nothing)."""
    _ = port
    policies = selecting_policies(config, node)
    deny = [p for p in policies if p.action == "DENY"]
    allow = [p for p in policies if p.action == "ALLOW"]
    out: list[hcm_pb2.HttpFilter] = []
    deny_rules = _rbac(rbac_pb2.RBAC.DENY, deny)
    if deny_rules.policies:
        f = hcm_pb2.HttpFilter(name=RBAC_FILTER_DENY)
        f.typed_config.CopyFrom(pack(rbac_http_pb2.RBAC(rules=deny_rules)))
        out.append(f)
    if allow:
        f = hcm_pb2.HttpFilter(name=RBAC_FILTER)
        f.typed_config.CopyFrom(pack(rbac_http_pb2.RBAC(rules=_rbac(rbac_pb2.RBAC.ALLOW, allow))))
        out.append(f)
    return out
