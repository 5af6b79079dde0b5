"""LDS decoder: Istio-shaped listeners (proxyless client and server), table tests of
rejected inputs, route_config_names, and a mutation property test."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import yaml
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.errors import ResourceError
from pymesh.model.common import SocketAddress
from pymesh.model.http_filters import FaultConfig, RbacAction, RbacConfig
from pymesh.model.listener import ConnectionSourceType, Listener
from pymesh.model.route import NonForwardingAction
from pymesh.model.tls import CertificateProviderInstance
from pymesh.xds.codec import decode_resource
from pymesh.xds.resource_types import ResourceType

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "xds"
LDS = ResourceType.LISTENER.type_url
TG = "type.googleapis.com/"
HCM = TG + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_PROXY = TG + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
DOWNSTREAM_TLS = TG + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
FAULT = TG + "envoy.extensions.filters.http.fault.v3.HTTPFault"
RBAC = TG + "envoy.extensions.filters.http.rbac.v3.RBAC"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((FIXTURES / name).read_text())
    return data


def to_bytes(d: dict[str, Any]) -> bytes:
    return json_format.ParseDict(d, listener_pb2.Listener()).SerializeToString()


def decode(d: dict[str, Any]) -> Listener:
    value = decode_resource(LDS, to_bytes(d)).value
    assert isinstance(value, Listener)
    return value


def hcm(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "@type": HCM,
        "rds": {"configSource": {"ads": {}}, "routeConfigName": "r"},
        "httpFilters": [ROUTER],
    }
    d.update(kw)
    return d


def chain(name: str = "c", match: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "filters": [{"name": "hcm", "typedConfig": hcm(**kw)}]}
    if match is not None:
        d["filterChainMatch"] = match
    return d


def server(*chains: dict[str, Any], **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "srv",
        "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 8080}},
        "filterChains": list(chains) or [chain()],
    }
    d.update(kw)
    return d


def client(**kw: Any) -> dict[str, Any]:
    return {"name": "cli", "apiListener": {"apiListener": hcm(**kw)}}


# --------------------------------------------------------------------------- Istio fixtures


def test_grpc_outbound_listener() -> None:
    lst = decode(fixture("lds_grpc_outbound_reviews.yaml"))
    assert lst.name == "reviews.default.svc.cluster.local:9080"
    assert not lst.is_server
    assert lst.address == SocketAddress("10.96.12.34", 9080)
    api = lst.api_listener
    assert api is not None
    assert api.rds_name == "outbound|9080||reviews.default.svc.cluster.local"
    assert api.max_stream_duration == 30.0
    assert [f.name for f in api.http_filters] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    assert api.http_filters[0].config == FaultConfig()
    assert lst.route_config_names() == {"outbound|9080||reviews.default.svc.cluster.local"}


def test_grpc_inbound_strict_listener() -> None:
    lst = decode(fixture("lds_grpc_inbound_strict.yaml"))
    assert lst.is_server and lst.address == SocketAddress("0.0.0.0", 9080)
    (fc,) = lst.filter_chains
    assert fc.name == "inbound-mtls"
    assert fc.match.source_type is ConnectionSourceType.ANY and fc.match.grpc_matchable
    assert fc.hcm.route_config is not None and fc.hcm.rds_name is None
    (vh,) = fc.hcm.route_config.virtual_hosts
    assert isinstance(vh.routes[0].action, NonForwardingAction)
    deny, allow, router = fc.hcm.http_filters
    assert isinstance(deny.config, RbacConfig) and deny.config.rules is not None
    assert deny.config.rules.action is RbacAction.DENY
    assert isinstance(allow.config, RbacConfig) and allow.config.rules is not None
    assert allow.config.rules.action is RbacAction.ALLOW
    assert len(allow.config.rules.policies) == 2
    assert router.is_router
    assert fc.tls is not None and fc.tls.require_client_certificate
    assert fc.tls.common.identity == CertificateProviderInstance("default", "default")
    assert fc.tls.common.validation is not None
    assert fc.tls.common.validation.ca == CertificateProviderInstance("default", "ROOTCA")
    assert lst.route_config_names() == frozenset()


def test_grpc_inbound_plaintext_ipv6() -> None:
    lst = decode(fixture("lds_grpc_inbound_plaintext.yaml"))
    assert lst.address == SocketAddress("::", 8080)
    assert lst.filter_chains[0].tls is None


# --------------------------------------------------------------------------- accepted


def test_route_config_names_from_all_chains() -> None:
    lst = decode(
        server(
            chain("a", {"sourcePrefixRanges": [{"addressPrefix": "10.0.0.0", "prefixLen": 8}]}),
            chain(
                "b",
                {"sourceType": "SAME_IP_OR_LOOPBACK"},
                rds={"configSource": {"self": {}}, "routeConfigName": "r2"},
            ),
            defaultFilterChain=chain(
                "d", rds={"configSource": {"ads": {}}, "routeConfigName": "r3"}
            ),
        )
    )
    assert lst.route_config_names() == {"r", "r2", "r3"}
    assert lst.default_filter_chain is not None and lst.default_filter_chain.name == "d"
    assert str(lst.filter_chains[0].match.source_prefix_ranges[0]) == "10.0.0.0/8"


def test_filter_chain_match_fields_decoded() -> None:
    lst = decode(
        server(
            chain(
                "m",
                {
                    "destinationPort": 8080,
                    "prefixRanges": [{"addressPrefix": "192.168.1.7", "prefixLen": 24}],
                    "sourcePorts": [1234],
                    "transportProtocol": "tls",
                    "applicationProtocols": ["h2"],
                    "serverNames": ["a.example.com"],
                },
            )
        )
    )
    m = lst.filter_chains[0].match
    assert m.destination_port == 8080 and m.source_ports == (1234,)
    assert str(m.prefix_ranges[0]) == "192.168.1.0/24"
    assert m.transport_protocol == "tls" and m.application_protocols == ("h2",)
    assert m.server_names == ("a.example.com",)
    assert not m.grpc_matchable


def test_client_inline_route_config_and_timeouts() -> None:
    d = client(
        routeConfig={
            "name": "inline",
            "virtualHosts": [
                {
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "x"}}],
                }
            ],
        },
        streamIdleTimeout="300s",
    )
    del d["apiListener"]["apiListener"]["rds"]
    lst = decode(d)
    assert lst.api_listener is not None and lst.api_listener.route_config is not None
    assert lst.api_listener.route_config.cluster_names() == {"x"}
    assert lst.api_listener.stream_idle_timeout == 300.0
    assert lst.route_config_names() == frozenset()


def test_overlapping_chains_that_grpc_never_matches_are_accepted() -> None:
    decode(
        server(chain("a", {"serverNames": ["x"]}), chain("b", {"serverNames": ["x"]}), chain("c"))
    )


# --------------------------------------------------------------------------- rejected


def _without_rds(d: dict[str, Any]) -> dict[str, Any]:
    del d["apiListener"]["apiListener"]["rds"]
    return d


REJECTED: list[tuple[dict[str, Any], str, str]] = [
    ({**client(), "name": ""}, "name", "empty resource name"),
    (
        {
            "name": "cli",
            "apiListener": {
                "apiListener": {
                    "@type": TCP_PROXY,
                    "statPrefix": "x",
                    "cluster": "c",
                }
            },
        },
        "api_listener.api_listener",
        "must be an HCM",
    ),
    (_without_rds(client()), "api_listener.api_listener", "needs rds or route_config"),
    (
        client(rds={"configSource": {"path": "/etc/r.yaml"}, "routeConfigName": "r"}),
        "api_listener.api_listener.rds.config_source",
        "must be ads or self",
    ),
    (
        client(rds={"configSource": {"ads": {}}}),
        "api_listener.api_listener.rds.route_config_name",
        "empty",
    ),
    (
        client(rds={"routeConfigName": "r"}),
        "api_listener.api_listener.rds.config_source",
        "required",
    ),
    (client(httpFilters=[]), "api_listener.api_listener.http_filters", "empty"),
    (
        client(commonHttpProtocolOptions={"maxStreamDuration": "-1s"}),
        "api_listener.api_listener.common_http_protocol_options.max_stream_duration",
        "out of range",
    ),
    (
        _without_rds(
            client(
                routeConfig={
                    "name": "i",
                    "virtualHosts": [
                        {
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": ""}}],
                        }
                    ],
                }
            )
        ),
        "api_listener.api_listener.route_config.virtual_hosts[0].routes[0].route.cluster",
        "empty cluster",
    ),
    (
        _without_rds(client(scopedRoutes={"name": "s"})),
        "api_listener.api_listener.scoped_routes",
        "not supported",
    ),
    ({**server(), "address": None}, "address", "needs an address"),
    (
        server(address={"pipe": {"path": "/tmp/s"}}),
        "address",
        "only socket_address",
    ),
    (
        server(address={"socketAddress": {"address": "0.0.0.0", "namedPort": "http"}}),
        "address.socket_address.port_value",
        "numeric",
    ),
    (
        server(listenerFilters=[{"name": "envoy.filters.listener.tls_inspector"}]),
        "listener_filters",
        "A36",
    ),
    (server(useOriginalDst=True), "use_original_dst", "A36"),
    (server(filterChains=[]), "default_filter_chain", "needs filter_chains or a default"),
    (
        {**server(), "filterChains": [{"name": "empty"}]},
        "filter_chains[0].filters",
        "no HttpConnectionManager",
    ),
    (
        server(
            filterChains=[
                {
                    "filters": [
                        {
                            "name": "tcp",
                            "typedConfig": {
                                "@type": TCP_PROXY,
                                "statPrefix": "x",
                                "cluster": "c",
                            },
                        }
                    ]
                }
            ]
        ),
        "filter_chains[0].filters[0].typed_config",
        "unsupported network filter",
    ),
    (
        server(
            filterChains=[
                {
                    "filters": [
                        {"name": "a", "typedConfig": hcm()},
                        {"name": "b", "typedConfig": hcm()},
                    ]
                }
            ]
        ),
        "filter_chains[0].filters[1]",
        "more than one",
    ),
    (
        server(chain("a"), chain("b")),
        "filter_chains[1]",
        "overlaps filter_chains[0]",
    ),
    (
        server(
            chain("a", {"sourcePorts": [1, 2]}),
            chain("b", {"sourcePorts": [2]}),
        ),
        "filter_chains[1]",
        "overlaps",
    ),
    (
        server(chain("a", {"sourcePorts": [70000]})),
        "filter_chains[0].filter_chain_match.source_ports[0]",
        "out of range",
    ),
    (
        server(chain("a", {"prefixRanges": [{"addressPrefix": "10.0.0.300"}]})),
        "filter_chains[0].filter_chain_match.prefix_ranges[0].address_prefix",
        "invalid IP",
    ),
    (
        server(
            {
                **chain("tls"),
                "transportSocket": {
                    "name": "envoy.transport_sockets.tls",
                    "typedConfig": {
                        "@type": DOWNSTREAM_TLS,
                        "commonTlsContext": {},
                    },
                },
            }
        ),
        "filter_chains[0].transport_socket.typed_config.common_tls_context",
        "identity certificate",
    ),
    (
        server(
            {
                **chain("tls"),
                "transportSocket": {
                    "name": "envoy.transport_sockets.tls",
                    "typedConfig": {
                        "@type": DOWNSTREAM_TLS,
                        "commonTlsContext": {
                            "tlsCertificateProviderInstance": {"instanceName": "default"}
                        },
                        "requireClientCertificate": True,
                    },
                },
            }
        ),
        "filter_chains[0].transport_socket.typed_config.common_tls_context",
        "require_client_certificate",
    ),
    (
        server(
            defaultFilterChain={
                "filters": [
                    {
                        "name": "hcm",
                        "typedConfig": hcm(
                            httpFilters=[
                                {
                                    "name": "r",
                                    "typedConfig": {"@type": RBAC},
                                }
                            ]
                        ),
                    }
                ]
            }
        ),
        "default_filter_chain.filters[0].typed_config.http_filters[0]",
        "not a terminal",
    ),
]


@pytest.mark.parametrize(
    ("listener", "field", "message"), REJECTED, ids=[r[1] + ":" + r[2] for r in REJECTED]
)
def test_rejected_listener(listener: dict[str, Any], field: str, message: str) -> None:
    listener = {k: v for k, v in listener.items() if v is not None}
    with pytest.raises(ResourceError) as err:
        decode(listener)
    assert err.value.type_name == "Listener"
    assert err.value.resource_name == listener.get("name", "")
    assert err.value.field == field
    assert message in err.value.message


def test_unparseable_bytes() -> None:
    with pytest.raises(ResourceError) as err:
        decode_resource(LDS, b"\x12\x05abc")
    assert err.value.type_name == "Listener" and "cannot parse" in err.value.message


# --------------------------------------------------------------------------- property


_SEEDS = [
    to_bytes(fixture(n))
    for n in (
        "lds_grpc_inbound_strict.yaml",
        "lds_grpc_outbound_reviews.yaml",
        "lds_grpc_inbound_plaintext.yaml",
    )
]


@settings(max_examples=300, deadline=None)
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(0, 255), st.booleans()),
        min_size=1,
        max_size=8,
    ),
)
def test_mutated_bytes_only_raise_resource_error(
    seed: bytes, edits: list[tuple[int, int, bool]]
) -> None:
    data = bytearray(seed)
    for pos, byte, insert in edits:
        at = pos % (len(data) + 1)
        if insert:
            data.insert(at, byte)
        elif data:
            data[at % len(data)] = byte
    try:
        decode_resource(LDS, bytes(data))
    except ResourceError:
        pass


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutated_fields_only_raise_resource_error(data: st.DataObject) -> None:
    """Structure-aware mutation: overwrite random scalar leaves of the Istio fixtures."""
    d = copy.deepcopy(
        fixture(
            data.draw(
                st.sampled_from(["lds_grpc_inbound_strict.yaml", "lds_grpc_outbound_reviews.yaml"])
            )
        )
    )
    leaves: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            if isinstance(v, dict | list):
                walk(v)
            elif k != "@type":
                leaves.append((node, k))

    walk(d)
    for _ in range(data.draw(st.integers(1, 4))):
        node, key = data.draw(st.sampled_from(leaves))
        value = node[key]
        if isinstance(value, bool):
            node[key] = not value
        elif isinstance(value, int):
            node[key] = data.draw(st.integers(0, 2**32 - 1))
        else:
            node[key] = data.draw(
                st.sampled_from(["", "*", "(", "-1s", "0.0.0.0", ":path", "a.*.b", "grpc-x"])
            )
    try:
        raw = to_bytes(d)
    except (json_format.ParseError, ValueError):
        return  # not representable as a Listener at all
    try:
        decode_resource(LDS, raw)
    except ResourceError:
        pass


# --------------------------------------------------------------------------- gRPC oracle
#
# grpcio's C-core xDS client is the reference for proxyless listeners (DESIGN.md, "real peers
# are the oracle"). A subprocess (GRPC_XDS_BOOTSTRAP_CONFIG set before grpc starts) opens
# xds:/// channels (client side) or xDS-enabled servers (server side) against a test ADS
# server; its NACKs name each invalid resource and field. gRPC writes ``X.value[Type].y``
# where we write ``X.y``; after removing those segments its field must be ours or a prefix
# of ours (we may point deeper, e.g. at the offending weight rather than the list).

# One channel at a time, each open 0.1 s (its listener watch, and its route's, with it), in
# passes until the test has what it waits for and kills the process: on a loaded machine a
# listener can arrive after its channel closed, and the next pass asks again.
_GRPC_CLIENT = """
import sys, grpc
while True:
    for target in sys.argv[1:]:
        channel = grpc.insecure_channel("xds:///" + target)
        try:
            grpc.channel_ready_future(channel).result(timeout=0.1)
        except grpc.FutureTimeoutError:
            pass
        channel.close()
