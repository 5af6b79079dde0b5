"""RDS: route configuration ``outbound|PORT||HOST`` with one virtual host for the service.

Routes come from the mesh VirtualService for the host, in its order (one Envoy route per
``match``, as istiod builds them); without a VirtualService, istiod's default route: prefix
``/`` to ``outbound|PORT||HOST``, no timeout, default retries (2 attempts on
connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes, previous-hosts
predicate, 5 host selection attempts, status 503).
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2

from pymesh.controlplane.config import MeshConfig, ProxyNode, ServiceSpec, labels_match
from pymesh.controlplane.config._types import (
    Destination,
    Fault,
    HeaderOps,
    HTTPMatch,
    HTTPRetry,
    HTTPRoute,
)
from pymesh.controlplane.translate._clusters import cluster_policy
from pymesh.controlplane.translate._names import cluster_name, duration, pack
from pymesh.model.matcher import MatchKind, StringMatcher

__all__ = ["FAULT_FILTER", "build_route_config", "domains_for"]

FAULT_FILTER = "envoy.filters.http.fault"
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def domains_for(svc: ServiceSpec, port: int, node: ProxyNode) -> list[str]:
    """istiod's virtual host domains: FQDN, the shorter forms valid from the node's
    namespace, VIPs; each also with ``:PORT``."""
    host = svc.hostname
    names = [host]
    suffix = f".{svc.namespace}.svc.cluster.local"
    if host.endswith(suffix):
        short = host[: -len(suffix)]
        names += [f"{short}.{svc.namespace}.svc", f"{short}.{svc.namespace}"]
        if node.namespace == svc.namespace:
            names.append(short)
    names += [a for a in svc.addresses if "/" not in a]
    out: list[str] = []
    for n in names:
        h = f"[{n}]" if ":" in n else n
        for d in (n, f"{h}:{port}"):
            if d not in out:
                out.append(d)
    return out


def _string_matcher(m: StringMatcher) -> string_pb2.StringMatcher:
    if m.kind is MatchKind.REGEX:
        return string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=m.pattern), ignore_case=False
        )
    kw = {m.kind.value: m.pattern}
    return string_pb2.StringMatcher(ignore_case=m.ignore_case, **kw)


def _header_matcher(name: str, m: StringMatcher | None, *, invert: bool) -> rc.HeaderMatcher:
    hm = rc.HeaderMatcher(name=name, invert_match=invert)
    if m is None:
        hm.present_match = True
    else:
        hm.string_match.CopyFrom(_string_matcher(m))
    return hm


def _route_match(m: HTTPMatch | None) -> rc.RouteMatch:
    out = rc.RouteMatch()
    if m is None or m.uri is None:
        out.prefix = "/"
    elif m.uri.kind is MatchKind.EXACT:
        out.path = m.uri.pattern
    elif m.uri.kind is MatchKind.PREFIX:
        out.prefix = m.uri.pattern
    else:
        out.safe_regex.regex = m.uri.pattern.removeprefix("(?i)")
    if m is None:
        return out
    if m.ignore_uri_case:
        out.case_sensitive.value = False
    for name, sm in (
        (":method", m.method),
        (":authority", m.authority),
        (":scheme", m.scheme),
    ):
        if sm is not None:
            out.headers.append(_header_matcher(name, sm, invert=False))
    for hname, hm in m.headers:
        out.headers.append(_header_matcher(hname, hm, invert=False))
    for hname, hm in m.without_headers:
        out.headers.append(_header_matcher(hname, hm, invert=True))
    for qname, qm in m.query_params:
        q = out.query_parameters.add(name=qname)
        if qm is None:
            q.present_match = True
        else:
            q.string_match.CopyFrom(_string_matcher(qm))
    return out


def _retry_policy(retries: HTTPRetry | None, hash_based: bool) -> rc.RetryPolicy | None:
    if retries is not None and retries.attempts <= 0:
        return None  # explicitly disabled
    p = rc.RetryPolicy(retry_on=DEFAULT_RETRY_ON, host_selection_retry_max_attempts=5)
    p.num_retries.value = 2
    p.retriable_status_codes.append(503)
    if not hash_based:
        pred = p.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts")
        pred.typed_config.CopyFrom(pack(previous_hosts_pb2.PreviousHostsPredicate()))
    if retries is None:
        return p
    p.num_retries.value = retries.attempts
    if retries.retry_on:
        parts = [x.strip() for x in retries.retry_on.split(",") if x.strip()]
        codes = [int(x) for x in parts if x.isdigit()]
        conds = [x for x in parts if not x.isdigit()]
        if codes and "retriable-status-codes" not in conds:
            conds.append("retriable-status-codes")
        p.retry_on = ",".join(conds)
        del p.retriable_status_codes[:]
        p.retriable_status_codes.extend(codes)
    if retries.per_try_timeout is not None:
        p.per_try_timeout.CopyFrom(duration(retries.per_try_timeout))
    if retries.retry_remote_localities:
        prio = p.retry_priority
        prio.name = "envoy.retry_priorities.previous_priorities"
        prio.typed_config.CopyFrom(
            pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=2))
        )
    return p


def _fraction(percent: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 10000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _fault(f: Fault) -> fault_pb2.HTTPFault:
    out = fault_pb2.HTTPFault()
    if f.delay is not None:
        out.delay.fixed_delay.CopyFrom(duration(f.delay))
        out.delay.percentage.CopyFrom(_fraction(f.delay_percent))
    if f.abort_http_status is not None:
        out.abort.http_status = f.abort_http_status
        out.abort.percentage.CopyFrom(_fraction(f.abort_percent))
    elif f.abort_grpc_status is not None:
        out.abort.grpc_status = f.abort_grpc_status
        out.abort.percentage.CopyFrom(_fraction(f.abort_percent))
    return out


def _header_values(
    pairs: tuple[tuple[str, str], ...], append: bool
) -> list[base_pb2.HeaderValueOption]:
    action = (
        base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
        if append
        else base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    )
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v), append_action=action
        )
        for k, v in pairs
    ]


def _apply_headers(target: rc.Route | rc.WeightedCluster.ClusterWeight, ops: HeaderOps) -> None:
    target.request_headers_to_add.extend(_header_values(ops.request_set, False))
    target.request_headers_to_add.extend(_header_values(ops.request_add, True))
    target.request_headers_to_remove.extend(ops.request_remove)
    target.response_headers_to_add.extend(_header_values(ops.response_set, False))
    target.response_headers_to_add.extend(_header_values(ops.response_add, True))
    target.response_headers_to_remove.extend(ops.response_remove)


class _RouteBuilder:
    def __init__(self, config: MeshConfig, node: ProxyNode, svc: ServiceSpec, port: int):
        self.config = config
        self.node = node
        self.svc = svc
        self.port = port

    def cluster_for(self, dest: Destination) -> str:
        port = dest.port
        if port is None:
            target = self.config.service(dest.host)
            if (
                dest.host == self.svc.hostname
                or target is None
                or target.port(self.port) is not None
            ):
                port = self.port
            else:
                port = target.ports[0].number
        return cluster_name(port, dest.subset, dest.host)

    def _hash_policy(self, action: rc.RouteAction, dest: Destination) -> bool:
        target = self.config.service(dest.host)
        if target is None:
            return False
        port = dest.port or self.port
        policy = cluster_policy(self.config, self.node, target, port, dest.subset)
        lb = policy.load_balancer
        ch = lb.consistent_hash if lb is not None else None
        if ch is None:
            return False
        hp = action.hash_policy.add()
        if ch.http_header_name:
            hp.header.header_name = ch.http_header_name
        elif ch.http_cookie is not None:
            name, path, ttl = ch.http_cookie
            hp.cookie.name = name
            if path:
                hp.cookie.path = path
            if ttl is not None:
                hp.cookie.ttl.CopyFrom(duration(ttl))
        elif ch.use_source_ip:
            hp.connection_properties.source_ip = True
        elif ch.http_query_parameter_name:
            hp.query_parameter.name = ch.http_query_parameter_name
        return True

    def _set_timeout(self, action: rc.RouteAction, timeout: float | None) -> None:
        t = duration(timeout or 0.0)
        action.timeout.CopyFrom(t)
        if self.node.proxyless:
            action.max_stream_duration.max_stream_duration.CopyFrom(t)
        else:
            action.max_grpc_timeout.CopyFrom(t)

    def default_route(self) -> rc.Route:
        r = rc.Route(name="default", match=rc.RouteMatch(prefix="/"))
        dest = Destination(self.svc.hostname, "", self.port)
        r.route.cluster = cluster_name(self.port, "", self.svc.hostname)
        hashed = self._hash_policy(r.route, dest)
        self._set_timeout(r.route, None)
        policy = _retry_policy(None, hashed)
        if policy is not None:
            r.route.retry_policy.CopyFrom(policy)
        return r

    def _match_applies(self, m: HTTPMatch) -> bool:
        if m.port is not None and m.port != self.port:
            return False
        if m.gateways and "mesh" not in m.gateways:
            return False
        if m.source_labels and not labels_match(m.source_labels, self.node.labels):
            return False
        return not (m.source_namespace and m.source_namespace != self.node.namespace)

    def routes(self, http: HTTPRoute, index: int) -> list[rc.Route]:
        if http.matches:
            matches: list[HTTPMatch | None] = [m for m in http.matches if self._match_applies(m)]
            if not matches:
                return []
        else:
            matches = [None]
        out = []
        for m in matches:
            name = http.name
            if m is not None and m.name:
                name = f"{name}.{m.name}" if name else m.name
            r = rc.Route(name=name or f"route-{index}", match=_route_match(m))
            self._action(r, http)
            out.append(r)
        return out

    def _action(self, r: rc.Route, http: HTTPRoute) -> None:
        if http.redirect is not None:
            rd = http.redirect
            if rd.uri:
                r.redirect.path_redirect = rd.uri
            if rd.authority:
                r.redirect.host_redirect = rd.authority
            if rd.port:
                r.redirect.port_redirect = rd.port
            if rd.scheme:
                r.redirect.scheme_redirect = rd.scheme
            r.redirect.response_code = {
                301: rc.RedirectAction.MOVED_PERMANENTLY,
                302: rc.RedirectAction.FOUND,
                303: rc.RedirectAction.SEE_OTHER,
                307: rc.RedirectAction.TEMPORARY_REDIRECT,
                308: rc.RedirectAction.PERMANENT_REDIRECT,
            }[rd.redirect_code]
        elif http.direct_response is not None:
            r.direct_response.status = http.direct_response.status
            if http.direct_response.body is not None:
                r.direct_response.body.inline_string = http.direct_response.body
        else:
            action = r.route
            dests = [d for d in http.route if d.weight > 0]
            if len(dests) == 1 and not dests[0].headers:
                action.cluster = self.cluster_for(dests[0].destination)
            else:
                for d in dests:
                    cw = action.weighted_clusters.clusters.add(name=self.cluster_for(d.destination))
                    cw.weight.value = d.weight
                    _apply_headers(cw, d.headers)
            hashed = bool(dests) and self._hash_policy(action, dests[0].destination)
            self._set_timeout(action, http.timeout)
            policy = _retry_policy(http.retries, hashed)
            if policy is not None:
                action.retry_policy.CopyFrom(policy)
            for mirror in http.mirrors:
                mp = action.request_mirror_policies.add(
                    cluster=self.cluster_for(mirror.destination)
                )
                mp.runtime_fraction.default_value.CopyFrom(_fraction(mirror.percent))
            if http.rewrite is not None:
                rw = http.rewrite
                if rw.uri is not None:
                    action.prefix_rewrite = rw.uri
                if rw.uri_regex is not None:
                    action.regex_rewrite.pattern.regex = rw.uri_regex[0]
                    action.regex_rewrite.substitution = rw.uri_regex[1]
                if rw.authority is not None:
                    action.host_rewrite_literal = rw.authority
        if http.fault is not None:
            r.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(_fault(http.fault)))
        _apply_headers(r, http.headers)


def build_route_config(
    config: MeshConfig, node: ProxyNode, svc: ServiceSpec, port: int
) -> route_pb2.RouteConfiguration:
    name = cluster_name(port, "", svc.hostname)
    rcfg = route_pb2.RouteConfiguration(name=name)
    if not node.proxyless:
        rcfg.validate_clusters.value = False
    vh = rcfg.virtual_hosts.add(name=f"{svc.hostname}:{port}")
    vh.domains.extend(domains_for(svc, port, node))
    builder = _RouteBuilder(config, node, svc, port)
    vs = config.virtual_service(svc.hostname, node.namespace)
    if vs is None:
        vh.routes.append(builder.default_route())
        return rcfg
    for i, http in enumerate(vs.http):
        vh.routes.extend(builder.routes(http, i))
    if not vh.routes:
        vh.routes.append(builder.default_route())
    return rcfg
