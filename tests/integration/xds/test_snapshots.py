"""Target and server snapshots through the real XdsClient and a real ADS server on loopback.

The resources are real Envoy protos decoded by the real decoders; the control plane is
``tests/xdsserver.py``. Every published item is recorded, so "no tears" is checked on the
whole history, not on a final state.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from pymesh.bootstrap import parse_bootstrap
from pymesh.errors import XdsError
from pymesh.model.snapshot import (
    ClusterConfig,
    ClusterError,
    ErrorKind,
    ServerSnapshot,
    TargetError,
    TargetSnapshot,
)
from pymesh.xds.client import XdsClient
from pymesh.xds.watch import TargetHandle, watch_server, watch_target
from tests.xdsserver import CDS, EDS, LDS, RDS, XdsTestServer

TARGET = "reviews.default.svc.cluster.local:9080"
RDS_NAME = "outbound|9080||reviews.default.svc.cluster.local"
V1 = "outbound|9080|v1|reviews.default.svc.cluster.local"
V2 = "outbound|9080|v2|reviews.default.svc.cluster.local"
INBOUND = "xds.istio.io/grpc/lds/inbound/127.0.0.1:9080"


# -- Envoy protos as istiod shapes them for proxyless gRPC -------------------------------------


def _any(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _router() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
    )


def _hcm(rds: str) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(
            route_config_name=rds,
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource()
            ),
        ),
        http_filters=[_router()],
    )


def listener_proto(rds: str = RDS_NAME) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=TARGET, api_listener=api_listener_pb2.ApiListener(api_listener=_any(_hcm(rds)))
    )


def route_proto(*weighted: tuple[str, int], name: str = RDS_NAME) -> route_pb2.RouteConfiguration:
    action = route_components_pb2.RouteAction()
    if len(weighted) == 1:
        action.cluster = weighted[0][0]
    else:
        for cluster, weight in weighted:
            action.weighted_clusters.clusters.add(name=cluster, weight={"value": weight})
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="reviews.default.svc.cluster.local:9080",
                domains=["reviews.default.svc.cluster.local", TARGET],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"), route=action
                    )
                ],
            )
        ],
    )


def cluster_proto(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource()
            ),
            service_name=name,
        ),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )


def endpoints_proto(name: str, *ips: str) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region="us-central1", zone="us-central1-a"),
                load_balancing_weight={"value": 1},
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address=ip, port_value=9080
                                )
                            )
                        )
                    )
                    for ip in ips
                ],
            )
        ],
    )


def aggregate_proto(name: str, *children: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        cluster_type=cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.aggregate",
            typed_config=_any(aggregate_pb2.ClusterConfig(clusters=list(children))),
        ),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
    )


def logical_dns_proto(name: str, host: str) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.LOGICAL_DNS)
    cluster.load_assignment.CopyFrom(endpoints_proto(name, host))
    return cluster


def inbound_listener_proto(rds: str) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=INBOUND,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=9080)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                name="inbound|9080||",
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(_hcm(rds)),
                    )
                ],
            )
        ],
    )


# -- fixtures ---------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.items: list[object] = []
        self._cond = threading.Condition()

    def __call__(self, item: object) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[object], bool], timeout: float = 10.0) -> object:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"nothing matched within {timeout} s: {self.items!r}"
                self._cond.wait(remaining)

    @property
    def snapshots(self) -> list[TargetSnapshot]:
        with self._cond:
            return [i for i in self.items if isinstance(i, TargetSnapshot)]


@pytest.fixture
def server() -> Iterator[XdsTestServer]:
    with XdsTestServer() as srv:
        yield srv


def _client(server: XdsTestServer, *, delta: bool) -> XdsClient:
    data = server.bootstrap_dict()
    data["server_listener_resource_name_template"] = "xds.istio.io/grpc/lds/inbound/%s"
    return XdsClient(parse_bootstrap(json.dumps(data), source="test"), delta=delta)


@pytest.fixture(params=["sotw", "delta"])
def client(request: pytest.FixtureRequest, server: XdsTestServer) -> Iterator[XdsClient]:
    """The real client, once State-of-the-World and once Delta (the snapshots must agree)."""
    with _client(server, delta=request.param == "delta") as xds:
        yield xds


@pytest.fixture
def sotw_client(server: XdsTestServer) -> Iterator[XdsClient]:
    """For tests that inspect SotW request shapes (``resource_names``)."""
    with _client(server, delta=False) as xds:
        yield xds


def serve(server: XdsTestServer, *clusters: str) -> None:
    server.set_resources(LDS, {TARGET: listener_proto()})
    server.set_resources(RDS, {RDS_NAME: route_proto(*((c, 1) for c in clusters))})
    server.set_resources(CDS, {c: cluster_proto(c) for c in clusters})
    server.set_resources(
        EDS, {c: endpoints_proto(c, f"10.0.0.{i + 1}") for i, c in enumerate(clusters)}
    )


def open_target(client: XdsClient) -> tuple[TargetHandle, Recorder]:
    handle = watch_target(client, f"xds:///{TARGET}")
    rec = Recorder()
    handle.subscribe(rec)
    return handle, rec


def endpoints_of(snap: TargetSnapshot, cluster: str) -> list[str]:
    config = snap.clusters[cluster]
    assert isinstance(config, ClusterConfig) and config.endpoints is not None
    return [str(e.address) for e in config.endpoints.all_endpoints()]


def assert_no_tears(snapshots: list[TargetSnapshot]) -> None:
    for snap in snapshots:
        hcm = snap.listener.api_listener
        assert hcm is not None and snap.route_config.name == hcm.rds_name
        for route in snap.virtual_host.routes:
            for name in route.action.cluster_names():  # type: ignore[union-attr]
                assert name in snap.clusters


# -- tests ------------------------------------------------------------------------------------


def test_initial_snapshot_over_real_ads(server: XdsTestServer, client: XdsClient) -> None:
    serve(server, V1)
    handle, rec = open_target(client)
    try:
        snap = handle.wait_ready(10)
        assert snap.listener_name == TARGET and snap.route_config.name == RDS_NAME
        assert endpoints_of(snap, V1) == ["10.0.0.1:9080"]
        assert handle.current() is snap
        rec.wait_for(lambda i: i is snap)
    finally:
        handle.close()


def test_eds_update_publishes_new_snapshot_with_only_endpoints_changed(
    server: XdsTestServer, client: XdsClient
) -> None:
    serve(server, V1)
    handle, rec = open_target(client)
    try:
        first = handle.wait_ready(10)
        server.set_resources(EDS, {V1: endpoints_proto(V1, "10.0.0.1", "10.0.0.2")})
        second = rec.wait_for(lambda i: isinstance(i, TargetSnapshot) and i.version == 2)
        assert isinstance(second, TargetSnapshot)
        assert endpoints_of(second, V1) == ["10.0.0.1:9080", "10.0.0.2:9080"]
        assert second.listener is first.listener and second.route_config is first.route_config
        old, new = first.clusters[V1], second.clusters[V1]
        assert isinstance(old, ClusterConfig) and isinstance(new, ClusterConfig)
        assert new.cluster is old.cluster
    finally:
        handle.close()


def test_route_change_widens_and_narrows_real_subscriptions(
    server: XdsTestServer, sotw_client: XdsClient
) -> None:
    client = sotw_client
    serve(server, V1)
    server.set_resources(CDS, {V2: cluster_proto(V2)})
    server.set_resources(EDS, {V2: endpoints_proto(V2, "10.0.0.2")})
    handle, rec = open_target(client)
    try:
        handle.wait_ready(10)
        mark = len(server.requests)
        server.set_resources(RDS, {RDS_NAME: route_proto((V1, 50), (V2, 50))})
        server.wait_for_request(
            lambda r: r.type_url == CDS and set(r.request.resource_names) == {V1, V2}, start=mark
        )
        widened = rec.wait_for(lambda i: isinstance(i, TargetSnapshot) and V2 in i.clusters)
        assert isinstance(widened, TargetSnapshot) and endpoints_of(widened, V2) == [
            "10.0.0.2:9080"
        ]
        mark = len(server.requests)
        server.set_resources(RDS, {RDS_NAME: route_proto((V2, 1))})
        server.wait_for_request(
            lambda r: r.type_url == CDS and list(r.request.resource_names) == [V2], start=mark
        )
        server.wait_for_request(
            lambda r: r.type_url == EDS and list(r.request.resource_names) == [V2], start=mark
        )
        narrowed = rec.wait_for(lambda i: isinstance(i, TargetSnapshot) and set(i.clusters) == {V2})
        assert isinstance(narrowed, TargetSnapshot)
        assert_no_tears(rec.snapshots)
    finally:
        handle.close()


def test_listener_switching_route_config_never_tears(
    server: XdsTestServer, sotw_client: XdsClient
) -> None:
    client = sotw_client
    serve(server, V1)
    handle, rec = open_target(client)
    try:
        handle.wait_ready(10)
        # The new route config arrives only after the listener names it (and with a delay).
        version = server.set_resources(LDS, {TARGET: listener_proto("routes-b")})
        server.wait_for_request(
            lambda r: r.type_url == RDS and "routes-b" in r.request.resource_names
        )
        server.wait_for_ack(LDS, version)
        client.resource_statuses()  # a barrier: the serializer has handled the listener
        assert handle.current() is not None
        assert [s.version for s in rec.snapshots] == [1]
        server.set_resources(RDS, {"routes-b": route_proto((V1, 1), name="routes-b")})
        rec.wait_for(lambda i: isinstance(i, TargetSnapshot) and i.route_config.name == "routes-b")
        assert_no_tears(rec.snapshots)
    finally:
        handle.close()


def test_cluster_removed_is_per_cluster_error_listener_removed_is_target_error(
    server: XdsTestServer, client: XdsClient
) -> None:
    serve(server, V1)
    server.set_resources(RDS, {RDS_NAME: route_proto((V1, 50), (V2, 50))})
    server.set_resources(CDS, {V2: cluster_proto(V2)})
    server.set_resources(EDS, {V2: endpoints_proto(V2, "10.0.0.2")})
    handle, rec = open_target(client)
    try:
        snap = handle.wait_ready(10)
        assert isinstance(snap.clusters[V2], ClusterConfig)
        server.remove_resources(CDS, [V2])  # SotW CDS: absent from the response = deleted
        after = rec.wait_for(
            lambda i: isinstance(i, TargetSnapshot) and isinstance(i.clusters.get(V2), ClusterError)
        )
        assert isinstance(after, TargetSnapshot) and isinstance(after.clusters[V1], ClusterConfig)
        server.remove_resources(LDS, [TARGET])
        err = rec.wait_for(lambda i: isinstance(i, TargetError))
        assert isinstance(err, TargetError) and err.kind is ErrorKind.DOES_NOT_EXIST
        assert handle.current() is None
    finally:
        handle.close()


def test_nacked_update_keeps_snapshot_and_reports_ambient_error(
    server: XdsTestServer, client: XdsClient
) -> None:
    serve(server, V1)
    handle, rec = open_target(client)
    try:
        snap = handle.wait_ready(10)
        bad = cluster_proto(V1)
        bad.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED  # unsupported: NACK
        server.set_resources(CDS, {V1: bad})
        server.wait_for_nack(CDS)
        err = rec.wait_for(lambda i: isinstance(i, TargetError))
        assert isinstance(err, TargetError) and err.ambient and err.resource == f"CDS {V1}"
        assert handle.current() is snap
    finally:
        handle.close()


def test_server_restart_keeps_serving_the_snapshot(
    server: XdsTestServer, client: XdsClient
) -> None:
    serve(server, V1)
    handle, rec = open_target(client)
    try:
        snap = handle.wait_ready(10)
        server.stop()
        server.start()
        mark = len(server.requests)
        server.wait_for_request(lambda r: r.type_url == EDS, start=mark, timeout=20)
        # Still the same usable snapshot: a restart is never a deletion.
        assert handle.current() is snap
        assert not any(isinstance(i, TargetError) and not i.ambient for i in rec.items)
        server.set_resources(EDS, {V1: endpoints_proto(V1, "10.0.0.9")})
        rec.wait_for(
            lambda i: isinstance(i, TargetSnapshot) and endpoints_of(i, V1) == ["10.0.0.9:9080"]
        )
    finally:
        handle.close()


def test_handles_share_and_close_unsubscribes(
    server: XdsTestServer, sotw_client: XdsClient
) -> None:
    client = sotw_client
    serve(server, V1)
    a = watch_target(client, TARGET)
    b = watch_target(client, f"xds:///{TARGET}")
    assert a is b
    a.wait_ready(10)
    a.close()
    b.close()
    server.wait_for_request(lambda r: r.type_url == LDS and not r.request.resource_names)
    deadline = time.monotonic() + 10
    while client.resource_statuses() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.resource_statuses() == []


def test_server_snapshot_over_real_ads(server: XdsTestServer, client: XdsClient) -> None:
    server.set_resources(LDS, {INBOUND: inbound_listener_proto("inbound-routes")})
    server.set_resources(RDS, {"inbound-routes": route_proto((V1, 1), name="inbound-routes")})
    handle = watch_server(client, "127.0.0.1", 9080)
    try:
        snap = handle.wait_ready(10)
        assert isinstance(snap, ServerSnapshot) and snap.listener_name == INBOUND
        assert set(snap.route_configs) == {"inbound-routes"}
    finally:
        handle.close()


def test_aggregate_cluster_over_real_ads(server: XdsTestServer, sotw_client: XdsClient) -> None:
    client = sotw_client
    server.set_resources(LDS, {TARGET: listener_proto()})
    server.set_resources(RDS, {RDS_NAME: route_proto(("agg", 1))})
    server.set_resources(
        CDS,
        {
            "agg": aggregate_proto("agg", V1, "dns"),
            V1: cluster_proto(V1),
            "dns": logical_dns_proto("dns", "reviews.example.com"),
        },
    )
    server.set_resources(EDS, {V1: endpoints_proto(V1, "10.0.0.1")})
    handle, rec = open_target(client)
    try:
        snap = handle.wait_ready(10)
        agg = snap.clusters["agg"]
        assert isinstance(agg, ClusterConfig) and agg.is_aggregate, dict(snap.clusters)
        assert agg.leaf_clusters == (V1, "dns")
        assert endpoints_of(snap, V1) == ["10.0.0.1:9080"]
        assert endpoints_of(snap, "dns") == ["reviews.example.com:9080"]
        # Only the EDS leaf has an EDS subscription.
        server.wait_for_request(
            lambda r: r.type_url == EDS and list(r.request.resource_names) == [V1]
        )
        # Widening never briefly unsubscribes a child (a stale ACK overtaking the new
        # subscription would make a SotW server answer with a deletion).
        cds_names = [set(r.request.resource_names) for r in server.requests if r.type_url == CDS]
        first = next(i for i, names in enumerate(cds_names) if V1 in names)
        assert all(V1 in names for names in cds_names[first:]), cds_names
        assert not any(
            isinstance(i, TargetSnapshot) and isinstance(i.clusters.get(V1), ClusterError)
            for i in rec.items
        )
        # Re-point the aggregate at a cycle: the aggregate becomes a cluster error.
        server.set_resources(
            CDS, {"agg": aggregate_proto("agg", "agg2"), "agg2": aggregate_proto("agg2", "agg")}
        )
        err = rec.wait_for(
            lambda i: (
                isinstance(i, TargetSnapshot) and isinstance(i.clusters.get("agg"), ClusterError)
            )
        )
        assert isinstance(err, TargetSnapshot) and V1 not in err.clusters
    finally:
        handle.close()


def test_listener_never_sent_is_does_not_exist_after_15_s_fake_time(
    server: XdsTestServer,
) -> None:
    from pymesh.xds.clock import FakeClock

    clock = FakeClock()
    with XdsClient(server.bootstrap(), clock=clock) as xds:
        handle = watch_target(xds, TARGET)
        rec = Recorder()
        handle.subscribe(rec)
        try:
            server.wait_for_request(
                lambda r: r.type_url == LDS and TARGET in r.request.resource_names
            )
            xds.resource_statuses()  # barrier: the request was sent, the timer armed
            clock.advance(14.0)
            assert handle.state() is None
            clock.advance(1.5)
            err = rec.wait_for(lambda i: isinstance(i, TargetError))
            assert isinstance(err, TargetError) and err.kind is ErrorKind.DOES_NOT_EXIST
            with pytest.raises(XdsError, match="listener does not exist"):
                handle.wait_ready(1)
            # The listener appears later: the target becomes usable without a new handle.
            serve(server, V1)
            snap = rec.wait_for(lambda i: isinstance(i, TargetSnapshot))
            assert isinstance(snap, TargetSnapshot) and handle.current() is snap
            assert endpoints_of(snap, V1) == ["10.0.0.1:9080"]
        finally:
            handle.close()