"""

_GRPC_SERVER = """
import sys, grpc
from concurrent import futures
servers = []
for port in sys.argv[1:]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), xds=True)
    server.add_insecure_port("127.0.0.1:" + port)
    server.start()
    servers.append(server)
print("STARTED", flush=True)
sys.stdin.read()
for server in servers:
    server.stop(None)
"""


def _grpc_nacks(server: Any) -> dict[str, list[str]]:
    """Resource name -> gRPC's (normalized) error field paths, from every NACK received."""
    out: dict[str, list[str]] = {}
    for r in list(server.requests):
        if not r.is_nack:
            continue
        for part in re.split(r"resource index \d+: ", r.request.error_detail.message):
            m = re.match(r"(.+?): INVALID_ARGUMENT: (.*)", part, re.S)
            if m:
                fields = re.findall(r"field:(\S+) error", m.group(2))
                # gRPC points inside Durations (.seconds/.nanos); we name the Duration.
                out[m.group(1)] = [
                    re.sub(r"\.(seconds|nanos)$", "", re.sub(r"\.value\[[^\]]*\]", "", f))
                    for f in fields
                ]
    return out


def _run_grpc(script: str, args: list[str], bootstrap: dict[str, Any], done: Any) -> None:
    """Run ``script`` until ``done()`` (polled) or 40 s, then stop it."""
    env = dict(os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=json.dumps(bootstrap))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not done():
            time.sleep(0.2)
        time.sleep(0.5)  # let the last ACK/NACK arrive
    finally:
        proc.kill()
        proc.wait(10)


