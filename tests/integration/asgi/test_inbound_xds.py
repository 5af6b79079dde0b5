"""The middleware against hand-written inbound listeners (an ADS test server, not istiod's
shapes): virtual hosts by ``Host``, non-forwarding routes, the fault filter's HTTP abort and
delay, RBAC on headers, listener updates for new requests; plus the pure chain selection
with transport protocols (PERMISSIVE's ``tls`` / ``raw_buffer`` chains)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2

import pymesh.asgi
from pymesh.bootstrap import parse_bootstrap
from pymesh.core import inbound
from pymesh.core.rbac import PeerInfo
from pymesh.model.listener import FilterChain, FilterChainMatch, HttpConnectionManager, Listener
from pymesh.model.tls import CommonTlsContext, DownstreamTlsContext
from pymesh.xds.client import XdsClient
from tests.integration.asgi.conftest import whoami
from tests.integration.grpc.test_server_xds import (
    _any,
    header_policy,
    inbound_listener,
    inbound_routes,
    listener_name,
    make_bootstrap_dict,
    rbac_filter,
)
from tests.xdsserver import LDS, XdsTestServer


def http_fault(*, status: int | None = None, delay: float | None = None) -> object:
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    fault = fault_pb2.HTTPFault()
    pct = percent_pb2.FractionalPercent(numerator=100)
    if status is not None:
        fault.abort.http_status = status
        fault.abort.percentage.CopyFrom(pct)
    if delay is not None:
        fault.delay.fixed_delay.CopyFrom(duration_pb2.Duration(nanos=int(delay * 1e9)))
        fault.delay.percentage.CopyFrom(pct)
    return hcm_pb2.HttpFilter(name="envoy.filters.http.fault", typed_config=_any(fault))


@pytest.fixture
def served() -> Iterator[tuple[XdsTestServer, pymesh.asgi.MeshServer]]:
    with XdsTestServer() as ads:
        data = make_bootstrap_dict(ads)
        del data["certificate_providers"]  # plaintext server
        client = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
        server = pymesh.asgi.MeshServer(whoami, host="127.0.0.1", port=0, xds_client=client)
        server.start()
        try:
            yield ads, server
        finally:
            server.stop()
            client.close()


def _set(ads: XdsTestServer, port: int, **kw: object) -> None:
    ads.set_resources(LDS, {listener_name("127.0.0.1", port): inbound_listener(port, **kw)})  # type: ignore[arg-type]


def _get(port: int, path: str = "/", **kw: object) -> httpx.Response:
    with httpx.Client(timeout=5) as c:
        return c.get(f"http://127.0.0.1:{port}{path}", **kw)  # type: ignore[arg-type]


def _until(port: int, path: str, status: int, **kw: object) -> httpx.Response:
    deadline = time.monotonic() + 10
    while (r := _get(port, path, **kw)).status_code != status:
        assert time.monotonic() < deadline, (r.status_code, r.text)
        time.sleep(0.05)
    return r


def test_fault_rbac_routes_and_updates(
    served: tuple[XdsTestServer, pymesh.asgi.MeshServer],
) -> None:
    ads, server = served
    port = server.port
    assert _get(port).status_code == 503  # no listener yet
    _set(ads, port, filters=[http_fault(status=429)])
    r = _until(port, "/", 429)
    assert r.text == "fault filter abort"
    # Delay, then the app: a listener update applies to the next requests.
    _set(ads, port, filters=[http_fault(delay=0.3)])
    _until(port, "/", 200)
    started = time.monotonic()
    assert _get(port, "/slow").status_code == 200
    assert 0.3 <= time.monotonic() - started < 2.0
    # RBAC DENY on a header, before the router.
    _set(ads, port, filters=[rbac_filter("DENY", {"no-bots": header_policy("x-bot", "yes")})])
    r = _until(port, "/", 403, headers={"x-bot": "yes"})
    assert r.text == "RBAC: access denied"
    assert _get(port, "/", headers={"x-bot": "no"}).status_code == 200
    # A route with a (client-side) route action: not servable; others are.
    _set(ads, port, forward_prefixes=["/proxy"])
    _until(port, "/proxy/x", 503)
    assert _get(port, "/other").status_code == 200


def test_virtual_host_by_host_header(served: tuple[XdsTestServer, pymesh.asgi.MeshServer]) -> None:
    from envoy.config.listener.v3 import listener_pb2

    ads, server = served
    port = server.port
    ln: listener_pb2.Listener = inbound_listener(port)
    # Re-pack the chain's HCM with routes only for web.example:
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    hcm = hcm_pb2.HttpConnectionManager()
    ln.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    hcm.route_config.CopyFrom(inbound_routes("inbound", domains=["web.example", "web.example:*"]))
    ln.filter_chains[0].filters[0].typed_config.CopyFrom(_any(hcm))
    ads.set_resources(LDS, {listener_name("127.0.0.1", port): ln})
    _until(port, "/", 200, headers={"host": "web.example"})
    assert _get(port, "/", headers={"host": "other.example"}).status_code == 404


def _chain(name: str, transport: str = "", tls: bool = False) -> FilterChain:
    return FilterChain(
        name,
        FilterChainMatch(transport_protocol=transport),
        HttpConnectionManager(),
        DownstreamTlsContext(CommonTlsContext(), True) if tls else None,
    )


def test_chain_selection_by_transport_protocol() -> None:
    permissive = Listener(
        "l", filter_chains=(_chain("mtls", "tls", tls=True), _chain("plain", "raw_buffer"))
    )
    strict = Listener("l", filter_chains=(_chain("mtls", "", tls=True),))
    mixed = Listener("l", filter_chains=(_chain("any"), _chain("tls-only", "tls", tls=True)))
    peer = PeerInfo(source_ip="10.0.0.1", destination_ip="10.0.0.2", destination_port=80)

    def pick(listener: Listener, transport: str | None) -> str | None:
        chain = inbound.select_filter_chain(listener, peer, transport=transport)
        return None if chain is None else chain.name

    assert pick(permissive, "tls") == "mtls"
    assert pick(permissive, "raw_buffer") == "plain"
    assert pick(permissive, None) == "plain"  # gRPC (A36): the tls chain never matches
    assert pick(strict, "tls") == "mtls"
    assert pick(strict, "raw_buffer") == "mtls"  # then refused: it demands TLS
    assert pick(mixed, "tls") == "tls-only"  # naming the protocol beats leaving it empty
    assert pick(mixed, "raw_buffer") == "any"
