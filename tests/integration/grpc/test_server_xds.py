"""xDS-managed sync gRPC server (``pymesh.grpc.server``) against a real ADS server on loopback.

The listeners are built here as protos and served by ``tests/xdsserver.py``, so each test says
exactly what the server receives: missing / present / removed listener, a fault filter, RBAC
filters, a route that is not ``non_forwarding_action``, a listener demanding mTLS.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.type.matcher.v3 import path_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import pymesh.grpc._server as xds_server
from pymesh.bootstrap import Bootstrap, parse_bootstrap
from pymesh.controlplane.translate._clusters import common_tls_context
from pymesh.grpc._server import ServingStatus
from pymesh.xds.client import XdsClient
from tests.xdsserver import LDS, RDS, XdsTestServer

TEMPLATE = "xds.istio.io/grpc/lds/inbound/%s"
SERVICE = "test.Echo"


# --------------------------------------------------------------------------- listener protos


def _any(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def router_filter() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
    )


def fault_filter(
    *, abort_grpc: int | None = None, delay: float | None = None, percent: int = 100
) -> hcm_pb2.HttpFilter:
    fault = fault_pb2.HTTPFault()
    pct = percent_pb2.FractionalPercent(numerator=percent)
    if abort_grpc is not None:
        fault.abort.grpc_status = abort_grpc
        fault.abort.percentage.CopyFrom(pct)
    if delay is not None:
        fault.delay.fixed_delay.CopyFrom(duration_pb2.Duration(nanos=int(delay * 1e9)))
        fault.delay.percentage.CopyFrom(pct)
    return hcm_pb2.HttpFilter(name="envoy.filters.http.fault", typed_config=_any(fault))


def rbac_filter(
    action: str, policies: dict[str, rbac_config_pb2.Policy], name: str = "rbac"
) -> hcm_pb2.HttpFilter:
    rules = rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.Action.Value(action))
    for key, policy in policies.items():
        rules.policies[key].CopyFrom(policy)
    return hcm_pb2.HttpFilter(
        name=f"envoy.filters.http.{name}", typed_config=_any(rbac_pb2.RBAC(rules=rules))
    )


def header_policy(header: str, value: str) -> rbac_config_pb2.Policy:
    """Matches requests whose metadata ``header`` is exactly ``value``, from anyone."""
    return rbac_config_pb2.Policy(
        permissions=[
            rbac_config_pb2.Permission(
                header=route_components_pb2.HeaderMatcher(
                    name=header, string_match=string_pb2.StringMatcher(exact=value)
                )
            )
        ],
        principals=[rbac_config_pb2.Principal(any=True)],
    )


def path_policy(prefix: str) -> rbac_config_pb2.Policy:
    return rbac_config_pb2.Policy(
        permissions=[
            rbac_config_pb2.Permission(
                url_path=path_pb2.PathMatcher(path=string_pb2.StringMatcher(prefix=prefix))
            )
        ],
        principals=[rbac_config_pb2.Principal(any=True)],
    )


def inbound_listener(
    port: int,
    *,
    filters: Sequence[hcm_pb2.HttpFilter] = (),
    forward_prefixes: Sequence[str] = (),
    tls: bool = False,
    host: str = "127.0.0.1",
    rds: str | None = None,
) -> listener_pb2.Listener:
    """An Istio-style inbound listener for ``host:port``: one chain, inline routes (or the
    RDS resource ``rds``, see :func:`inbound_routes`)."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="inbound", http_filters=[*filters, router_filter()]
    )
    if rds is None:
        hcm.route_config.CopyFrom(inbound_routes("inbound", forward_prefixes))
    else:
        hcm.rds.config_source.ads.SetInParent()
        hcm.rds.route_config_name = rds
    chain = listener_components_pb2.FilterChain(
        name="inbound-plaintext" if not tls else "inbound-mtls",
        filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm)
            )
        ],
    )
    if tls:
        ctx = tls_pb2.DownstreamTlsContext()
        ctx.common_tls_context.CopyFrom(common_tls_context([], envoy=False))  # istiod's
        ctx.require_client_certificate.value = True
        chain.transport_socket.name = "envoy.transport_sockets.tls"
        chain.transport_socket.typed_config.CopyFrom(_any(ctx))
    return listener_pb2.Listener(
        name=listener_name(host, port),
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=host, port_value=port)
        ),
        filter_chains=[chain],
    )


def inbound_routes(
    name: str, forward_prefixes: Sequence[str] = (), domains: Sequence[str] = ("*",)
) -> route_pb2.RouteConfiguration:
    """Routes for ``forward_prefixes`` carry a (client-side) route action; everything else
    is ``non_forwarding_action``."""
    vh = route_components_pb2.VirtualHost(name="inbound", domains=list(domains))
    for prefix in forward_prefixes:
        vh.routes.add(
            match=route_components_pb2.RouteMatch(prefix=prefix),
            route=route_components_pb2.RouteAction(cluster="somewhere"),
        )
    vh.routes.add(
        match=route_components_pb2.RouteMatch(prefix="/"),
        non_forwarding_action=route_components_pb2.NonForwardingAction(),
    )
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vh])