def _assert_same_field(name: str, ours: str | None, grpc_fields: list[str]) -> None:
    assert ours is not None, f"{name}: gRPC NACKs ({grpc_fields}) but we accept"
    assert any(
        ours == f or ours.startswith(f + ".") or ours.startswith(f + "[") for f in grpc_fields
    ), f"{name}: we name {ours}, gRPC names {grpc_fields}"


def _ours(type_url: str, msg: Any) -> str | None:
    try:
        decode_resource(type_url, msg.SerializeToString())
    except ResourceError as err:
        return err.field or ""
    return None


_FAULT_F = {"name": "f", "typedConfig": {"@type": FAULT}}
# An RDS name must not be empty (gRPC would subscribe to ""); gRPC accepts it.
PYMESH_STRICTER_THAN_GRPC = {"api_listener.api_listener.rds.route_config_name"}
CLIENT_GRPC_REJECTED: list[dict[str, Any]] = [
    client(httpFilters=[_FAULT_F, _FAULT_F, ROUTER]),
    client(httpFilters=[ROUTER, _FAULT_F]),
    client(
        httpFilters=[
            {"name": "w", "typedConfig": {"@type": TG + "google.protobuf.Struct", "value": {}}},
            ROUTER,
        ]
    ),
] + [
    d
    for d, field, _ in REJECTED
    if "apiListener" in d and d.get("name") and field not in PYMESH_STRICTER_THAN_GRPC
]


