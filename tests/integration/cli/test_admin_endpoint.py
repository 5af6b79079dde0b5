"""The workload admin endpoint (``pymesh.admin``) over real HTTP, and its CSDS gRPC port."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

import pymesh.admin
import pymesh.httpx
from pymesh.admin import AdminServer
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.errors import ConfigError
from pymesh.xds.client import XdsClient
from pymesh.xds.resource_types import ResourceType
from tests.integration.cli.conftest import HOST, PORT, MeshWorld, wait_for

V1 = f"outbound|{PORT}|v1|{HOST}"
V2 = f"outbound|{PORT}|v2|{HOST}"


def get(address: str, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def get_json(address: str, path: str) -> Any:
    code, ctype, body = get(address, path)
    assert code == 200 and ctype == "application/json"
    return json.loads(body)


def test_ready_stats_and_config_dump(world: MeshWorld) -> None:
    address = world.reviews.admin.address
    assert address.startswith("127.0.0.1:")  # loopback by default
    assert get(address, "/ready") == (200, "text/plain", "LIVE\n")
    dump = get_json(address, "/config_dump")
    assert dump["node"]["id"].startswith("sidecar~127.0.0.1~reviews-v1.default~")
    assert dump["connections"][0]["connected"] is True
    assert [(r["type"], r["name"], r["status"]) for r in dump["resources"]] == [
        ("CDS", V1, "ACKED"),
        ("CDS", V2, "ACKED"),
        ("EDS", V1, "ACKED"),
        ("EDS", V2, "ACKED"),
        ("LDS", f"{HOST}:{PORT}", "ACKED"),
        ("LDS", f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{world.grpc_port}", "ACKED"),
        ("RDS", f"outbound|{PORT}||{HOST}", "ACKED"),
    ]
    assert all(r["version"] and r["config"] for r in dump["resources"])
    code, ctype, text = get(address, "/stats")
    assert code == 200 and ctype == "text/plain"
    stats = dict(line.split(": ") for line in text.splitlines())
    assert stats["xds.connected"] == "1"
    assert stats["xds.cds.resources.acked"] == "2"
    assert stats["xds.lds.resources.acked"] == "2"
    v2 = "cluster.outbound_8080_v2_echo.default.svc.cluster.local."
    assert stats[v2 + "outlier_detection.ejections_active"] == "1"
    assert stats[v2 + "outlier_detection.ejections_enforced_total"] == "1"
    assert stats[v2 + "membership_total"] == "1"
    assert stats[v2 + "membership_usable"] == "0"
    code, _, body = get(address, "/nope")
    assert code == 404 and "/config_dump" in json.loads(body)["endpoints"]


def test_certs(world: MeshWorld) -> None:
    (default,) = get_json(world.reviews.admin.address, "/certs")
    assert default["name"] == "default" and default["ready"] and default["valid"]
    assert default["identity"] == "spiffe://cluster.local/ns/default/sa/reviews"
    assert default["cert_chain"][0]["serial_number"] == world.reviews_serial
    assert default["cert_chain"][0]["uri_sans"] == [default["identity"]]
    assert default["not_after"] > default["not_before"]
    assert len(default["trust_bundle"]) == 1
    assert default["trust_bundle"][0]["subject"].startswith("CN=cluster.local CA")
    assert get_json(world.productpage.admin.address, "/certs") == []


def test_clusters_show_active_requests_and_breaker_counts(world: MeshWorld) -> None:
    """A request in flight shows on its endpoint and in the circuit breaker's counters."""
    address = world.productpage.admin.address
    with pymesh.httpx.Client(xds_client=world.productpage.client, timeout=10) as http:
        done = threading.Event()
        result: list[int] = []

        def slow() -> None:
            try:
                result.append(http.get(f"http://{HOST}:{PORT}/sleep/1500").status_code)
            finally:
                done.set()

        thread = threading.Thread(target=slow)
        thread.start()
        try:

            def v1_view() -> dict[str, Any]:
                clusters = get_json(address, "/clusters")
                return next(c for c in clusters if c["name"] == V1)  # type: ignore[no-any-return]

            wait_for(lambda: v1_view()["hosts"][0]["active_requests"] == 1 or done.is_set())
            view = v1_view()
            assert not done.is_set(), "the slow request ended before it was seen"
            assert view["hosts"][0]["active_requests"] == 1
            assert view["circuit_breakers"]["requests"] == 1
            assert view["circuit_breakers"]["max_requests"] == 2**32 - 1
            assert view["hosts"][0]["health"] == "HEALTHY"
        finally:
            thread.join(10)
    assert result == [200]
    view = next(c for c in get_json(address, "/clusters") if c["name"] == V1)
    assert view["hosts"][0]["active_requests"] == 0
    assert view["circuit_breakers"]["requests"] == 0


class _Nothing:
    def on_resource_changed(self, rtype: ResourceType, name: str, value: object) -> None: ...
    def on_resource_does_not_exist(self, rtype: ResourceType, name: str) -> None: ...
    def on_ambient_error(self, rtype: ResourceType, name: str, error: str) -> None: ...


