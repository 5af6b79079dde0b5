"""Oracle: a real Envoy takes the control plane's CDS/EDS/RDS over ADS with zero rejections.

Envoy has one static listener whose HTTP connection manager asks for the route configuration
``outbound|PORT||HOST`` over ADS, and wildcard CDS (as istiod serves a sidecar). Two stdlib
HTTP backends are the endpoints; a VirtualService splits 90/10 between subsets. Real requests
through Envoy must split within 5 points, and Envoy's stats must show no rejected update.
"""

from __future__ import annotations

import http.client
import http.server
import json
import textwrap
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymesh.controlplane import ControlPlane
from tests.envoy_process import EnvoyProcess, run_envoy, wait_until
from tests.integration.controlplane._helpers import syncz

HOST = "web.default.svc.cluster.local"
PORT = 8080
ROUTE = f"outbound|{PORT}||{HOST}"
REQUESTS = 1000

pytestmark = pytest.mark.envoy


def _backend(answer: str) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_GET(self) -> None:
            body = answer.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def backends() -> Iterator[dict[str, int]]:
    servers = {v: _backend(v) for v in ("v1", "v2")}
    yield {v: s.server_address[1] for v, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


def mesh_yaml(ports: dict[str, int], v1_weight: int = 90, max_pending: int = 0) -> str:
    pool = (
        f", connectionPool: {{http: {{http1MaxPendingRequests: {max_pending}}}}}"
        if max_pending
        else ""
    )
    return textwrap.dedent(
        f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: web, namespace: default}}
        spec:
          hosts: [{HOST}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {ports["v1"]}}}, labels: {{version: v1}}}}
          - {{address: 127.0.0.1, ports: {{http: {ports["v2"]}}}, labels: {{version: v2}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: web, namespace: default}}
        spec:
          host: {HOST}
          trafficPolicy: {{tls: {{mode: DISABLE}}{pool}}}
          subsets:
          - {{name: v1, labels: {{version: v1}}}}
          - {{name: v2, labels: {{version: v2}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: web, namespace: default}}
        spec:
          hosts: [{HOST}]
          http:
          - route:
            - destination: {{host: {HOST}, subset: v1}}
              weight: {v1_weight}
            - destination: {{host: {HOST}, subset: v2}}
              weight: {100 - v1_weight}
        """
    )


def envoy_config(xds_port: int, api_type: str) -> dict[str, object]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "node": {
            "id": "sidecar~127.0.0.1~envoy-oracle.default~default.svc.cluster.local",
            "cluster": "envoy-oracle.default",
            "metadata": {"NAMESPACE": "default", "LABELS": {"app": "envoy-oracle"}},
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": xds_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "outbound",
                                        "rds": {
                                            "route_config_name": ROUTE,
                                            "config_source": {
                                                "ads": {},
                                                "resource_api_version": "V3",
                                            },
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
        },
    }


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_envoy_routes_through_control_plane(
    tmp_path: Path, envoy_bin: Path, backends: dict[str, int], api_type: str
) -> None:
    """SotW (``GRPC``) and Delta (``DELTA_GRPC``) ADS, each checked by Envoy itself."""
    config = tmp_path / "mesh"
    config.mkdir()
    (config / "web.yaml").write_text(mesh_yaml(backends))
    with ControlPlane([config], xds_address="127.0.0.1:0", admin_port=0) as cp:
        xds_port = int(cp.address.rsplit(":", 1)[1])
        with run_envoy(envoy_bin, json.dumps(envoy_config(xds_port, api_type)), tmp_path) as envoy:
            _run_checks(
                envoy=envoy,
                cp=cp,
                config_file=config / "web.yaml",
                backends=backends,
                delta=api_type == "DELTA_GRPC",
            )


def _split(port: int, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(n):
            conn.request("GET", "/", headers={"Host": f"{HOST}:{PORT}"})
            resp = conn.getresponse()
            body = resp.read().decode()
            seen[body if resp.status == 200 else f"status {resp.status}"] += 1
    finally:
        conn.close()
    return seen


def _run_checks(
    *,
    envoy: EnvoyProcess,
    cp: ControlPlane,
    config_file: Path,
    backends: dict[str, int],
    delta: bool,
) -> None:
    admin = f"http://{envoy.admin[0]}:{envoy.admin[1]}"
    port = envoy.port

    def routed() -> bool:
        assert envoy.proc.poll() is None, envoy.log.read_text()[-3000:]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": f"{HOST}:{PORT}"})
            return conn.getresponse().status == 200
        finally:
            conn.close()

    wait_until(routed, 30, "envoy to route with the control plane's CDS, EDS and RDS")
    seen = _split(port, REQUESTS)
    assert sum(seen.values()) == REQUESTS
    share = 100.0 * seen["v1"] / REQUESTS
    assert abs(share - 90) <= 5, seen
    stats = _get(admin + "/stats?filter=update_(rejected|success)")
    values = dict(line.split(": ", 1) for line in stats.strip().splitlines() if ": " in line)
    rejected = {k: v for k, v in values.items() if k.endswith("update_rejected")}
    assert rejected and all(v == "0" for v in rejected.values()), rejected
    assert int(values["cluster_manager.cds.update_success"]) >= 1
    assert any(
        k.startswith("http.outbound.rds.") and int(v) >= 1
        for k, v in values.items()
        if k.endswith("update_success")
    ), values
    assert cp.call(lambda: cp.hub.metrics.total("pilot_total_xds_rejects")) == 0
    (stream,) = [s for s in syncz(cp.admin_url) if s["proxy"].startswith("sidecar~")]
    assert stream["delta"] is delta
    assert stream["types"]["CDS"]["wildcard"] and stream["types"]["CDS"]["acked"]

    # A pushed change (the weights flip) reaches Envoy, again with nothing rejected.
    config_file.write_text(mesh_yaml(backends, v1_weight=10))
    wait_until(lambda: _split(port, 50)["v2"] >= 35, 10, "the new split to be pushed")
    seen = _split(port, REQUESTS)
    assert abs(100.0 * seen["v1"] / REQUESTS - 10) <= 5, seen
    stats = _get(admin + "/stats?filter=update_rejected")
    assert all(line.endswith(": 0") for line in stats.strip().splitlines()), stats
    assert cp.call(lambda: cp.hub.metrics.total("pilot_total_xds_rejects")) == 0

    # Clusters change while their endpoints do not: Envoy re-creates them and waits for EDS;
    # the control plane must answer so they finish warming and traffic keeps flowing.
    def stat(name: str) -> int:
        for line in _get(admin + f"/stats?filter=^{name}$").splitlines():
            if line.startswith(name + ": "):
                return int(line.split(": ", 1)[1])
        raise AssertionError(f"no stat {name}")

    cds_before = stat("cluster_manager.cds.update_success")
    config_file.write_text(mesh_yaml(backends, v1_weight=10, max_pending=77))
    wait_until(lambda: stat("cluster_manager.cds.update_success") > cds_before, 10, "the CDS push")
    wait_until(lambda: stat("cluster_manager.warming_clusters") == 0, 10, "clusters to warm")
    seen = _split(port, 100)
    assert seen["v1"] + seen["v2"] == 100, seen
    assert f"outbound|{PORT}|v1|{HOST}::default_priority::max_pending_requests::77" in _get(
        admin + "/clusters"
    )
    stats = _get(admin + "/stats?filter=update_rejected")
    assert all(line.endswith(": 0") for line in stats.strip().splitlines()), stats


BOOKINFO_FILES = (
    "platform/kube/bookinfo.yaml",
    "networking/destination-rule-all.yaml",
    "networking/virtual-service-reviews-80-20.yaml",
)
REVIEWS = "reviews.default.svc.cluster.local"


def test_envoy_bookinfo_reviews_split_with_auto_registered_workloads(
    tmp_path: Path, envoy_bin: Path, backends: dict[str, int], bookinfo_dir: Path
) -> None:
    """Istio's own Bookinfo YAML, unchanged; the reviews workloads register themselves."""
    from tests.integration.controlplane._helpers import LDS, RawAds, make_node, wait_for

    config = tmp_path / "mesh"
    config.mkdir()
    for name in BOOKINFO_FILES:
        (config / name.replace("/", "-")).write_text((bookinfo_dir / name).read_text())
    with ControlPlane([config], xds_address="127.0.0.1:0", admin_port=0) as cp:
        workloads = []
        try:
            for version, port in backends.items():
                wl = RawAds(cp.address)
                workloads.append(wl)
                wl.send(
                    node=make_node(
                        f"sidecar~127.0.0.1~reviews-{version}-0.default~default.svc.cluster.local",
                        GENERATOR="grpc",
                        NAMESPACE="default",
                        SERVICE_ACCOUNT="bookinfo-reviews",
                        LABELS={"app": "reviews", "version": version},
                        INSTANCE_IPS="127.0.0.1",
                        POD_PORTS=json.dumps([{"name": "http", "containerPort": port}]),
                    ),
                    type_url=LDS,
                    resource_names=[f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{port}"],
                )
                wl.recv()
            wait_for(lambda: cp.call(lambda: len(cp.hub.registry.entries())) == 2)
            _bookinfo_through_envoy(tmp_path, envoy_bin, cp)
        finally:
            for wl in workloads:
                wl.close()


def _bookinfo_through_envoy(tmp_path: Path, envoy_bin: Path, cp: ControlPlane) -> None:
    xds_port = int(cp.address.rsplit(":", 1)[1])
    cfg = envoy_config(xds_port, "GRPC")
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]  # type: ignore[index]
    hcm["typed_config"]["rds"]["route_config_name"] = f"outbound|9080||{REVIEWS}"
    workdir = tmp_path / "envoy-bookinfo"
    workdir.mkdir()
    with run_envoy(envoy_bin, json.dumps(cfg), workdir) as envoy:
        admin = f"http://{envoy.admin[0]}:{envoy.admin[1]}"
        port = envoy.port

        def routed() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/reviews/0", headers={"Host": "reviews:9080"})
                return conn.getresponse().status == 200
            finally:
                conn.close()

        wait_until(routed, 30, "envoy to route reviews")
        seen: Counter[str] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(REQUESTS):
                conn.request("GET", "/reviews/0", headers={"Host": "reviews:9080"})
                resp = conn.getresponse()
                body = resp.read().decode()
                seen[body if resp.status == 200 else f"status {resp.status}"] += 1
        finally:
            conn.close()
        assert abs(100.0 * seen["v1"] / REQUESTS - 80) <= 5, seen
        stats = _get(admin + "/stats?filter=update_rejected")
        lines = stats.strip().splitlines()
        assert lines and all(line.endswith(": 0") for line in lines), stats
        # Every Bookinfo service's clusters reached Envoy (wildcard CDS).
        clusters = _get(admin + "/clusters")
        for svc in ("productpage", "details", "ratings", "reviews"):
            assert f"outbound|9080||{svc}.default.svc.cluster.local::" in clusters
        assert cp.call(lambda: cp.hub.metrics.total("pilot_total_xds_rejects")) == 0
