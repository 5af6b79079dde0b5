"""The ADS server on loopback, driven by a raw gRPC ADS client (config side stubbed)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from pymesh.controlplane import ControlPlane
from pymesh.controlplane.server import HEALTH_TYPE_URL, LoadResult
from tests.integration.controlplane._helpers import (
    CDS,
    EDS,
    LDS,
    RawAds,
    TinyBackend,
    http_get,
    http_post,
    make_node,
    syncz,
    wait_for,
)

ENVOY_NODE = make_node("envoy-1")
GRPC_NODE = make_node("grpc-1", GENERATOR="grpc", NAMESPACE="default")


def write_config(path: Path, services: dict[str, list[int]], **extra: object) -> None:
    doc = {"services": services, **extra}
    path.write_text(json.dumps(doc))


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write_config(
        tmp_path / "mesh.yaml",
        {"a.default.svc.cluster.local": [1001], "b.default.svc.cluster.local": [1002]},
        groups=[{"name": "ratings", "labels": {"app": "ratings"}, "ports": {"http": 9080}}],
    )
    return tmp_path


@pytest.fixture
def cp(config_dir: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(
        [config_dir],
        xds_address="127.0.0.1:0",
        admin_port=0,
        debounce=0.05,
        max_debounce=0.5,
        poll_interval=0.05,
        registration_grace=0.6,
        backend=TinyBackend(),
    )
    with plane:
        yield plane


@pytest.fixture
def clients() -> Iterator[list[RawAds]]:
    made: list[RawAds] = []
    yield made
    for c in made:
        c.close()


def connect(cp: ControlPlane, clients: list[RawAds], *, delta: bool = False) -> RawAds:
    c = RawAds(cp.address, delta=delta)
    clients.append(c)
    return c


def names(resp: object, delta: bool = False) -> set[str]:
    if delta:
        return {r.name for r in resp.resources}  # type: ignore[attr-defined]
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.listener.v3 import listener_pb2

    out = set()
    for a in resp.resources:  # type: ignore[attr-defined]
        cls = {CDS: cluster_pb2.Cluster, LDS: listener_pb2.Listener}.get(
            a.type_url, endpoint_pb2.ClusterLoadAssignment
        )
        msg = cls()
        a.Unpack(msg)
        out.add(getattr(msg, "name", "") or msg.cluster_name)
    return out


def test_sotw_wildcard_cds_ack_visible_in_syncz(cp: ControlPlane, clients: list[RawAds]) -> None:
    c = connect(cp, clients)
    c.send(node=ENVOY_NODE, type_url=CDS)
    resp = c.recv()
    assert resp.type_url == CDS and resp.nonce
    assert names(resp) == {
        "outbound|80||a.default.svc.cluster.local",
        "outbound|80||b.default.svc.cluster.local",
    }
    c.ack(resp)
    state = wait_for(
        lambda: [s for s in syncz(cp.admin_url) if s["types"].get("CDS", {}).get("acked")]
    )
    cds = state[0]["types"]["CDS"]
    assert state[0]["proxy"] == "envoy-1"
    assert cds["wildcard"] and cds["acked_version"] == resp.version_info
    assert cds["nonce"] == resp.nonce and cds["last_nack"] is None
    assert c.no_response(0.2)  # an ACK is not answered


def test_sotw_named_subscriptions_for_proxyless(cp: ControlPlane, clients: list[RawAds]) -> None:
    c = connect(cp, clients)
    c.send(node=GRPC_NODE, type_url=LDS, resource_names=["a.default.svc.cluster.local:80"])
    resp = c.recv()
    assert names(resp) == {"a.default.svc.cluster.local:80"}
    c.send(type_url=EDS, resource_names=["outbound|80||b.default.svc.cluster.local"])
    resp = c.recv()
    assert resp.type_url == EDS
    assert names(resp) == {"outbound|80||b.default.svc.cluster.local"}
    c.ack(
        resp,
        resource_names=[
            "outbound|80||b.default.svc.cluster.local",
            "outbound|80||a.default.svc.cluster.local",
        ],
    )
    resp = c.recv()  # the subscription grew: answered
    assert len(resp.resources) == 2


def test_nack_logged_kept_in_status_and_metrics(
    cp: ControlPlane, clients: list[RawAds], caplog: pytest.LogCaptureFixture
) -> None:
    c = connect(cp, clients)
    c.send(node=ENVOY_NODE, type_url=CDS)
    resp = c.recv()
    c.ack(resp, error="cluster outbound|80||a: unknown lb policy")
    state = wait_for(lambda: [s for s in syncz(cp.admin_url) if s["types"]["CDS"]["last_nack"]])
    nack = state[0]["types"]["CDS"]["last_nack"]
    assert nack == {
        "version": resp.version_info,
        "nonce": resp.nonce,
        "message": "cluster outbound|80||a: unknown lb policy",
    }
    assert not state[0]["types"]["CDS"]["acked"]
    code, text = http_get(cp.admin_url + "/metrics")
    assert code == 200 and 'pilot_total_xds_rejects{type="CDS"} 1' in text
    assert any("unknown lb policy" in r.getMessage() for r in caplog.records)


def test_push_on_file_change_debounced(clients: list[RawAds], config_dir: Path) -> None:
    # A wider quiet window than the other tests so a loaded machine cannot split the burst.
    with ControlPlane(
        [config_dir],
        xds_address="127.0.0.1:0",
        admin_port=None,
        debounce=0.3,
        max_debounce=1.0,
        poll_interval=0.05,
        backend=TinyBackend(),
    ) as cp:
        _debounced_push(cp, clients, config_dir)


def _debounced_push(cp: ControlPlane, clients: list[RawAds], config_dir: Path) -> None:
    c = connect(cp, clients)
    c.send(node=ENVOY_NODE, type_url=CDS)
    first = c.recv()
    c.ack(first)
    time.sleep(0.1)
    start = time.monotonic()
    # A burst of writes within the debounce window: one push.
    for i in range(3):
        write_config(config_dir / "mesh.yaml", {f"s{i}.default.svc.cluster.local": [1]})
        time.sleep(0.01)
    write_config(config_dir / "mesh.yaml", {"c.default.svc.cluster.local": [1003]})
    resp = c.recv(timeout=3)
    elapsed = time.monotonic() - start
    assert names(resp) == {"outbound|80||c.default.svc.cluster.local"}
    assert int(resp.version_info) > int(first.version_info)
    assert elapsed < 1.0
    c.ack(resp)
    assert c.no_response(0.4)  # the burst gave exactly one push


def test_bad_file_keeps_last_good(
    cp: ControlPlane, clients: list[RawAds], config_dir: Path
) -> None:
    c = connect(cp, clients)
    c.send(node=ENVOY_NODE, type_url=CDS)
    first = c.recv()
    c.ack(first)
    (config_dir / "broken.yaml").write_text("error: [unclosed")

    def rejected() -> bool:
        code, body = http_get(cp.admin_url + "/debug/configz")
        return code == 200 and bool(json.loads(body)["last_reload_errors"])

    wait_for(rejected)
    assert c.no_response(0.3)  # nothing pushed: the last good config keeps serving
    assert http_get(cp.admin_url + "/ready")[0] == 200
    configz = json.loads(http_get(cp.admin_url + "/debug/configz")[1])
    assert "broken.yaml" in configz["last_reload_errors"][0]
    assert configz["version"] == int(first.version_info)
    _, metrics = http_get(cp.admin_url + "/metrics")
    assert "pilot_total_config_errors 1" in metrics
    # A new client still gets the last good config.
    d = connect(cp, clients)
    d.send(node=ENVOY_NODE, type_url=CDS)
    assert len(d.recv().resources) == 2
    # Fixing the file applies the change.
    (config_dir / "broken.yaml").write_text(json.dumps({"services": {"z.ns.svc": [9]}}))
    resp = c.recv(timeout=3)
    assert "outbound|80||z.ns.svc" in names(resp)


def test_delta_stream(cp: ControlPlane, clients: list[RawAds], config_dir: Path) -> None:
    c = connect(cp, clients, delta=True)
    c.send(node=ENVOY_NODE, type_url=CDS)
    resp = c.recv()
    assert names(resp, delta=True) == {
        "outbound|80||a.default.svc.cluster.local",
        "outbound|80||b.default.svc.cluster.local",
    }
    assert all(r.version for r in resp.resources)
    c.ack(resp)
    write_config(
        config_dir / "mesh.yaml",
        {"a.default.svc.cluster.local": [1001], "c.default.svc.cluster.local": [1003]},
    )
    resp = c.recv(timeout=3)
    assert names(resp, delta=True) == {"outbound|80||c.default.svc.cluster.local"}
    assert list(resp.removed_resources) == ["outbound|80||b.default.svc.cluster.local"]
    c.ack(resp)
    state = wait_for(lambda: [s for s in syncz(cp.admin_url) if s["types"]["CDS"]["acked"]])
    assert state[0]["delta"] is True
    # Named delta subscription for EDS.
    c.send(type_url=EDS, resource_names_subscribe=["outbound|80||a.default.svc.cluster.local"])
    resp = c.recv()
    assert names(resp, delta=True) == {"outbound|80||a.default.svc.cluster.local"}


def test_misbehaving_clients_do_not_affect_others(
    cp: ControlPlane, clients: list[RawAds], config_dir: Path
) -> None:
    good = connect(cp, clients)
    good.send(node=ENVOY_NODE, type_url=CDS)
    good.ack(good.recv())

    # 1. Garbage bytes on the ADS method.
    channel = grpc.insecure_channel(cp.address)
    garbage = channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError):
        list(garbage(iter([b"\xff\xfe\x00garbage" * 10]), timeout=5))
    channel.close()

    # 2. Unknown type URL: ignored, stream stays usable.
    odd = connect(cp, clients)
    odd.send(node=make_node("odd"), type_url="type.googleapis.com/not.a.Type")
    assert odd.no_response(0.2)
    odd.send(type_url=CDS)
    assert odd.recv().type_url == CDS

    # 3. No node on the first request: that stream is refused.
    nodeless = connect(cp, clients)
    nodeless.send(type_url=CDS)
    err = nodeless.ended()
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT

    # 4. The generator fails for one node: only its stream ends.
    boom = connect(cp, clients)
    boom.send(node=make_node("boom", EXPLODE=True), type_url=CDS)
    err = boom.ended()
    assert err is not None and err.code() == grpc.StatusCode.INTERNAL

    # 5. A client that vanishes mid-stream.
    gone = connect(cp, clients)
    gone.send(node=make_node("gone"), type_url=CDS)
    gone.recv()
    gone.close()
    clients.remove(gone)

    # The good client still gets pushes.
    write_config(config_dir / "mesh.yaml", {"d.default.svc.cluster.local": [1]})
    resp = good.recv(timeout=3)
    assert names(resp) == {"outbound|80||d.default.svc.cluster.local"}
    ids = wait_for(lambda: {s["proxy"] for s in syncz(cp.admin_url)} == {"envoy-1", "odd"})
    assert ids
    _, metrics = http_get(cp.admin_url + "/metrics")
    assert "pilot_xds_requests_unknown_type 1" in metrics
    assert "pilot_xds 2" in metrics


def eds_hosts(resp: object) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in resp.resources:  # type: ignore[attr-defined]
        cla = endpoint_pb2.ClusterLoadAssignment()
        a.Unpack(cla)
        for loc in cla.endpoints:
            for ep in loc.lb_endpoints:
                sa = ep.endpoint.address.socket_address
                out[f"{sa.address}:{sa.port_value}"] = ep.health_status
    return out


def test_auto_registration_grace_and_health(cp: ControlPlane, clients: list[RawAds]) -> None:
    watcher = connect(cp, clients)
    watcher.send(node=ENVOY_NODE, type_url=EDS, resource_names=["outbound|80||ratings"])
    first = watcher.recv()
    watcher.ack(first)
    # ratings is not a service of the tiny config: add one so EDS has something to show.
    assert eds_hosts(first) == {}

    wl_node = make_node(
        "sidecar~10.1.2.3~ratings-1.default~default.svc.cluster.local",
        GENERATOR="grpc",
        NAMESPACE="default",
        LABELS={"app": "ratings", "version": "v1"},
        INSTANCE_IPS="10.1.2.3",
        POD_PORTS='[{"name":"http","containerPort":9081}]',
    )
    wl = RawAds(cp.address)
    wl.send(node=wl_node, type_url=LDS, resource_names=["x:80"])
    wl.recv()

    def registered() -> list[dict[str, object]]:
        return json.loads(http_get(cp.admin_url + "/debug/configz")[1])["workloads"]

    (entry,) = wait_for(registered)
    assert entry["name"] == "ratings-10.1.2.3-9081" and entry["ports"] == {"http": 9081}
    assert entry["connected"] and entry["health"] == "HEALTHY"

    # Health via Istio's in-band health report (error_detail = unhealthy).
    wl.send(type_url=HEALTH_TYPE_URL, error="readiness probe failed")
    wait_for(lambda: registered()[0]["health"] == "UNHEALTHY")
    # And via the admin call.
    code, body = http_post(
        cp.admin_url + "/debug/health?proxy=" + wl_node.id.replace("~", "%7E") + "&status=draining"
    )
    assert code == 200, body
    wait_for(lambda: registered()[0]["health"] == "DRAINING")
    assert http_post(cp.admin_url + "/debug/health?proxy=nobody&status=DRAINING")[0] == 404
    assert http_post(cp.admin_url + "/debug/health?proxy=x&status=SICK")[0] == 400

    # Stream ends: the entry stays for the grace period (0.6 s), then goes.
    wl.close()
    t0 = time.monotonic()
    wait_for(lambda: not registered()[0]["connected"])
    assert registered(), "removed before the grace period"
    wait_for(lambda: registered() == [], timeout=3)
    assert time.monotonic() - t0 >= 0.5


def test_admin_endpoints(cp: ControlPlane) -> None:
    code, body = http_get(cp.admin_url + "/ready")
    assert (code, body) == (200, "ready\n")
    code, body = http_get(cp.admin_url + "/metrics")
    assert code == 200
    for metric in (
        "pilot_xds ",
        "pilot_xds_pushes",
        "pilot_total_xds_rejects",
        "pilot_total_config_errors",
        "pymesh_ready 1",
    ):
        assert metric in body
    code, body = http_get(cp.admin_url + "/debug/configz")
    configz = json.loads(body)
    assert code == 200 and configz["ready"] and configz["issues"] == []
    assert "a.default.svc.cluster.local" in json.dumps(configz["config"])
    assert http_get(cp.admin_url + "/nope")[0] == 404


def test_not_ready_without_good_config(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("error: 1")
    with ControlPlane(
        [tmp_path], xds_address="127.0.0.1:0", admin_port=0, backend=TinyBackend()
    ) as plane:
        code, _ = http_get(plane.admin_url + "/ready")
        assert code == 503
        configz = json.loads(http_get(plane.admin_url + "/debug/configz")[1])
        assert configz["last_reload_errors"]


def test_xds_port_in_use_is_a_clear_error(cp: ControlPlane, tmp_path: Path) -> None:
    from pymesh.errors import PymeshError

    other = ControlPlane([tmp_path], xds_address=cp.address, admin_port=None, backend=TinyBackend())
    with pytest.raises(PymeshError, match="cannot listen for xDS"):
        other.start()
    other.stop()


def test_group_added_later_registers_connected_node(
    cp: ControlPlane, clients: list[RawAds], config_dir: Path
) -> None:
    c = connect(cp, clients)
    c.send(
        node=make_node(
            "sidecar~10.9.9.9~late-1.default~default.svc.cluster.local",
            NAMESPACE="default",
            LABELS={"app": "late"},
            INSTANCE_IPS="10.9.9.9",
        ),
        type_url=CDS,
    )
    c.recv()

    def registered() -> list[str]:
        body = http_get(cp.admin_url + "/debug/configz")[1]
        return [w["name"] for w in json.loads(body)["workloads"]]

    time.sleep(0.2)
    assert registered() == []
    write_config(
        config_dir / "mesh.yaml",
        {"a.default.svc.cluster.local": [1001]},
        groups=[{"name": "late", "labels": {"app": "late"}, "ports": {"http": 80}}],
    )
    assert wait_for(lambda: registered() == ["late-10.9.9.9"], timeout=3)
    (status,) = [s for s in syncz(cp.admin_url) if s["proxy"].startswith("sidecar~10.9.9.9")]
    assert status["registered_as"] == "default/late-10.9.9.9"


def test_many_concurrent_streams_all_get_the_push(
    cp: ControlPlane, clients: list[RawAds], config_dir: Path
) -> None:
    streams = []
    for i in range(40):
        c = connect(cp, clients, delta=bool(i % 2))
        c.send(node=make_node(f"n{i}"), type_url=CDS)
        streams.append(c)
    for c in streams:
        c.ack(c.recv())
    write_config(config_dir / "mesh.yaml", {"only.default.svc.cluster.local": [1]})
    for c in streams:
        resp = c.recv(timeout=5)
        assert names(resp, delta=c.delta) == {"outbound|80||only.default.svc.cluster.local"}
        c.ack(resp)

    def all_acked() -> bool:
        state = syncz(cp.admin_url)
        return len(state) == 40 and all(s["types"]["CDS"]["acked"] for s in state)

    assert wait_for(all_acked)


def test_stream_of_a_client_not_reading_is_ended(
    cp: ControlPlane, clients: list[RawAds], config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pymesh.controlplane.server import _hub

    c = connect(cp, clients)
    c.send(node=make_node("slow"), type_url=CDS)
    c.ack(c.recv())
    wait_for(lambda: syncz(cp.admin_url)[0]["types"]["CDS"]["acked"])
    # Pretend its queue is always over the limit: the next push ends the stream.
    monkeypatch.setattr(_hub, "MAX_PENDING_RESPONSES", -1)
    write_config(config_dir / "mesh.yaml", {"x.default.svc.cluster.local": [1]})
    err = c.ended()
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert wait_for(lambda: syncz(cp.admin_url) == [])


class RaisingBackend(TinyBackend):
    def load(self, paths: Sequence[Path]) -> LoadResult:
        if any((p / "raise").exists() for p in paths):
            raise PermissionError("cannot read config")
        return super().load(paths)


def test_loader_crash_is_a_rejected_config(clients: list[RawAds], config_dir: Path) -> None:
    with ControlPlane(
        [config_dir],
        xds_address="127.0.0.1:0",
        admin_port=0,
        debounce=0.05,
        poll_interval=0.05,
        backend=RaisingBackend(),
    ) as cp:
        c = connect(cp, clients)
        c.send(node=ENVOY_NODE, type_url=CDS)
        c.ack(c.recv())
        (config_dir / "raise").write_text("")
        (config_dir / "mesh.yaml").write_text(json.dumps({"services": {"new": [1]}}))

        def errors() -> list[str]:
            out: list[str] = json.loads(http_get(cp.admin_url + "/debug/configz")[1])[
                "last_reload_errors"
            ]
            return out

        assert "cannot read config" in wait_for(errors)[0]
        assert c.no_response(0.3)
        (config_dir / "raise").unlink()
        (config_dir / "mesh.yaml").write_text(json.dumps({"services": {"newer": [1]}}))
        assert names(c.recv(timeout=3)) == {"outbound|80||newer"}
