"""Route and inbound-listener translation: VirtualService semantics, Istio's defaults,
PeerAuthentication modes and AuthorizationPolicy RBAC."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_http_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from pymesh.controlplane.config import ProxyNode
from pymesh.controlplane.translate import INBOUND_PREFIX, Generator
from pymesh.xds.codec import decode_resource
from pymesh.xds.resource_types import ResourceType
from tests.unit.controlplane._mesh import FIXTURES, load_ok

RDS = ResourceType.ROUTE_CONFIGURATION.type_url
LDS = ResourceType.LISTENER.type_url
REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
GRPC = ProxyNode("g", "default", generator="grpc")


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(load_ok(FIXTURES / "mesh-full.yaml"))


def _routes(gen: Generator, node: ProxyNode, name: str) -> route_pb2.RouteConfiguration:
    out = gen.generate(node, RDS, [name])[name]
    assert isinstance(out, route_pb2.RouteConfiguration)
    return out


def test_default_route_has_istio_defaults(gen: Generator) -> None:
    cfg = _routes(gen, GRPC, "outbound|443||api.example.com")
    (vh,) = cfg.virtual_hosts
    assert vh.name == "api.example.com:443"
    assert list(vh.domains) == ["api.example.com", "api.example.com:443"]
    (r,) = vh.routes
    assert r.name == "default" and r.match.prefix == "/"
    assert r.route.cluster == "outbound|443||api.example.com"
    assert r.route.timeout.ToNanoseconds() == 0  # no timeout by default
    assert r.route.max_stream_duration.max_stream_duration.ToNanoseconds() == 0
    p = r.route.retry_policy
    assert p.num_retries.value == 2
    assert (
        p.retry_on == "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    )
    assert list(p.retriable_status_codes) == [503]
    assert p.host_selection_retry_max_attempts == 5
    assert [h.name for h in p.retry_host_predicate] == [
        "envoy.retry_host_predicates.previous_hosts"
    ]


def test_consistent_hash_route_gets_hash_policy_and_no_host_predicate(gen: Generator) -> None:
    cfg = _routes(gen, GRPC, "outbound|9080||ratings.default.svc.cluster.local")
    r = cfg.virtual_hosts[0].routes[0]
    assert r.route.hash_policy[0].connection_properties.source_ip
    assert not r.route.retry_policy.retry_host_predicate


def test_virtual_service_routes_in_order(gen: Generator) -> None:
    vh = _routes(gen, GRPC, REVIEWS).virtual_hosts[0]
    assert [r.name for r in vh.routes] == [
        "jason",
        "jason",
        "redirect",
        "static",
        "rewrite",
        "split",
    ]
    assert {
        "reviews",
        "reviews:9080",
        "reviews.default",
        "reviews.default.svc.cluster.local:9080",
        "10.0.0.10",
        "10.0.0.10:9080",
    } <= set(vh.domains)
    first, second, redirect, static, rewrite, split = vh.routes
    assert first.match.prefix == "/api" and first.match.case_sensitive.value is False
    assert first.match.headers[0].name == "end-user"
    assert first.match.headers[0].string_match.exact == "jason"
    a = first.route
    assert a.cluster == "outbound|9080|v2|reviews.default.svc.cluster.local"
    assert a.timeout.ToMilliseconds() == 2000
    assert a.max_stream_duration.max_stream_duration.ToMilliseconds() == 2000
    assert a.retry_policy.num_retries.value == 3
    assert a.retry_policy.retry_on == "5xx,gateway-error,retriable-status-codes"
    assert list(a.retry_policy.retriable_status_codes) == [503]
    assert a.retry_policy.per_try_timeout.ToMilliseconds() == 500
    assert a.retry_policy.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    (mirror,) = a.request_mirror_policies
    assert mirror.cluster == "outbound|9080|v1|ratings.default.svc.cluster.local"
    assert mirror.runtime_fraction.default_value.numerator == 250000
    fault = fault_pb2.HTTPFault()
    first.typed_per_filter_config["envoy.filters.http.fault"].Unpack(fault)
    assert fault.delay.fixed_delay.ToMilliseconds() == 100
    assert fault.delay.percentage.numerator == 100000
    assert fault.abort.http_status == 503 and fault.abort.percentage.numerator == 5000
    adds = {(h.header.key, h.append_action) for h in first.request_headers_to_add}
    assert adds == {
        ("x-a", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
        ("x-b", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
    }
    assert list(first.request_headers_to_remove) == ["x-c"]
    assert [h.header.key for h in first.response_headers_to_add] == ["x-d"]
    # second match of the same http route
    assert second.match.query_parameters[0].string_match.safe_regex.regex == "1|true"
    skip = next(h for h in second.match.headers if h.name == "x-skip")
    assert skip.present_match and skip.invert_match
    assert [h.string_match.exact for h in second.match.headers if h.name == ":method"] == ["GET"]
    assert redirect.match.path == "/old"
    assert redirect.redirect.path_redirect == "/new"
    assert redirect.redirect.response_code == rc.RedirectAction.PERMANENT_REDIRECT
    assert static.direct_response.status == 200
    assert static.direct_response.body.inline_string == "ok"
    assert rewrite.route.prefix_rewrite == "/"
    assert rewrite.route.host_rewrite_literal == "reviews.internal"
    weights = [
        (c.name.split("|")[2], c.weight.value) for c in split.route.weighted_clusters.clusters
    ]
    assert weights == [("v1", 80), ("v2", 20)]
    assert (
        split.route.weighted_clusters.clusters[0].request_headers_to_add[0].header.key == "x-split"
    )


def test_envoy_nodes_get_max_grpc_timeout(gen: Generator) -> None:
    r = _routes(gen, ProxyNode("e", "default"), REVIEWS).virtual_hosts[0].routes[0]
    assert r.route.max_grpc_timeout.ToMilliseconds() == 2000
    assert not r.route.HasField("max_stream_duration")


def test_short_domains_only_in_same_namespace(gen: Generator) -> None:
    vh = _routes(gen, ProxyNode("o", "other", generator="grpc"), REVIEWS).virtual_hosts[0]
    assert "reviews" not in vh.domains and "reviews.default" in vh.domains


def test_source_labels_and_port_match(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        (FIXTURES / "mesh-full.yaml")
        .read_text()
        .replace(
            "  - name: redirect\n    match: [{uri: {exact: /old}}]",
            "  - name: redirect\n"
            "    match: [{uri: {exact: /old}, sourceLabels: {app: web}, port: 9080}]",
        )
    )
    gen = Generator(load_ok(path))
    names = [r.name for r in _routes(gen, GRPC, REVIEWS).virtual_hosts[0].routes]
    assert "redirect" not in names
    web = ProxyNode("w", "default", labels={"app": "web"}, generator="grpc")
    assert "redirect" in [r.name for r in _routes(gen, web, REVIEWS).virtual_hosts[0].routes]
    port9090 = "outbound|9090||reviews.default.svc.cluster.local"
    assert "redirect" not in [r.name for r in _routes(gen, web, port9090).virtual_hosts[0].routes]


def _inbound(gen: Generator, node: ProxyNode, addr: str) -> listener_pb2.Listener:
    name = f"{INBOUND_PREFIX}{addr}"
    ln = gen.generate(node, LDS, [name])[name]
    assert isinstance(ln, listener_pb2.Listener)
    decode_resource(LDS, ln.SerializeToString())  # pymesh's client accepts it
    return ln


def _hcm(chain: object) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)  # type: ignore[attr-defined]
    return hcm


def test_inbound_strict_with_rbac(gen: Generator) -> None:
    node = ProxyNode("r", "default", labels={"app": "reviews"}, generator="grpc")
    ln = _inbound(gen, node, "127.0.0.11:9080")
    assert ln.address.socket_address.port_value == 9080
    (chain,) = ln.filter_chains
    assert chain.name == "inbound-mtls"
    tls = tls_pb2.DownstreamTlsContext()
    chain.transport_socket.typed_config.Unpack(tls)
    assert tls.require_client_certificate.value is True
    assert tls.common_tls_context.tls_certificate_provider_instance.instance_name == "default"
    hcm = _hcm(chain)
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.rbac.DENY",
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]
    assert hcm.route_config.virtual_hosts[0].routes[0].HasField("non_forwarding_action")
    deny, allow = rbac_http_pb2.RBAC(), rbac_http_pb2.RBAC()
    hcm.http_filters[0].typed_config.Unpack(deny)
    hcm.http_filters[1].typed_config.Unpack(allow)
    assert deny.rules.action == rbac_pb2.RBAC.DENY
    (dp,) = deny.rules.policies.values()
    assert dp.permissions[0].url_path.path.prefix == "/admin"
    assert allow.rules.action == rbac_pb2.RBAC.ALLOW
    policy = allow.rules.policies["ns[default]-policy[reviews-allow]-rule[0]"]
    principal = policy.principals[0]
    ids = principal.and_ids.ids  # (sources OR) AND header condition
    sources, header = ids[0].or_ids.ids, ids[1]
    first = sources[0].and_ids.ids
    assert first[0].authenticated.principal_name.exact == (
        "spiffe://cluster.local/ns/default/sa/productpage"
    )
    assert first[1].not_id.authenticated.principal_name.safe_regex.regex == ".*/ns/blocked/.*"
    assert sources[1].direct_remote_ip.address_prefix == "10.0.0.0"
    assert sources[1].direct_remote_ip.prefix_len.value == 8
    assert header.header.name == "x-token" and header.header.string_match.exact == "secret"
    perm = policy.permissions[0].and_rules.rules
    op = perm[0].and_rules.rules
    assert op[0].not_rule.destination_port == 9999
    assert [r.header.string_match.exact for r in op[1].or_rules.rules] == ["GET", "HEAD"]
    assert op[2].url_path.path.prefix == "/api/"
    assert perm[1].destination_port == 9080


def test_inbound_permissive_and_port_level_disable(gen: Generator) -> None:
    node = ProxyNode("r", "default", labels={"app": "ratings"}, generator="grpc")
    ln = _inbound(gen, node, "127.0.0.21:9080")
    assert [(c.name, c.filter_chain_match.transport_protocol) for c in ln.filter_chains] == [
        ("inbound-mtls", "tls"),
        ("inbound-plaintext", "raw_buffer"),
    ]
    assert [f.name for f in _hcm(ln.filter_chains[0]).http_filters] == [
        "envoy.filters.http.rbac.DENY",
        "envoy.filters.http.router",
    ]
    ln = _inbound(gen, node, "127.0.0.21:9999")
    assert [c.name for c in ln.filter_chains] == ["inbound-plaintext"]
    assert not ln.filter_chains[0].HasField("transport_socket")


def test_inbound_other_namespace_only_mesh_policy(gen: Generator) -> None:
    ln = _inbound(gen, ProxyNode("o", "other", generator="grpc"), "[::1]:8080")
    assert ln.address.socket_address.address == "::1"
    (chain,) = ln.filter_chains
    assert chain.name == "inbound-mtls"
    assert [f.name for f in _hcm(chain).http_filters] == ["envoy.filters.http.router"]