def test_grpc_oracle_client_listeners_and_routes() -> None:
    """gRPC accepts the Istio-shaped client LDS/RDS fixtures; every client listener we NACK,
    gRPC NACKs at the same field; every route configuration gRPC NACKs, we NACK at the
    same field (the reverse need not hold: we also decode Envoy-only features)."""
    from tests.unit.codec import test_http_filters as filter_tests
    from tests.unit.codec import test_route as rds_tests
    from tests.xdsserver import LDS as LDS_URL
    from tests.xdsserver import RDS as RDS_URL
    from tests.xdsserver import XdsTestServer

    listeners: dict[str, Any] = {}
    ok = fixture("lds_grpc_outbound_reviews.yaml")
    listeners[ok["name"]] = ok
    for i, d in enumerate(CLIENT_GRPC_REJECTED):
        listeners[f"bad{i}"] = {**copy.deepcopy(d), "name": f"bad{i}"}
    for i, (cfg, _field, _msg) in enumerate(filter_tests.FAULT_REJECTED):
        fault_filter = {"name": "f", "typedConfig": {"@type": FAULT, **cfg}}
        listeners[f"fault{i}"] = {**client(httpFilters=[fault_filter, ROUTER]), "name": f"fault{i}"}
    routes: dict[str, Any] = {}
    rc_ok = rds_tests.fixture("rds_grpc_reviews.yaml")
    routes[rc_ok["name"]] = rc_ok
    for i, (route, _field, _msg) in enumerate(rds_tests.REJECTED):
        routes[f"r{i}"] = {**rds_tests.base(route), "name": f"r{i}"}
    for i, (mutate, field, _msg) in enumerate(rds_tests.REJECTED_CONFIG):
        if field != "name":
            d = rds_tests.base()
            mutate(d)
            routes[f"rc{i}"] = {**d, "name": f"rc{i}"}
    for name in routes:
        if name != rc_ok["name"]:
            listeners[f"to_{name}"] = {
                **client(rds={"configSource": {"ads": {}}, "routeConfigName": name}),
                "name": f"to_{name}",
            }
    lds_msgs = {n: json_format.ParseDict(d, listener_pb2.Listener()) for n, d in listeners.items()}
    rds_msgs = {
        n: json_format.ParseDict(d, route_pb2.RouteConfiguration()) for n, d in routes.items()
    }

    with XdsTestServer() as server:
        server.set_resources(LDS_URL, lds_msgs)
        server.set_resources(RDS_URL, rds_msgs)

        def subscribed() -> set[str]:
            return {n for r in list(server.requests) for n in r.request.resource_names}

        _run_grpc(
            _GRPC_CLIENT,
            list(listeners),
            server.bootstrap_dict(),
            lambda: set(rds_msgs) <= subscribed(),
        )
        assert set(rds_msgs) <= subscribed()
        nacks = _grpc_nacks(server)

    assert ok["name"] not in nacks and rc_ok["name"] not in nacks
    for name, msg in lds_msgs.items():
        if name.startswith("bad"):
            assert name in nacks, f"gRPC accepts {name}, we do not"
        if name in nacks:
            _assert_same_field(name, _ours(LDS, msg), nacks[name])
    agreed = 0
    for name, msg in rds_msgs.items():
        match = routes[name]["virtualHosts"][0]["routes"][0].get("match", {})
        if "pathMatchPolicy" in match or "pathSeparatedPrefix" in match:
            continue  # Envoy features gRPC does not have: it NACKs the matcher itself
        if name in nacks:
            _assert_same_field(name, _ours(RDS_URL, msg), nacks[name])
            agreed += 1
    assert agreed >= 10  # the oracle really ran: gRPC shares many of our rejections