def test_not_ready_without_config() -> None:
    """A workload whose control plane is unreachable is not ready; stop frees the port."""
    data = generate_bootstrap(xds_address="127.0.0.1:1", namespace="default")
    with XdsClient(parse_bootstrap(json.dumps(data), source="t")) as client:
        client.watch(ResourceType.LISTENER, "a.default.svc.cluster.local:80", _Nothing())
        with AdminServer(client, port=0) as admin:
            code, _, body = get(admin.address, "/ready")
            assert code == 503
            assert "waiting for 1 resource(s): LDS a.default.svc.cluster.local:80" in body
            assert get_json(admin.address, "/clusters") == []
            port = admin.port
        admin.stop()  # idempotent
        with AdminServer(client, port=port) as again:  # the port was released
            assert get(again.address, "/ready")[0] == 503


def test_csds_port(world: MeshWorld) -> None:
    from envoy.service.status.v3 import csds_pb2

    client = world.productpage.client
    with AdminServer(client, port=0, csds_port=0) as admin:
        assert admin.csds_port
        with grpc.insecure_channel(f"127.0.0.1:{admin.csds_port}") as channel:
            fetch = channel.unary_unary(
                "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus",
                request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
                response_deserializer=csds_pb2.ClientStatusResponse.FromString,
            )
            resp = fetch(csds_pb2.ClientStatusRequest(), timeout=10)
    (config,) = resp.config
    assert config.node.id == client.bootstrap.node.id
    names = {c.name for c in config.generic_xds_configs}
    assert {V1, V2, f"{HOST}:{PORT}"} <= names


def test_process_admin_from_env(world: MeshWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYMESH_ADMIN_PORT", raising=False)
    assert pymesh.admin.start_from_env() is None
    monkeypatch.setenv("PYMESH_ADMIN_PORT", "http")
    with pytest.raises(ConfigError, match="PYMESH_ADMIN_PORT='http' is not a port number"):
        pymesh.admin.start_from_env()
    bootstrap = generate_bootstrap(xds_address=world.cp.address, namespace="default")
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", json.dumps(bootstrap))
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP", raising=False)
    monkeypatch.setenv("PYMESH_ADMIN_PORT", "0")
    before = XdsClient._shared
    try:
        server = pymesh.admin.start_from_env()
        assert server is not None and pymesh.admin.current() is server
        assert pymesh.admin.start(port=0) is server  # once per process
        assert get(server.address, "/ready")[0] == 200  # nothing subscribed yet
        assert get_json(server.address, "/config_dump")["resources"] == []
    finally:
        pymesh.admin.stop()
        if XdsClient._shared is not None and XdsClient._shared is not before:
            XdsClient._shared.close()
    assert pymesh.admin.current() is None


class _BlockingSource:
    """An xDS client stand-in whose status read waits for ``release`` (a stuck read)."""

    def __init__(self, bootstrap: Any) -> None:
        self.bootstrap = bootstrap
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def resource_statuses(self) -> list[Any]:
        self.entered.release()
        self.release.wait(10)
        return []

    def connection_states(self) -> list[Any]:
        return []


def test_concurrent_requests_are_bounded() -> None:
    from pymesh.admin._server import MAX_CONCURRENT

    data = generate_bootstrap(xds_address="127.0.0.1:1", namespace="default")
    source = _BlockingSource(parse_bootstrap(json.dumps(data), source="t"))
    with AdminServer(source, port=0) as admin:  # type: ignore[arg-type]
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda: results.append(get(admin.address, "/ready")[0]))
            for _ in range(MAX_CONCURRENT)
        ]
        for t in threads:
            t.start()
        for _ in range(MAX_CONCURRENT):
            assert source.entered.acquire(timeout=10)
        code, _, body = get(admin.address, "/ready")  # every slot is taken: refused at once
        assert code == 503 and "busy" in body
        source.release.set()
        for t in threads:
            t.join(10)
        assert results == [200] * MAX_CONCURRENT
        assert get(admin.address, "/ready")[0] == 200


def test_nacked_update_shows_in_config_dump_and_keeps_last_good(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A rejected update: NACKED with the error and failed version in /config_dump and
    /stats, the last good cluster still served (and still ready)."""
    from envoy.config.cluster.v3 import cluster_pb2

    from pymesh.cli.main import main
    from tests.xdsserver import CDS, WatchRecorder, XdsTestServer

    good = cluster_pb2.Cluster(name="c1", type=cluster_pb2.Cluster.STATIC)
    bad = cluster_pb2.Cluster(
        name="c1", type=cluster_pb2.Cluster.STATIC, lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED
    )
    with XdsTestServer() as server:
        server.set_resources(CDS, {"c1": good})
        with XdsClient(server.bootstrap()) as client, AdminServer(client, port=0) as admin:
            rec = WatchRecorder()
            client.watch(ResourceType.CLUSTER, "c1", rec)
            rec.wait_for(lambda e: e[0] == "changed")
            server.set_resources(CDS, {"c1": bad})
            server.wait_for_nack(CDS)
            wait_for(
                lambda: (
                    get_json(admin.address, "/config_dump")["resources"][0]["status"] == "NACKED"
                )
            )
            (res,) = get_json(admin.address, "/config_dump")["resources"]
            assert res["version"] == "1" and res["failed_version"] == "2"
            assert "lb_policy" in res["error"]
            assert "lb_policy" not in res["config"]  # the last good one
            assert get(admin.address, "/ready")[0] == 200
            assert "xds.cds.resources.nacked: 1" in get(admin.address, "/stats")[2]
            assert main(["proxy-config", "clusters", admin.address]) == 0
            rows = capsys.readouterr().out.splitlines()[1:]
            assert [r.split() for r in rows] == [["c1", "-", "-", "-", "STATIC", "-"]]