def listener_name(host: str, port: int) -> str:
    return TEMPLATE.replace("%s", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


_ = base_pb2  # (kept for helpers that add metadata)


# --------------------------------------------------------------------------- handlers


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"echo:" + request


def _stream(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for item in request_iterator:
        yield b"echo:" + item


def echo_handlers() -> list[grpc.GenericRpcHandler]:
    return [
        grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(_unary),
                "Other": grpc.unary_unary_rpc_method_handler(_unary),
                "Chat": grpc.stream_stream_rpc_method_handler(_stream),
            },
        )
    ]


# --------------------------------------------------------------------------- fixtures


def make_bootstrap(ads: XdsTestServer) -> Bootstrap:
    return parse_bootstrap(json.dumps(make_bootstrap_dict(ads)), source="test")


def make_bootstrap_dict(ads: XdsTestServer) -> dict[str, Any]:
    data = ads.bootstrap_dict()
    data["server_listener_resource_name_template"] = TEMPLATE
    # What Istio's agent writes; the files need not exist until TLS is used.
    data["certificate_providers"] = {
        "default": {
            "plugin_name": "file_watcher",
            "config": {
                "certificate_file": "/nonexistent/cert-chain.pem",
                "private_key_file": "/nonexistent/key.pem",
                "ca_certificate_file": "/nonexistent/root-cert.pem",
                "refresh_interval": "900s",
            },
        }
    }
    return data


