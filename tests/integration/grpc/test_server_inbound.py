"""The inbound filter chain as pure code (``pymesh.grpc._inbound``): A36 chain selection, the
route step, filter order and per-route overrides; and the listener names against grpcio's own
xDS server (C-core, in a subprocess) for the same bind addresses."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import MappingProxyType

from pymesh.core.rbac import PeerInfo
from pymesh.core.types import Headers, RequestInfo
from pymesh.grpc import _inbound
from pymesh.grpc._server import listener_host, parse_peer, parse_peer_address, split_address
from pymesh.model.common import SocketAddress
from pymesh.model.http_filters import (
    AnyRule,
    FaultAbort,
    FaultConfig,
    FaultDelay,
    HttpFilter,
    RbacAction,
    RbacConfig,
    RbacPerRoute,
    RbacPolicy,
    RbacRules,
    RouterConfig,
)
from pymesh.model.listener import (
    ConnectionSourceType,
    FilterChain,
    FilterChainMatch,
    HttpConnectionManager,
    Listener,
)
from pymesh.model.route import (
    CidrRange,
    FilterConfigOverride,
    FractionalPercent,
    NonForwardingAction,
    PathMatchKind,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from pymesh.model.snapshot import ErrorKind, RouteConfigError, ServerSnapshot
from pymesh.model.tls import CommonTlsContext, DownstreamTlsContext
from pymesh.xds.client import XdsClient
from tests.integration.grpc.test_server_xds import make_bootstrap
from tests.xdsserver import LDS, XdsTestServer

ROUTER = HttpFilter("router", "router", RouterConfig())
DENY_ALL = RbacConfig(RbacRules(RbacAction.ALLOW, MappingProxyType({})))
ALLOW_ALL = RbacConfig(
    RbacRules(RbacAction.ALLOW, MappingProxyType({"all": RbacPolicy((AnyRule(),), (AnyRule(),))}))
)
ABORT = FaultConfig(abort=FaultAbort(FractionalPercent(100), grpc_status=8))
DELAY = FaultConfig(delay=FaultDelay(FractionalPercent(100), fixed_delay=0.25))
HTTP_ABORT = FaultConfig(abort=FaultAbort(FractionalPercent(100), http_status=503))


def _route(prefix: str = "/", **kw: object) -> Route:
    return Route(RouteMatch(PathMatchKind.PREFIX, prefix), NonForwardingAction(), **kw)  # type: ignore[arg-type]


def _hcm(
    *filters: HttpFilter, routes: tuple[Route, ...] | None = None, rds: str | None = None
) -> HttpConnectionManager:
    config = None
    if rds is None:
        config = RouteConfiguration(
            "inbound", (VirtualHost("inbound", ("*",), routes or (_route(),)),)
        )
    return HttpConnectionManager(http_filters=(*filters, ROUTER), route_config=config, rds_name=rds)


def _chain(
    name: str, hcm: HttpConnectionManager | None = None, tls: bool = False, **match: object
) -> FilterChain:
    return FilterChain(
        name,
        FilterChainMatch(**match),  # type: ignore[arg-type]
        hcm or _hcm(),
        DownstreamTlsContext(CommonTlsContext()) if tls else None,
    )


def _snapshot(
    *chains: FilterChain, default: FilterChain | None = None, rds: dict[str, object] | None = None
) -> ServerSnapshot:
    listener = Listener(
        "l", SocketAddress("10.0.0.1", 9080), filter_chains=chains, default_filter_chain=default
    )
    return ServerSnapshot("l", listener, MappingProxyType(rds or {}), 1)  # type: ignore[arg-type]


def cidr(text: str) -> CidrRange:
    return CidrRange(ipaddress.ip_network(text))


REQ = RequestInfo(
    "POST",
    "echo:9080",
    "/test.Echo/Unary",
    Headers([("content-type", "application/grpc")]),
    grpc=True,
)
PEER = PeerInfo(source_ip="10.0.0.7", destination_ip="10.0.0.1", destination_port=9080)


def decide(
    snapshot: ServerSnapshot, request: RequestInfo = REQ, peer: PeerInfo = PEER, **kw: bool
) -> _inbound.InboundDecision:
    return _inbound.decide(snapshot, request, peer, _inbound.InboundState(random.Random(1)), **kw)


def test_chain_selection_most_specific_wins() -> None:
    listener = _snapshot(
        _chain("any"),
        _chain("dst-16", prefix_ranges=(cidr("10.0.0.0/16"),)),
        _chain("dst-24", prefix_ranges=(cidr("10.0.0.0/24"),)),
        _chain("dst-other", prefix_ranges=(cidr("192.168.0.0/16"),)),
    ).listener
    chain = _inbound.select_filter_chain(listener, PEER)
    assert chain is not None and chain.name == "dst-24"
    other = PeerInfo(source_ip="1.2.3.4", destination_ip="172.16.0.1")
    chain = _inbound.select_filter_chain(listener, other)
    assert chain is not None and chain.name == "any"


def test_chain_selection_source_type_then_source_prefix() -> None:
    listener = _snapshot(
        _chain("local", source_type=ConnectionSourceType.SAME_IP_OR_LOOPBACK),
        _chain("external", source_type=ConnectionSourceType.EXTERNAL),
        _chain(
            "external-10",
            source_type=ConnectionSourceType.EXTERNAL,
            source_prefix_ranges=(cidr("10.0.0.0/8"),),
        ),
    ).listener
    assert _inbound.select_filter_chain(listener, PeerInfo(source_ip="127.0.0.1")).name == "local"  # type: ignore[union-attr]
    assert _inbound.select_filter_chain(listener, PEER).name == "external-10"  # type: ignore[union-attr]
    assert _inbound.select_filter_chain(listener, PeerInfo(source_ip="8.8.8.8")).name == "external"  # type: ignore[union-attr]


def test_chain_selection_source_ports_last() -> None:
    listener = _snapshot(
        _chain("any-port"),
        _chain("port-5555", source_ports=(5555, 6666)),
    ).listener
    state = _inbound.InboundState(random.Random(1))
    at = PeerInfo(source_ip="10.0.0.7", source_port=5555)
    other = PeerInfo(source_ip="10.0.0.7", source_port=7777)
    assert state.filter_chain(listener, at).name == "port-5555"  # type: ignore[union-attr]
    assert state.filter_chain(listener, other).name == "any-port"  # type: ignore[union-attr]
    # Memoized per port for such listeners: asking again gives the same answers.
    assert state.filter_chain(listener, at).name == "port-5555"  # type: ignore[union-attr]
    only = _snapshot(_chain("port-5555", source_ports=(5555,))).listener
    assert _inbound.select_filter_chain(only, other) is None


def test_unmatchable_chains_fall_back_to_default_or_fail() -> None:
    # Istio PERMISSIVE: a "tls" chain gRPC cannot match, and a raw_buffer plaintext one.
    permissive = _snapshot(
        _chain("mtls", tls=True, transport_protocol="tls"),
        _chain("plaintext", transport_protocol="raw_buffer"),
    )
    assert _inbound.select_filter_chain(permissive.listener, PEER).name == "plaintext"  # type: ignore[union-attr]
    assert decide(permissive) == _inbound.SERVE
    only_port = _snapshot(
        _chain("port", destination_port=9080),
        default=_chain("default", _hcm(HttpFilter("rbac", "t", DENY_ALL))),
    )
    assert decide(only_port).code == _inbound.PERMISSION_DENIED
    none = _snapshot(_chain("sni", server_names=("x",)))
    d = decide(none)
    assert d.code == _inbound.UNAVAILABLE and "no matching filter chain" in d.message


def test_tls_chain_on_plaintext_port() -> None:
    strict = _snapshot(_chain("mtls", tls=True))
    assert decide(strict).code == _inbound.UNAVAILABLE
    assert decide(strict, secure=True) == _inbound.SERVE
    assert _inbound.tls_only_message(strict.listener, secure=False) is not None
    assert _inbound.tls_only_message(strict.listener, secure=True) is None
    permissive = _snapshot(_chain("mtls", tls=True, transport_protocol="tls"), _chain("plain"))
    assert _inbound.tls_only_message(permissive.listener, secure=False) is None


def test_routes_and_route_configs() -> None:
    forward = Route(RouteMatch(PathMatchKind.PREFIX, "/test.Echo/Fwd"), RouteAction(cluster="c"))
    snap = _snapshot(_chain("c", _hcm(routes=(forward, _route("/test.Echo/Unary")))))
    assert decide(snap) == _inbound.SERVE
    d = decide(snap, RequestInfo("POST", "h", "/test.Echo/Fwd", grpc=True))
    assert d.code == _inbound.UNAVAILABLE and "non-forwarding" in d.message
    d = decide(snap, RequestInfo("POST", "h", "/other.Svc/M", grpc=True))
    assert d.code == _inbound.UNAVAILABLE and "no route" in d.message
    # RDS: present, missing, or in error.
    config = RouteConfiguration("rds", (VirtualHost("v", ("echo:9080",), (_route(),)),))
    assert decide(_snapshot(_chain("c", _hcm(rds="rds")), rds={"rds": config})) == _inbound.SERVE
    d = decide(
        _snapshot(_chain("c", _hcm(rds="rds")), rds={"rds": config}),
        RequestInfo("POST", "other:1", "/a/b", grpc=True),
    )
    assert d.code == _inbound.UNAVAILABLE and "virtual host" in d.message
    err = RouteConfigError("rds", ErrorKind.DOES_NOT_EXIST, "gone")
    d = decide(_snapshot(_chain("c", _hcm(rds="rds")), rds={"rds": err}))
    assert d.code == _inbound.UNAVAILABLE and "gone" in d.message


def test_filters_in_order_with_overrides() -> None:
    fault = HttpFilter("fault", "t", DELAY)
    deny = HttpFilter("rbac", "t", DENY_ALL)
    # Fault first: the delay is served, then RBAC denies.
    d = decide(_snapshot(_chain("c", _hcm(fault, deny))))
    assert (
        d.delay == 0.25
        and d.code == _inbound.PERMISSION_DENIED
        and d.message == "RBAC: access denied"
    )
    assert d.fault is not None and d.fault.count == 1
    # RBAC first: denied without delay (Envoy stops at the first filter that answers).
    d = decide(_snapshot(_chain("c", _hcm(deny, fault))))
    assert d.delay is None and d.code == _inbound.PERMISSION_DENIED
    # A gRPC abort status, and an HTTP abort mapped to its gRPC status (503 -> UNAVAILABLE).
    assert decide(_snapshot(_chain("c", _hcm(HttpFilter("fault", "t", ABORT))))).code == 8
    d = decide(_snapshot(_chain("c", _hcm(HttpFilter("fault", "t", HTTP_ABORT)))))
    assert d.code == _inbound.UNAVAILABLE and d.message == "fault filter abort"
    # Per-route overrides: RBAC disabled on the route; RBACPerRoute replacing the policy.
    off = _route(
        typed_per_filter_config=MappingProxyType(
            {"rbac": FilterConfigOverride(None, disabled=True)}
        )
    )
    assert decide(_snapshot(_chain("c", _hcm(deny, routes=(off,))))) == _inbound.SERVE
    allow = _route(
        typed_per_filter_config=MappingProxyType(
            {"rbac": FilterConfigOverride(RbacPerRoute(ALLOW_ALL))}
        )
    )
    assert decide(_snapshot(_chain("c", _hcm(deny, routes=(allow,))))) == _inbound.SERVE
    # A filter disabled in the HCM runs only where a route enables it.
    disabled = HttpFilter("rbac", "t", DENY_ALL, disabled=True)
    assert decide(_snapshot(_chain("c", _hcm(disabled)))) == _inbound.SERVE


def test_peer_and_listener_host_parsing() -> None:
    assert parse_peer("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert parse_peer("ipv6:[::1]:5555") == "::1"
    assert parse_peer("ipv6:%5B::1%5D:5555") == "::1"
    assert parse_peer("unix:/tmp/x") is None
    assert parse_peer_address("ipv6:[::1]:5555") == ("::1", 5555)
    assert parse_peer_address("ipv4:10.0.0.1:80") == ("10.0.0.1", 80)
    assert listener_host("0.0.0.0") == "0.0.0.0"
    assert listener_host("::") == "::"
    assert listener_host("localhost") == "127.0.0.1"


CORE_SERVER = textwrap.dedent(
    """
    import sys, time
    from concurrent import futures
    import grpc
    server = grpc.server(futures.ThreadPoolExecutor(2), xds=True)
    server.add_insecure_port(sys.argv[1])
    server.start()
    time.sleep(float(sys.argv[2]))
    server.stop(0)
    """
)


def test_listener_names_match_grpcio_xds_server(tmp_path: Path) -> None:
    """For the same bind address, pymesh's server asks for the listener grpcio's C-core xDS
    server asks for (IPv4, IPv4 wildcard, IPv6 wildcard)."""
    with XdsTestServer() as ads:
        path = tmp_path / "bootstrap.json"
        data = ads.bootstrap_dict()
        data["server_listener_resource_name_template"] = "xds.istio.io/grpc/lds/inbound/%s"
        path.write_text(json.dumps(data))
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(path)}
        env.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
        for host in ("127.0.0.1", "0.0.0.0", "[::]"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            address = f"{host}:{port}"
            seen_before = len(ads.requests)
            subprocess.run(
                [sys.executable, "-c", CORE_SERVER, address, "1.0"],
                env=env,
                timeout=60,
                check=True,
                capture_output=True,
            )
            core = {
                n
                for r in ads.requests[seen_before:]
                if r.type_url == LDS
                for n in r.request.resource_names
            }
            client = XdsClient(make_bootstrap(ads))
            try:
                bind_host, _ = split_address(address)
                ours = client.bootstrap.server_listener_name(listener_host(bind_host), port)
            finally:
                client.close()
            assert core == {ours}, (address, core, ours)


def test_bootstrap_without_server_template_and_second_port() -> None:
    from pymesh.errors import BootstrapError, PymeshError
    from pymesh.grpc import server

    with XdsTestServer() as ads:
        client = XdsClient(ads.bootstrap())  # no server_listener_resource_name_template
        srv = server(xds_client=client)
        try:
            srv.add_insecure_port("127.0.0.1:0")
            try:
                srv.add_insecure_port("127.0.0.1:0")
            except PymeshError as e:
                assert "one port" in str(e)
            else:
                raise AssertionError("a second port was accepted")
            try:
                srv.start()
            except BootstrapError as e:
                assert "server_listener_resource_name_template" in str(e)
            else:
                raise AssertionError("started without a listener name template")
        finally:
            srv.stop(None)
            client.close()
