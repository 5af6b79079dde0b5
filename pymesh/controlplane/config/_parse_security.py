"""Parse ``security.istio.io`` kinds (PeerAuthentication, AuthorizationPolicy)."""

from __future__ import annotations

import ipaddress
import re
import types
from collections.abc import Mapping

from pymesh.controlplane.config._reader import Reader
from pymesh.controlplane.config._types import (
    AuthorizationPolicySpec,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    PeerAuthenticationSpec,
)

__all__ = ["parse_authorization_policy", "parse_peer_authentication"]

_MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")

# Condition keys Istio supports (``when[].key``); ``request.headers[...]`` and the claim keys
# carry a bracketed suffix.
_CONDITION_KEYS = (
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "experimental.envoy.filters.network.mysql_proxy",
)
_CONDITION_PREFIXES = ("request.headers[", "request.auth.claims[", "experimental.")


def _selector(r: Reader) -> Mapping[str, str] | None:
    sel = r.sub("selector")
    if sel is None:
        return None
    sel.known(("matchLabels",))
    return sel.str_map("matchLabels")


def parse_peer_authentication(spec: Reader, name: str, namespace: str) -> PeerAuthenticationSpec:
    spec.known(("selector", "mtls", "portLevelMtls"))
    selector = _selector(spec)
    mode = "UNSET"
    m = spec.sub("mtls")
    if m is not None:
        m.known(("mode",))
        mode = m.enum("mode", _MTLS_MODES, "UNSET")
    ports: dict[int, str] = {}
    pl = spec.sub("portLevelMtls")
    if pl is not None:
        if selector is None:
            spec.error("portLevelMtls", "portLevelMtls needs a workload selector")
        for key in list(pl.data):
            path = f"{pl.path}.{key}"
            try:
                port = int(str(key))
                if not 1 <= port <= 65535:
                    raise ValueError
            except ValueError:
                spec.sink.error(path, f"invalid port {key!r}")
                continue
            value = pl.data[key]
            if not isinstance(value, dict):
                spec.sink.error(path, "expected a mapping with 'mode'")
                continue
            sub = Reader(value, path, spec.sink)
            sub.known(("mode",))
            ports[port] = sub.enum("mode", _MTLS_MODES, "UNSET")
    return PeerAuthenticationSpec(
        name=name,
        namespace=namespace,
        selector=selector,
        mode=mode,
        port_level=types.MappingProxyType(ports),
    )


def _cidrs(r: Reader, key: str) -> tuple[str, ...]:
    out = r.strs(key)
    for i, v in enumerate(out):
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            r.sink.error(f"{r.field(key)}[{i}]", f"invalid IP or CIDR {v!r}")
    return out


def _ports(r: Reader, key: str) -> tuple[int, ...]:
    out: list[int] = []
    for i, v in enumerate(r.strs(key)):
        if not v.isdigit() or not 0 < int(v) < 65536:
            r.sink.error(f"{r.field(key)}[{i}]", f"invalid port {v!r}")
            continue
        out.append(int(v))
    return tuple(out)


def _source(r: Reader) -> AuthzSource:
    r.known(
        (
            "principals",
            "notPrincipals",
            "requestPrincipals",
            "notRequestPrincipals",
            "namespaces",
            "notNamespaces",
            "ipBlocks",
            "notIpBlocks",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
        )
    )
    out = AuthzSource(
        principals=r.strs("principals"),
        not_principals=r.strs("notPrincipals"),
        request_principals=r.strs("requestPrincipals"),
        not_request_principals=r.strs("notRequestPrincipals"),
        namespaces=r.strs("namespaces"),
        not_namespaces=r.strs("notNamespaces"),
        ip_blocks=_cidrs(r, "ipBlocks"),
        not_ip_blocks=_cidrs(r, "notIpBlocks"),
        remote_ip_blocks=_cidrs(r, "remoteIpBlocks"),
        not_remote_ip_blocks=_cidrs(r, "notRemoteIpBlocks"),
    )
    if out == AuthzSource():
        r.error("", "source must set at least one field")
    return out


def _operation(r: Reader) -> AuthzOperation:
    r.known(
        ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")
    )
    out = AuthzOperation(
        hosts=r.strs("hosts"),
        not_hosts=r.strs("notHosts"),
        ports=_ports(r, "ports"),
        not_ports=_ports(r, "notPorts"),
        methods=r.strs("methods"),
        not_methods=r.strs("notMethods"),
        paths=r.strs("paths"),
        not_paths=r.strs("notPaths"),
    )
    if out == AuthzOperation():
        r.error("", "operation must set at least one field")
    for i, p in enumerate(out.paths + out.not_paths):
        if "{" in p:
            r.warn("paths", f"path template {p!r} is not supported; matched literally ({i})")
    return out


def _condition(r: Reader) -> AuthzCondition:
    r.known(("key", "values", "notValues"))
    key = r.str("key", required=True)
    if key and key not in _CONDITION_KEYS and not key.startswith(_CONDITION_PREFIXES):
        r.error("key", f"unknown condition key {key!r}")
    if key.startswith("request.headers[") and not re.fullmatch(r"request\.headers\[[^\]]+\]", key):
        r.error("key", f"invalid header condition {key!r}")
    values, not_values = r.strs("values"), r.strs("notValues")
    if not values and not not_values:
        r.error("", "values or notValues is required")
    if key == "destination.port":
        for v in values + not_values:
            if not v.isdigit():
                r.error("values", f"invalid port {v!r}")
    return AuthzCondition(key, values, not_values)


def parse_authorization_policy(spec: Reader, name: str, namespace: str) -> AuthorizationPolicySpec:
    spec.known(("selector", "action", "rules", "provider"), ignored=("targetRef", "targetRefs"))
    action = spec.enum("action", ("ALLOW", "DENY", "AUDIT", "CUSTOM"), "ALLOW")
    if action == "CUSTOM":
        spec.error("action", "action CUSTOM (external authorization) is not supported by pymesh")
    if action == "AUDIT":
        spec.warn("action", "AUDIT policies do not change decisions; pymesh ignores them")
    rules: list[AuthzRule] = []
    for rule in spec.items("rules"):
        rule.known(("from", "to", "when"))
        sources = []
        for f in rule.items("from"):
            f.known(("source",))
            s = f.sub("source")
            if s is None:
                f.error("source", "required field is missing")
                continue
            sources.append(_source(s))
        operations = []
        for t in rule.items("to"):
            t.known(("operation",))
            o = t.sub("operation")
            if o is None:
                t.error("operation", "required field is missing")
                continue
            operations.append(_operation(o))
        conditions = tuple(_condition(c) for c in rule.items("when"))
        rules.append(AuthzRule(tuple(sources), tuple(operations), conditions))
    return AuthorizationPolicySpec(
        name=name, namespace=namespace, selector=_selector(spec), action=action, rules=tuple(rules)
    )