def test_grpc_oracle_server_listeners() -> None:
    """xDS-enabled grpcio servers accept the Istio-shaped inbound listeners and NACK, at the
    same field, the A36/A39/A41 rules we apply (gRPC-prefixed and :scheme headers in RBAC,
    CEL conditions, non-HCM network filters, overlapping chains, duplicate filter names)."""
    from tests.unit.codec import test_http_filters as filter_tests
    from tests.xdsserver import LDS as LDS_URL
    from tests.xdsserver import XdsTestServer

    strict = fixture("lds_grpc_inbound_strict.yaml")
    del strict["filterChains"][0]["transportSocket"]  # no certificate provider here

    def with_rbac(**policy: Any) -> dict[str, Any]:
        d = copy.deepcopy(strict)
        rbac = d["filterChains"][0]["filters"][0]["typedConfig"]["httpFilters"][1]["typedConfig"]
        rbac["rules"]["policies"] = {
            "p": {"permissions": [{"any": True}], "principals": [{"any": True}], **policy}
        }
        return d

    # valid: True = both accept, False = both NACK, None = compare fields if gRPC NACKs.
    cases: dict[str, tuple[dict[str, Any], bool | None]] = {
        "strict": (strict, True),
        "plaintext": (fixture("lds_grpc_inbound_plaintext.yaml"), True),
        "grpc_header": (
            with_rbac(permissions=[{"header": {"name": "grpc-timeout", "presentMatch": True}}]),
            False,
        ),
        "scheme_header": (
            with_rbac(principals=[{"header": {"name": ":scheme", "exactMatch": "https"}}]),
            False,
        ),
        "cel": (with_rbac(condition={"constExpr": {"boolValue": True}}), False),
        "overlap": ({**strict, "filterChains": strict["filterChains"] * 2}, False),
        "tcp_proxy": (
            server(
                filterChains=[
                    {
                        "filters": [
                            {
                                "name": "t",
                                "typedConfig": {
                                    "@type": TCP_PROXY,
                                    "statPrefix": "x",
                                    "cluster": "c",
                                },
                            }
                        ]
                    }
                ]
            ),
            False,
        ),
        "dup_names": (server(chain("a", httpFilters=[_FAULT_F, _FAULT_F, ROUTER])), False),
    }
    for i, (d, field, _msg) in enumerate(REJECTED):
        # Not: address cases (the name/address are rewritten per port below) and TLS cases
        # (gRPC checks provider names against the bootstrap, which has none here).
        skip = field.startswith("address") or "transport_socket" in field
        if "apiListener" not in d and d.get("name") and not skip:
            cases[f"server{i}"] = ({k: v for k, v in d.items() if v is not None}, None)
    for i, (cfg, _field, _msg) in enumerate(filter_tests.RBAC_REJECTED):
        rbac_filter = {"name": "r", "typedConfig": {"@type": RBAC, **cfg}}
        cases[f"rbac{i}"] = (server(chain("a", httpFilters=[rbac_filter, ROUTER])), None)
    ports = {}
    for name in cases:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[name] = s.getsockname()[1]
    msgs: dict[str, Any] = {}
    for name, (d, _) in cases.items():
        lname = f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{ports[name]}"
        d = {**copy.deepcopy(d), "name": lname}
        d["address"] = {"socketAddress": {"address": "127.0.0.1", "portValue": ports[name]}}
        msgs[lname] = json_format.ParseDict(d, listener_pb2.Listener())

    with XdsTestServer() as ads:
        ads.set_resources(LDS_URL, msgs)
        bootstrap = ads.bootstrap_dict()
        bootstrap["server_listener_resource_name_template"] = "xds.istio.io/grpc/lds/inbound/%s"

        def answered() -> bool:
            names = {
                n
                for r in list(ads.requests)
                if r.request.response_nonce
                for n in r.request.resource_names
            }
            return set(msgs) <= names

        _run_grpc(_GRPC_SERVER, [str(p) for p in ports.values()], bootstrap, answered)
        nacks = _grpc_nacks(ads)

    for name, (_, valid) in cases.items():
        lname = f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{ports[name]}"
        ours = _ours(LDS, msgs[lname])
        if valid:
            assert lname not in nacks and ours is None, name
        elif valid is False or lname in nacks:
            assert lname in nacks, f"gRPC accepts {name}"
            _assert_same_field(name, ours, nacks[lname])