class StatusRecorder:
    """Records ``xds_serving_callback`` calls and waits for one."""

    def __init__(self) -> None:
        self.items: list[ServingStatus] = []
        self._cond = threading.Condition()

    def __call__(self, status: ServingStatus) -> None:
        with self._cond:
            self.items.append(status)
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[ServingStatus], bool], timeout: float = 10, *, start: int = 0
    ) -> ServingStatus:
        """The first status from index ``start`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.items[start:]:
                    if predicate(item):
                        return item
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no matching status in {self.items}"
                self._cond.wait(remaining)


@pytest.fixture
def ads() -> Iterator[XdsTestServer]:
    with XdsTestServer() as server:
        yield server


@pytest.fixture
def xds_client(ads: XdsTestServer) -> Iterator[XdsClient]:
    client = XdsClient(make_bootstrap(ads), does_not_exist_timeout=2.0)
    yield client
    client.close()


class Running:
    def __init__(self, server: xds_server.XdsServer, port: int, statuses: StatusRecorder):
        self.server = server
        self.port = port
        self.statuses = statuses
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def unary(self, payload: bytes = b"hi", method: str = "Unary", **kw: Any) -> bytes:
        fn = self.channel.unary_unary(f"/{SERVICE}/{method}")
        return fn(payload, timeout=5, **kw)  # type: ignore[no-any-return]

    def serving_status_ok(self) -> bool:
        return self.server.serving and self.server.serving_status.message == ""

    def code_of(self, method: str = "Unary", **kw: Any) -> tuple[grpc.StatusCode, str]:
        try:
            self.unary(method=method, **kw)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""


@pytest.fixture
def running(xds_client: XdsClient) -> Iterator[Running]:
    statuses = StatusRecorder()
    srv = xds_server.server(
        futures.ThreadPoolExecutor(max_workers=8),
        handlers=echo_handlers(),
        xds_serving_callback=statuses,
        xds_client=xds_client,
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    r = Running(srv, port, statuses)
    yield r
    r.channel.close()
    srv.stop(None).wait(5)


def serve_listener(ads: XdsTestServer, r: Running, **kw: Any) -> None:
    ads.set_resources(LDS, {listener_name("127.0.0.1", r.port): inbound_listener(r.port, **kw)})


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- tests


def test_serving_state_follows_the_listener(ads: XdsTestServer, running: Running) -> None:
    r = running
    assert r.server.listener_name == f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{r.port}"
    # Listener missing (the SotW server answers without it): NOT_SERVING, RPCs UNAVAILABLE.
    ads.set_resources(LDS, {"unrelated": inbound_listener(1)})
    missing = r.statuses.wait_for(lambda s: not s.serving and "does not exist" in s.message)
    assert missing.address == f"127.0.0.1:{r.port}"
    code, details = r.code_of()
    assert code is grpc.StatusCode.UNAVAILABLE and "not serving" in details
    assert health_status(r.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    # It arrives: SERVING.
    serve_listener(ads, r)
    r.statuses.wait_for(lambda s: s.serving)
    assert r.unary(b"x") == b"echo:x"
    assert health_status(r.channel) == health_pb2.HealthCheckResponse.SERVING
    # Each registered service follows the serving state too.
    assert health_status(r.channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    # Removed: NOT_SERVING again.
    n = len(r.statuses.items)
    ads.remove_resources(LDS, [listener_name("127.0.0.1", r.port)])
    r.statuses.wait_for(lambda s: not s.serving, start=n)
    assert r.code_of()[0] is grpc.StatusCode.UNAVAILABLE
    assert health_status(r.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_status(r.channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    # The callback saw exactly the mode changes, in order.
    modes = [s.serving for s in r.statuses.items]
    assert modes == [False, True, False], r.statuses.items


def test_rbac_deny_and_allow(ads: XdsTestServer, running: Running) -> None:
    r = running
    # Istio's order: DENY filter first, then ALLOW.
    serve_listener(
        ads,
        r,
        filters=[
            rbac_filter(
                "DENY",
                {"ns[default]-policy[deny-bad]-rule[0]": header_policy("x-user", "bad")},
                "rbac.deny",
            ),
            rbac_filter("ALLOW", {"allow-unary": path_policy(f"/{SERVICE}/Unary")}, "rbac.allow"),
        ],
    )
    r.statuses.wait_for(lambda s: s.serving)
    assert r.unary(b"ok", metadata=[("x-user", "good")]) == b"echo:ok"
    assert r.code_of(metadata=[("x-user", "bad")]) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "RBAC: access denied",
    )
    # Not allowed by the ALLOW filter: another method.
    assert r.code_of(method="Other") == (grpc.StatusCode.PERMISSION_DENIED, "RBAC: access denied")


def test_rbac_source_ip_principal(ads: XdsTestServer, running: Running) -> None:
    r = running

    def source_policy(prefix: str, length: int) -> rbac_config_pb2.Policy:
        return rbac_config_pb2.Policy(
            permissions=[rbac_config_pb2.Permission(any=True)],
            principals=[
                rbac_config_pb2.Principal(
                    direct_remote_ip=address_pb2.CidrRange(
                        address_prefix=prefix, prefix_len={"value": length}
                    )
                )
            ],
        )

    serve_listener(
        ads, r, filters=[rbac_filter("ALLOW", {"from-10": source_policy("10.0.0.0", 8)})]
    )
    r.statuses.wait_for(lambda s: s.serving)
    assert r.code_of()[0] is grpc.StatusCode.PERMISSION_DENIED
    serve_listener(
        ads, r, filters=[rbac_filter("ALLOW", {"from-lo": source_policy("127.0.0.0", 8)})]
    )
    deadline = time.monotonic() + 10
    while r.code_of()[0] is not grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the new listener never applied"
        time.sleep(0.05)


def test_fault_abort_and_delay(ads: XdsTestServer, running: Running) -> None:
    r = running
    serve_listener(ads, r, filters=[fault_filter(abort_grpc=8)])
    r.statuses.wait_for(lambda s: s.serving)
    assert r.code_of() == (grpc.StatusCode.RESOURCE_EXHAUSTED, "fault filter abort")
    serve_listener(ads, r, filters=[fault_filter(delay=0.4)])
    deadline = time.monotonic() + 10
    while r.code_of()[0] is not grpc.StatusCode.OK:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    assert r.unary(b"slow") == b"echo:slow"
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0, elapsed


def test_non_forwarding_route_serves_other_actions_unavailable(
    ads: XdsTestServer, running: Running
) -> None:
    r = running
    serve_listener(ads, r, forward_prefixes=[f"/{SERVICE}/Other"])
    r.statuses.wait_for(lambda s: s.serving)
    assert r.unary() == b"echo:hi"
    code, details = r.code_of(method="Other")
    assert code is grpc.StatusCode.UNAVAILABLE and "non-forwarding" in details


def test_tls_listener_without_certificates_is_not_serving(
    ads: XdsTestServer, running: Running
) -> None:
    r = running
    serve_listener(ads, r, tls=True)
    status = r.statuses.wait_for(lambda s: "requires TLS" in s.message)
    assert not status.serving
    assert r.code_of()[0] is grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_services(ads: XdsTestServer, running: Running) -> None:
    r = running
    stub = reflection_pb2_grpc.ServerReflectionStub(r.channel)
    # Reflection answers even before the listener arrives (probes read the state).
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for resp in responses for s in resp.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_listener_update_keeps_established_streams(ads: XdsTestServer, running: Running) -> None:
    r = running
    serve_listener(ads, r)
    r.statuses.wait_for(lambda s: s.serving)
    outgoing: list[bytes] = []
    cond = threading.Condition()

    def requests() -> Iterator[bytes]:
        sent = 0
        while True:
            with cond:
                while len(outgoing) <= sent:
                    cond.wait(5)
                item = outgoing[sent]
            sent += 1
            if item == b"":
                return
            yield item

    def send(item: bytes) -> None:
        with cond:
            outgoing.append(item)
            cond.notify_all()

    chat = r.channel.stream_stream(f"/{SERVICE}/Chat")
    responses = chat(requests(), timeout=20)
    send(b"1")
    assert next(responses) == b"echo:1"
    # New config: deny everything. New RPCs are refused; the open stream keeps going.
    serve_listener(ads, r, filters=[rbac_filter("ALLOW", {})])
    deadline = time.monotonic() + 10
    while r.code_of()[0] is not grpc.StatusCode.PERMISSION_DENIED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for i in range(2, 6):
        send(str(i).encode())
        assert next(responses) == f"echo:{i}".encode()
    send(b"")
    assert list(responses) == []


def test_registered_methods_and_streams_pass_the_chain(
    ads: XdsTestServer, xds_client: XdsClient
) -> None:
    """Handlers added with ``add_registered_method_handlers`` (what newer generated code
    calls) and streaming RPCs are filtered like any other."""
    statuses = StatusRecorder()
    srv = xds_server.server(
        futures.ThreadPoolExecutor(max_workers=4),
        handlers=echo_handlers(),
        xds_serving_callback=statuses,
        xds_client=xds_client,
    )
    srv.add_registered_method_handlers(
        "test.Registered", {"Ping": grpc.unary_unary_rpc_method_handler(_unary)}
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    r = Running(srv, port, statuses)
    try:
        serve_listener(
            ads, r, filters=[rbac_filter("DENY", {"bad": header_policy("x-user", "bad")})]
        )
        r.statuses.wait_for(lambda s: s.serving)
        ping = r.channel.unary_unary("/test.Registered/Ping", _registered_method=True)
        assert ping(b"a", timeout=5) == b"echo:a"
        with pytest.raises(grpc.RpcError) as denied:
            ping(b"a", timeout=5, metadata=[("x-user", "bad")])
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        chat = r.channel.stream_stream(f"/{SERVICE}/Chat")
        assert list(chat(iter([b"1", b"2"]), timeout=5)) == [b"echo:1", b"echo:2"]
        with pytest.raises(grpc.RpcError) as denied:
            list(chat(iter([b"1"]), timeout=5, metadata=[("x-user", "bad")]))
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.details() == "RBAC: access denied"
    finally:
        r.channel.close()
        srv.stop(None).wait(5)


def test_rds_route_configuration(ads: XdsTestServer, running: Running) -> None:
    """A listener naming an RDS route configuration: served once it arrives; an update of
    the route configuration alone applies to new RPCs; a virtual host that does not match
    the RPC's :authority gives UNAVAILABLE."""
    r = running
    ads.set_resources(RDS, {"inbound-rds": inbound_routes("inbound-rds")})
    serve_listener(ads, r, rds="inbound-rds")
    r.statuses.wait_for(lambda s: s.serving)
    assert r.unary() == b"echo:hi"
    ads.set_resources(
        RDS, {"inbound-rds": inbound_routes("inbound-rds", forward_prefixes=[f"/{SERVICE}/"])}
    )
    deadline = time.monotonic() + 10
    while r.code_of()[0] is not grpc.StatusCode.UNAVAILABLE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Virtual hosts are chosen by the RPC's :authority (the channel target here).
    ads.set_resources(RDS, {"inbound-rds": inbound_routes("inbound-rds", domains=["echo.mesh"])})
    deadline = time.monotonic() + 10
    while "virtual host" not in r.code_of()[1]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ads.set_resources(
        RDS,
        {"inbound-rds": inbound_routes("inbound-rds", domains=[f"127.0.0.1:{r.port}"])},
    )
    deadline = time.monotonic() + 10
    while r.code_of()[0] is not grpc.StatusCode.OK:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.serving_status_ok()


def test_control_plane_outage_keeps_serving(ads: XdsTestServer, running: Running) -> None:
    """An ambient error (the ADS server goes away) keeps the last good listener: still
    SERVING, RPCs still filtered by it; the control plane's return changes nothing."""
    r = running
    serve_listener(ads, r, filters=[rbac_filter("DENY", {"bad": header_policy("x-user", "bad")})])
    r.statuses.wait_for(lambda s: s.serving)
    n = len(r.statuses.items)
    ads.stop()
    time.sleep(1.0)  # the xDS stream fails and retries with backoff meanwhile
    assert r.server.serving
    assert r.unary() == b"echo:hi"
    assert r.code_of(metadata=[("x-user", "bad")])[0] is grpc.StatusCode.PERMISSION_DENIED
    ads.start()
    time.sleep(0.5)
    assert r.server.serving and r.unary() == b"echo:hi"
    assert r.statuses.items[n:] == [], r.statuses.items[n:]
