"""Oracle: the RBAC evaluator (``pymesh.core.rbac``) decides as a real Envoy's RBAC filter.

ONE ``RouteConfiguration`` proto goes to both sides. Route ``/pN/`` carries an
``RBACPerRoute`` with policy N (ALLOW or DENY) and answers 200 directly; the HCM's base RBAC
filter has no rules. Envoy answers 403 ``RBAC: access denied`` when RBAC refuses. pymesh
decodes the same bytes, picks the route with its own matcher and evaluates the route's RBAC
with the connection Envoy sees (plaintext, 127.0.0.1 to 127.0.0.1:PORT). Every case must get
the same verdict.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as _rbac_pb2  # registers RBAC types
from google.protobuf import json_format

from pymesh.core.rbac import PeerInfo, evaluate_rbac
from pymesh.core.routing import route_request, select_vhost
from pymesh.core.types import Headers, RequestInfo
from pymesh.model.http_filters import RbacPerRoute
from pymesh.model.route import RouteConfiguration
from pymesh.xds.codec import decode_resource
from pymesh.xds.resource_types import ResourceType

pytestmark = pytest.mark.envoy

RBAC_FILTER = "envoy.filters.http.rbac"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
RBAC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = _free_port()


def _h(name: str, **spec: Any) -> dict[str, Any]:
    return {"header": {"name": name, **spec}}


def _sm(**spec: Any) -> dict[str, Any]:
    return {"string_match": spec}


ANY: dict[str, Any] = {"any": True}

# name -> (action, permission, principal)
POLICIES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "hdr-exact": ("ALLOW", _h("x-user", **_sm(exact="alice")), ANY),
    "hdr-prefix-ic": ("ALLOW", _h("x-user", **_sm(prefix="AL", ignore_case=True)), ANY),
    "hdr-suffix": ("ALLOW", _h("x-user", **_sm(suffix="ice")), ANY),
    "hdr-contains": ("DENY", _h("x-user", **_sm(contains="mal")), ANY),
    "hdr-regex": ("ALLOW", _h("x-user", **_sm(safe_regex={"regex": "a[a-z]+e"})), ANY),
    "hdr-present": ("ALLOW", _h("x-token", present_match=True), ANY),
    "hdr-absent": ("ALLOW", _h("x-token", present_match=False), ANY),
    "hdr-invert": ("ALLOW", _h("x-user", invert_match=True, **_sm(exact="bob")), ANY),
    "hdr-range": ("ALLOW", _h("x-n", range_match={"start": 10, "end": 20}), ANY),
    "hdr-missing-empty": (
        "ALLOW",
        _h("x-opt", treat_missing_header_as_empty=True, **_sm(exact="")),
        ANY,
    ),
    "method": ("ALLOW", _h(":method", **_sm(exact="POST")), ANY),
    "authority": ("ALLOW", _h(":authority", **_sm(exact="svc.local")), ANY),
    "host": ("ALLOW", _h("host", **_sm(prefix="svc.")), ANY),
    "path-hdr": ("ALLOW", _h(":path", **_sm(prefix="/p13/a")), ANY),
    "url-path": ("ALLOW", {"url_path": {"path": {"exact": "/p14/x"}}}, ANY),
    "url-path-ic": (
        "ALLOW",
        {"url_path": {"path": {"prefix": "/P15/A", "ignore_case": True}}},
        ANY,
    ),
    "not": ("ALLOW", {"not_rule": _h("x-user", **_sm(exact="bob"))}, ANY),
    "and": (
        "ALLOW",
        {"and_rules": {"rules": [_h("x-a", **_sm(exact="1")), _h("x-b", **_sm(exact="2"))]}},
        ANY,
    ),
    "or": (
        "DENY",
        {"or_rules": {"rules": [_h("x-a", **_sm(exact="1")), _h("x-b", **_sm(exact="2"))]}},
        ANY,
    ),
    "dst-port": ("ALLOW", {"destination_port": PORT}, ANY),
    "dst-port-other": ("ALLOW", {"destination_port": PORT + 1}, ANY),
    "dst-port-range": (
        "ALLOW",
        {"destination_port_range": {"start": PORT - 5, "end": PORT}},
        ANY,
    ),
    "dst-ip": ("ALLOW", {"destination_ip": {"address_prefix": "127.0.0.0", "prefix_len": 8}}, ANY),
    "src-direct": (
        "ALLOW",
        ANY,
        {"direct_remote_ip": {"address_prefix": "127.0.0.1", "prefix_len": 32}},
    ),
    "src-remote-miss": (
        "ALLOW",
        ANY,
        {"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}},
    ),
    "authn-any": ("ALLOW", ANY, {"authenticated": {}}),
    "authn-name": ("ALLOW", ANY, {"authenticated": {"principal_name": {"exact": ""}}}),
    "not-authn": ("ALLOW", ANY, {"not_id": {"authenticated": {}}}),
    "sni-empty": ("ALLOW", {"requested_server_name": {"exact": ""}}, ANY),
    "sni-set": ("ALLOW", {"requested_server_name": {"exact": "svc.local"}}, ANY),
    "principal-header": ("ALLOW", ANY, _h("x-user", **_sm(exact="alice"))),
    "principal-url": ("ALLOW", ANY, {"url_path": {"path": {"prefix": "/p31/"}}}),
    "metadata": (
        "ALLOW",
        {"metadata": {"filter": "f", "path": [{"key": "k"}], "value": {"present_match": True}}},
        ANY,
    ),
    "not-metadata": (
        "ALLOW",
        {
            "not_rule": {
                "metadata": {
                    "filter": "f",
                    "path": [{"key": "k"}],
                    "value": {"present_match": True},
                }
            }
        },
        ANY,
    ),
}
NAMES = list(POLICIES)
_ = _rbac_pb2


def route_configuration() -> route_pb2.RouteConfiguration:
    routes = []
    for i, name in enumerate(NAMES):
        action, permission, principal = POLICIES[name]
        routes.append(
            {
                "name": name,
                "match": {"prefix": f"/p{i}/"},
                "direct_response": {"status": 200},
                "typed_per_filter_config": {
                    RBAC_FILTER: {
                        "@type": RBAC_PER_ROUTE,
                        "rbac": {
                            "rules": {
                                "action": action,
                                "policies": {
                                    name: {"permissions": [permission], "principals": [principal]}
                                },
                            }
                        },
                    }
                },
            }
        )
    return json_format.ParseDict(
        {"name": "rbac", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        route_pb2.RouteConfiguration(),
    )


@dataclass(frozen=True)
class Case:
    policy: str
    suffix: str = "a"
    headers: tuple[tuple[str, str], ...] = ()
    method: str = "GET"
    authority: str = "svc.local"

    @property
    def path(self) -> str:
        return f"/p{NAMES.index(self.policy)}/{self.suffix}"


def _cases() -> list[Case]:
    u = "x-user"
    out = [Case(name) for name in NAMES]  # every policy, plain request
    out += [
        Case("hdr-exact", headers=((u, "alice"),)),
        Case("hdr-exact", headers=((u, "Alice"),)),
        Case("hdr-exact", headers=((u, "bob"), (u, "alice"))),
        Case("hdr-prefix-ic", headers=((u, "alex"),)),
        Case("hdr-prefix-ic", headers=((u, "bob"),)),
        Case("hdr-suffix", headers=((u, "alice"),)),
        Case("hdr-contains", headers=((u, "mallory"),)),
        Case("hdr-contains", headers=((u, "alice"),)),
        Case("hdr-regex", headers=((u, "alice"),)),
        Case("hdr-regex", headers=((u, "alicex"),)),
        Case("hdr-present", headers=(("x-token", ""),)),
        Case("hdr-present", headers=(("x-token", "t"),)),
        Case("hdr-absent", headers=(("x-token", "t"),)),
        Case("hdr-invert", headers=((u, "bob"),)),
        Case("hdr-invert", headers=((u, "carol"),)),
        Case("hdr-range", headers=(("x-n", "15"),)),
        Case("hdr-range", headers=(("x-n", "20"),)),
        Case("hdr-range", headers=(("x-n", "x"),)),
        Case("hdr-missing-empty", headers=(("x-opt", "v"),)),
        Case("method", method="POST"),
        Case("authority", authority="other.local"),
        Case("host", authority="svc.other"),
        Case("path-hdr", suffix="b"),
        Case("url-path", suffix="x?q=1"),
        Case("url-path", suffix="x"),
        Case("url-path-ic", suffix="ABC"),
        Case("not", headers=((u, "bob"),)),
        Case("and", headers=(("x-a", "1"), ("x-b", "2"))),
        Case("and", headers=(("x-a", "1"),)),
        Case("or", headers=(("x-b", "2"),)),
        Case("principal-header", headers=((u, "alice"),)),
    ]
    return out


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def envoy(tmp_path: Path, envoy_bin: Path) -> Iterator[bytes]:
    rc = route_configuration()
    data = rc.SerializeToString()
    same = route_pb2.RouteConfiguration.FromString(data)
    boot = {
        "static_resources": {
            "listeners": [
                {
                    "name": "rbac",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": PORT}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "rbac",
                                        "route_config": json.loads(json_format.MessageToJson(same)),
                                        "http_filters": [
                                            {"name": RBAC_FILTER, "typed_config": {"@type": RBAC}},
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    }
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(boot))
    log_path = tmp_path / "envoy.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                str(envoy_bin),
                "-c",
                str(config),
                "--base-id",
                str(random.randint(10_000, 60_000)),
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:

            def listening() -> bool:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                with socket.create_connection(("127.0.0.1", PORT), timeout=1):
                    return True

            _wait(listening, 30, "envoy listener")
            yield data
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _envoy_allows(case: Case) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
    try:
        conn.putrequest(case.method, case.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", case.authority)
        for k, v in case.headers:
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status in (200, 403), (case, resp.status, body)
    if resp.status == 403:
        assert body == b"RBAC: access denied", body
    return resp.status == 200


def _pymesh_allows(config: RouteConfiguration, case: Case) -> bool:
    request = RequestInfo(case.method, case.authority, case.path, Headers(case.headers))
    vhost = select_vhost(config, case.authority)
    assert vhost is not None
    route = route_request(vhost, request, rng=random.Random(0))
    assert route is not None and route.name == case.policy
    override = route.typed_per_filter_config[RBAC_FILTER].config
    assert isinstance(override, RbacPerRoute)
    peer = PeerInfo(source_ip="127.0.0.1", destination_ip="127.0.0.1", destination_port=PORT)
    return evaluate_rbac(override.rbac, request, peer).allowed


def test_rbac_verdicts_match_envoy(envoy: bytes) -> None:
    decoded = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, envoy).value
    assert isinstance(decoded, RouteConfiguration)
    cases = _cases()
    assert len(cases) >= 60
    results = [(case, _envoy_allows(case), _pymesh_allows(decoded, case)) for case in cases]
    mismatches = [(c, e, p) for c, e, p in results if e != p]
    assert not mismatches, "\n".join(f"{c}: envoy={e} pymesh={p}" for c, e, p in mismatches)
    # The table exercises both verdicts.
    verdicts = {e for _, e, _ in results}
    assert verdicts == {True, False}
