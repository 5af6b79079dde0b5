"""The dependency manager and target handles (gRFC A74) against a double of the watch API.

Every test plays the control plane on :class:`FakeXdsClient` and drains its serializer queue,
so the order of callbacks is explicit and nothing sleeps.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.errors import XdsError
from pymesh.model.cluster import Cluster, ClusterKind
from pymesh.model.common import Locality, SocketAddress
from pymesh.model.endpoint import ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints
from pymesh.model.listener import FilterChain, FilterChainMatch, HttpConnectionManager, Listener
from pymesh.model.route import (
    PathMatchKind,
    RequestMirrorPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from pymesh.model.snapshot import (
    ClusterConfig,
    ClusterError,
    ErrorKind,
    RouteConfigError,
    ServerError,
    ServerSnapshot,
    TargetError,
    TargetSnapshot,
)
from pymesh.xds.resource_types import ResourceType
from pymesh.xds.watch import parse_target, watch_server, watch_target
from tests.unit.xds.fake_xds_client import FakeXdsClient

LDS = ResourceType.LISTENER
RDS = ResourceType.ROUTE_CONFIGURATION
CDS = ResourceType.CLUSTER
EDS = ResourceType.CLUSTER_LOAD_ASSIGNMENT

TARGET = "reviews.default.svc.cluster.local:9080"
RDS_NAME = "outbound|9080||reviews.default.svc.cluster.local"
V1 = "outbound|9080|v1|reviews.default.svc.cluster.local"
V2 = "outbound|9080|v2|reviews.default.svc.cluster.local"
V3 = "outbound|9080|v3|reviews.default.svc.cluster.local"


# -- model builders ---------------------------------------------------------------------------


def listener(rds: str = RDS_NAME, *, name: str = TARGET) -> Listener:
    return Listener(name=name, api_listener=HttpConnectionManager(rds_name=rds))


def prefix_route(action: RouteAction, prefix: str = "/") -> Route:
    return Route(match=RouteMatch(PathMatchKind.PREFIX, prefix), action=action)


def route_config(
    *clusters: str,
    name: str = RDS_NAME,
    domains: tuple[str, ...] = ("reviews.default.svc.cluster.local", TARGET),
    weighted: tuple[tuple[str, int], ...] = (),
    mirror: str | None = None,
) -> RouteConfiguration:
    routes = [prefix_route(RouteAction(cluster=c), f"/{i}") for i, c in enumerate(clusters)]
    if weighted:
        routes.append(
            prefix_route(
                RouteAction(weighted_clusters=tuple(WeightedCluster(n, w) for n, w in weighted))
            )
        )
    if mirror:
        routes.append(
            prefix_route(
                RouteAction(
                    cluster=clusters[0], request_mirror_policies=(RequestMirrorPolicy(mirror),)
                ),
                "/mirror",
            )
        )
    return RouteConfiguration(
        name=name, virtual_hosts=(VirtualHost("reviews", domains, tuple(routes)),)
    )


def eds_cluster(name: str, service: str = "") -> Cluster:
    return Cluster(name=name, kind=ClusterKind.EDS, eds_service_name=service)


def aggregate(name: str, *children: str) -> Cluster:
    return Cluster(name=name, kind=ClusterKind.AGGREGATE, aggregate_clusters=children)


def endpoints(name: str, *ips: str, port: int = 9080) -> ClusterLoadAssignment:
    return ClusterLoadAssignment(
        cluster_name=name,
        localities=(
            LocalityLbEndpoints(
                locality=Locality("us-central1", "us-central1-a"),
                endpoints=tuple(LbEndpoint(address=SocketAddress(ip, port)) for ip in ips),
            ),
        ),
    )


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def client() -> FakeXdsClient:
    return FakeXdsClient()


class Recorder:
    """Every item a handle published, in order."""

    def __init__(self) -> None:
        self.items: list[TargetSnapshot | TargetError | ServerSnapshot | ServerError] = []

    def __call__(self, item: TargetSnapshot | TargetError | ServerSnapshot | ServerError) -> None:
        self.items.append(item)

    @property
    def snapshots(self) -> list[TargetSnapshot]:
        return [i for i in self.items if isinstance(i, TargetSnapshot)]

    @property
    def errors(self) -> list[TargetError]:
        return [i for i in self.items if isinstance(i, TargetError)]


def open_target(client: FakeXdsClient, target: str = TARGET):  # type: ignore[no-untyped-def]
    handle = watch_target(client, target)
    rec = Recorder()
    handle.subscribe(rec)
    client.drain()
    return handle, rec


def serve_basic(client: FakeXdsClient, *clusters: str) -> None:
    """Publish listener -> route config -> EDS clusters -> one endpoint each."""
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config(*clusters))
    for i, c in enumerate(clusters):
        client.set(CDS, c, eds_cluster(c))
        client.set(EDS, c, endpoints(c, f"10.0.0.{i + 1}"))
    client.drain()


def assert_consistent(snapshot: TargetSnapshot) -> None:
    """No tears: every piece the listener references is present in the snapshot."""
    hcm = snapshot.listener.api_listener
    assert hcm is not None
    if hcm.route_config is None:
        assert snapshot.route_config.name == hcm.rds_name
    assert snapshot.virtual_host in snapshot.route_config.virtual_hosts
    for route in snapshot.virtual_host.routes:
        assert isinstance(route.action, RouteAction)
        for name in route.action.cluster_names():
            assert name in snapshot.clusters
    for value in snapshot.clusters.values():
        if isinstance(value, ClusterConfig):
            for leaf in value.leaf_clusters:
                assert leaf in snapshot.clusters


# -- the chain LDS -> RDS -> CDS -> EDS ---------------------------------------------------------


def test_snapshot_published_only_when_every_resource_arrived(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)
    assert client.subscribed == {(LDS, TARGET)}
    client.set(LDS, TARGET, listener())
    client.drain()
    assert client.subscribed == {(LDS, TARGET), (RDS, RDS_NAME)}
    assert rec.items == [] and handle.current() is None
    client.set(RDS, RDS_NAME, route_config(V1))
    client.drain()
    assert (CDS, V1) in client.subscribed and rec.items == []
    client.set(CDS, V1, eds_cluster(V1, service="eds-v1"))
    client.drain()
    assert (EDS, "eds-v1") in client.subscribed and rec.items == []
    client.set(EDS, "eds-v1", endpoints("eds-v1", "10.0.0.1"))
    client.drain()

    [snap] = rec.snapshots
    assert handle.current() is snap
    assert snap.version == 1 and snap.listener_name == TARGET and snap.authority == TARGET
    assert snap.route_config.name == RDS_NAME and snap.virtual_host.name == "reviews"
    config = snap.cluster(V1)
    assert isinstance(config, ClusterConfig)
    assert config.endpoints is not None
    assert [str(e.address) for e in config.endpoints.all_endpoints()] == ["10.0.0.1:9080"]
    assert_consistent(snap)


def test_inline_route_config_needs_no_rds(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    inline = route_config(V1, name="inline")
    client.set(
        LDS, TARGET, Listener(name=TARGET, api_listener=HttpConnectionManager(route_config=inline))
    )
    client.set(CDS, V1, eds_cluster(V1))
    client.set(EDS, V1, endpoints(V1, "10.0.0.1"))
    client.drain()
    assert client.names(RDS) == set()
    [snap] = rec.snapshots
    assert snap.route_config is inline


def test_weighted_and_mirror_clusters_are_all_watched(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config(V1, weighted=((V2, 80), (V3, 20)), mirror="shadow"))
    client.drain()
    assert client.names(CDS) == {V1, V2, V3, "shadow"}
    for name in (V1, V2, V3, "shadow"):
        client.set(CDS, name, eds_cluster(name))
        client.set(EDS, name, endpoints(name, "10.0.0.9"))
    client.drain()
    [snap] = rec.snapshots
    assert set(snap.clusters) == {V1, V2, V3, "shadow"}
    assert all(isinstance(c, ClusterConfig) for c in snap.clusters.values())


def test_only_the_selected_virtual_hosts_clusters_are_watched(client: FakeXdsClient) -> None:
    _, _ = open_target(client)
    rc = RouteConfiguration(
        name=RDS_NAME,
        virtual_hosts=(
            VirtualHost("other", ("ratings:9080",), (prefix_route(RouteAction(cluster="r")),)),
            VirtualHost("reviews", (TARGET,), (prefix_route(RouteAction(cluster=V1)),)),
        ),
    )
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, rc)
    client.drain()
    assert client.names(CDS) == {V1}


# -- widening and narrowing --------------------------------------------------------------------


def test_route_change_widens_then_narrows_subscriptions(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)
    serve_basic(client, V1)
    first = handle.current()
    assert first is not None and set(first.clusters) == {V1}

    # Widen: v1 + v2. Until v2's cluster and endpoints arrive, the old snapshot stays.
    client.set(RDS, RDS_NAME, route_config(weighted=((V1, 50), (V2, 50))))
    client.drain()
    assert client.names(CDS) == {V1, V2}
    assert handle.current() is first and len(rec.snapshots) == 1
    client.set(CDS, V2, eds_cluster(V2))
    client.drain()
    assert client.names(EDS) == {V1, V2} and handle.current() is first
    client.set(EDS, V2, endpoints(V2, "10.0.0.2"))
    client.drain()
    second = handle.current()
    assert second is not None and second.version == 2 and set(second.clusters) == {V1, V2}
    # v1's config object is reused: nothing about it changed.
    assert second.clusters[V1] is first.clusters[V1]

    # Narrow: v2 only. v1's CDS and EDS watches are cancelled, a snapshot is published at once.
    client.set(RDS, RDS_NAME, route_config(V2))
    client.drain()
    assert client.names(CDS) == {V2} and client.names(EDS) == {V2}
    assert ("cancel", CDS, V1) in client.log and ("cancel", EDS, V1) in client.log
    third = handle.current()
    assert third is not None and third.version == 3 and set(third.clusters) == {V2}
    for snap in rec.snapshots:
        assert_consistent(snap)


def test_listener_switching_rds_name_keeps_old_snapshot_until_new_route_config(
    client: FakeXdsClient,
) -> None:
    handle, _ = open_target(client)
    serve_basic(client, V1)
    first = handle.current()
    client.set(LDS, TARGET, listener(rds="new-routes"))
    client.drain()
    assert client.names(RDS) == {"new-routes"}
    assert ("cancel", RDS, RDS_NAME) in client.log
    assert handle.current() is first  # no tear: never a listener without its route config
    client.set(RDS, "new-routes", route_config(V1, name="new-routes"))
    client.drain()
    snap = handle.current()
    assert snap is not None and snap.route_config.name == "new-routes"
    assert snap.clusters[V1] is first.clusters[V1]  # type: ignore[union-attr]


def test_failing_new_route_config_keeps_old_snapshot_and_reports(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)
    serve_basic(client, V1)
    first = handle.current()
    client.set(LDS, TARGET, listener(rds="broken"))
    client.drain()
    client.error(RDS, "broken", "RouteConfiguration 'broken': field virtual_hosts[0]: bad")
    client.drain()
    assert handle.current() is first
    [err] = rec.errors
    assert err.ambient and err.resource == "RDS broken"


def test_no_tears_over_a_sequence_of_updates(client: FakeXdsClient) -> None:
    """Record every published snapshot through many listener/route/cluster changes."""
    handle, rec = open_target(client)
    serve_basic(client, V1)
    names = ["rc-a", "rc-b", "rc-c"]
    cluster_sets = [(V1,), (V2,), (V1, V3), (V3,)]
    for i in range(12):
        rds = names[i % 3]
        clusters = cluster_sets[i % 4]
        # The listener moves first, its route config arrives one drain later.
        client.set(LDS, TARGET, listener(rds=rds))
        client.drain()
        client.set(RDS, rds, route_config(*clusters, name=rds))
        client.drain()
        for c in clusters:
            client.set(CDS, c, eds_cluster(c))
            client.drain()
            client.set(EDS, c, endpoints(c, f"10.0.1.{i}"))
            client.drain()
        snap = handle.current()
        assert snap is not None and snap.route_config.name == rds
        assert set(snap.clusters) == set(clusters)
    assert len(rec.snapshots) >= 12
    assert [s.version for s in rec.snapshots] == list(range(1, len(rec.snapshots) + 1))
    for snap in rec.snapshots:
        assert_consistent(snap)
        for value in snap.clusters.values():
            assert isinstance(value, ClusterConfig) and value.endpoints is not None
    assert rec.errors == []


# -- aggregate clusters ------------------------------------------------------------------------


def test_aggregate_cluster_flattens_leaves_in_priority_order(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config("agg"))
    client.set(CDS, "agg", aggregate("agg", "primary", "inner", "secondary"))
    client.set(CDS, "inner", aggregate("inner", "dns", "primary"))  # diamond: primary twice
    client.set(CDS, "primary", eds_cluster("primary"))
    client.set(
        CDS,
        "dns",
        Cluster(
            name="dns", kind=ClusterKind.LOGICAL_DNS, load_assignment=endpoints("dns", "db.local")
        ),
    )
    client.set(CDS, "secondary", eds_cluster("secondary"))
    client.set(EDS, "primary", endpoints("primary", "10.0.0.1"))
    client.drain()
    assert rec.snapshots == []  # secondary's endpoints are still missing
    client.set(EDS, "secondary", endpoints("secondary", "10.0.0.2"))
    client.drain()
    [snap] = rec.snapshots
    agg = snap.clusters["agg"]
    assert isinstance(agg, ClusterConfig) and agg.is_aggregate and agg.endpoints is None
    assert agg.leaf_clusters == ("primary", "dns", "secondary")
    inner = snap.clusters["inner"]
    assert isinstance(inner, ClusterConfig) and inner.leaf_clusters == ("dns", "primary")
    dns = snap.clusters["dns"]
    assert isinstance(dns, ClusterConfig) and dns.endpoints is not None  # inline, no EDS
    assert client.names(EDS) == {"primary", "secondary"}
    assert_consistent(snap)
    assert [c.name for c in snap.leaves("agg")] == ["primary", "dns", "secondary"]  # type: ignore[union-attr]
    assert snap.leaves("primary") == (snap.clusters["primary"],)
    [missing] = snap.leaves("nope")
    assert isinstance(missing, ClusterError)


def test_aggregate_leaf_also_named_by_a_route_still_counts(client: FakeXdsClient) -> None:
    """Visiting order must not matter: "a-leaf" is reached as a route's cluster first."""
    _handle, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config("a-leaf", "b-inner", "z-agg"))
    client.set(CDS, "z-agg", aggregate("z-agg", "a-leaf", "b-inner", "other"))
    client.set(CDS, "b-inner", aggregate("b-inner", "other", "a-leaf"))
    for leaf in ("a-leaf", "other"):
        client.set(CDS, leaf, eds_cluster(leaf))
        client.set(EDS, leaf, endpoints(leaf, "10.0.0.1"))
    client.drain()
    [snap] = rec.snapshots
    agg = snap.clusters["z-agg"]
    assert isinstance(agg, ClusterConfig) and agg.leaf_clusters == ("a-leaf", "other")
    inner = snap.clusters["b-inner"]
    assert isinstance(inner, ClusterConfig) and inner.leaf_clusters == ("other", "a-leaf")


def test_aggregate_cycle_is_a_cluster_error_not_a_hang(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config("a", "ok"))
    client.set(CDS, "a", aggregate("a", "b"))
    client.set(CDS, "b", aggregate("b", "a"))
    client.set(CDS, "ok", eds_cluster("ok"))
    client.set(EDS, "ok", endpoints("ok", "10.0.0.1"))
    client.drain()
    [snap] = rec.snapshots
    a, b = snap.clusters["a"], snap.clusters["b"]
    assert isinstance(a, ClusterError) and a.kind is ErrorKind.AGGREGATE
    assert "no leaf clusters" in a.message
    assert isinstance(b, ClusterError) and b.kind is ErrorKind.AGGREGATE
    assert isinstance(snap.clusters["ok"], ClusterConfig)  # other routes keep working
    assert handle.current() is snap


def test_aggregate_cycle_with_a_leaf_still_routes_to_the_leaf(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config("a"))
    client.set(CDS, "a", aggregate("a", "b", "leaf"))
    client.set(CDS, "b", aggregate("b", "a"))
    client.set(CDS, "leaf", eds_cluster("leaf"))
    client.set(EDS, "leaf", endpoints("leaf", "10.0.0.1"))
    client.drain()
    [snap] = rec.snapshots
    a = snap.clusters["a"]
    assert isinstance(a, ClusterConfig) and a.leaf_clusters == ("leaf",)


def test_aggregate_deeper_than_16_is_an_error(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config("c0"))
    for i in range(17):
        client.set(CDS, f"c{i}", aggregate(f"c{i}", f"c{i + 1}"))
    client.set(CDS, "c17", eds_cluster("c17"))
    client.set(EDS, "c17", endpoints("c17", "10.0.0.1"))
    client.drain()
    [snap] = rec.snapshots
    # As gRPC: the depth error is the error of every aggregate on the path.
    for i in (0, 7, 15):
        err = snap.clusters[f"c{i}"]
        assert isinstance(err, ClusterError) and err.kind is ErrorKind.AGGREGATE
        assert "exceeds max depth 16" in err.message
    # Depth 16 is never watched.
    assert "c17" not in client.names(CDS) and "c16" not in client.names(CDS)


def test_aggregate_at_depth_limit_minus_one_works(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config("c0"))
    for i in range(15):
        client.set(CDS, f"c{i}", aggregate(f"c{i}", f"c{i + 1}"))
    client.set(CDS, "c15", eds_cluster("c15"))
    client.set(EDS, "c15", endpoints("c15", "10.0.0.1"))
    client.drain()
    [snap] = rec.snapshots
    top = snap.clusters["c0"]
    assert isinstance(top, ClusterConfig) and top.leaf_clusters == ("c15",)


# -- errors ------------------------------------------------------------------------------------


def test_listener_does_not_exist_replaces_snapshot_and_recovers(client: FakeXdsClient) -> None:
    handle, _ = open_target(client)
    serve_basic(client, V1)
    assert handle.current() is not None
    client.delete(LDS, TARGET)
    client.drain()
    state = handle.state()
    assert isinstance(state, TargetError) and state.kind is ErrorKind.DOES_NOT_EXIST
    assert not state.ambient and state.resource == f"LDS {TARGET}"
    assert handle.current() is None
    assert client.subscribed == {(LDS, TARGET)}  # everything below was dropped
    with pytest.raises(XdsError, match="listener does not exist"):
        handle.wait_ready(5)
    # The listener comes back: the chain is rebuilt from the client's cache.
    client.set(LDS, TARGET, listener())
    client.drain()
    snap = handle.current()
    assert snap is not None and isinstance(snap.clusters[V1], ClusterConfig)


def test_route_config_does_not_exist_is_a_target_error(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.delete(RDS, RDS_NAME)
    client.drain()
    [err] = rec.errors
    assert err.kind is ErrorKind.DOES_NOT_EXIST and err.resource == f"RDS {RDS_NAME}"
    assert handle.current() is None


def test_cluster_does_not_exist_is_a_per_cluster_error(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config(V1, V2))
    client.set(CDS, V1, eds_cluster(V1))
    client.set(EDS, V1, endpoints(V1, "10.0.0.1"))
    client.delete(CDS, V2)
    client.drain()
    [snap] = rec.snapshots
    assert isinstance(snap.clusters[V1], ClusterConfig)
    v2 = snap.clusters[V2]
    assert isinstance(v2, ClusterError) and v2.kind is ErrorKind.DOES_NOT_EXIST
    assert client.names(EDS) == {V1}
    # A cluster removed later is a per-cluster error too, in a new snapshot.
    client.delete(CDS, V1)
    client.drain()
    snap2 = handle.current()
    assert snap2 is not None and snap2.version == 2
    assert isinstance(snap2.clusters[V1], ClusterError)
    assert client.names(EDS) == set()


def test_endpoints_do_not_exist_gives_cluster_without_endpoints(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config(V1))
    client.set(CDS, V1, eds_cluster(V1))
    client.delete(EDS, V1)
    client.drain()
    [snap] = rec.snapshots
    config = snap.clusters[V1]
    assert isinstance(config, ClusterConfig) and config.endpoints is None
    assert "does not exist" in config.resolution_note


def test_cluster_nacked_before_first_value_is_a_cluster_error(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config(V1))
    client.drain()
    client.error(CDS, V1, "Cluster 'v1': field lb_policy: unsupported")
    client.drain()
    [snap] = rec.snapshots
    err = snap.clusters[V1]
    assert isinstance(err, ClusterError) and "lb_policy" in err.message


def test_ambient_error_keeps_the_snapshot(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)
    serve_basic(client, V1)
    snap = handle.current()
    for rtype, name in ((LDS, TARGET), (RDS, RDS_NAME), (CDS, V1), (EDS, V1)):
        client.error(rtype, name, "stream closed: UNAVAILABLE")
        client.drain()
        assert handle.current() is snap
        assert handle.state() is snap
        err = handle.last_error
        assert err is not None and err.ambient and err.kind is ErrorKind.TRANSIENT
        assert err.resource == f"{rtype.abbrev} {name}"
    assert len(rec.errors) == 4 and rec.snapshots == [snap]
    assert handle.wait_ready(0.1) is snap
    # The next good update clears the error.
    client.set(EDS, V1, endpoints(V1, "10.0.0.7"))
    client.drain()
    assert handle.current() is not snap and handle.last_error is None


def test_transient_error_before_any_snapshot(client: FakeXdsClient) -> None:
    handle, _ = open_target(client)
    client.error(LDS, TARGET, "connection refused")
    client.drain()
    state = handle.state()
    assert isinstance(state, TargetError) and state.ambient
    with pytest.raises(XdsError, match="connection refused"):
        handle.wait_ready(0.05)


def test_no_matching_virtual_host(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config(V1, domains=("ratings:9080",)))
    client.drain()
    [err] = rec.errors
    assert err.kind is ErrorKind.NO_VIRTUAL_HOST and TARGET in err.message
    assert client.names(CDS) == set()


def test_listener_without_api_listener_is_invalid_for_a_client(client: FakeXdsClient) -> None:
    _, rec = open_target(client)
    client.set(LDS, TARGET, Listener(name=TARGET, address=SocketAddress("0.0.0.0", 9080)))
    client.drain()
    [err] = rec.errors
    assert err.kind is ErrorKind.INVALID and "api_listener" in err.message


# -- EDS updates -------------------------------------------------------------------------------


def test_eds_update_changes_only_the_endpoints(client: FakeXdsClient) -> None:
    handle, _ = open_target(client)
    serve_basic(client, V1, V2)
    first = handle.current()
    assert first is not None
    client.set(EDS, V1, endpoints(V1, "10.0.0.1", "10.0.0.100"))
    client.drain()
    second = handle.current()
    assert second is not None and second.version == first.version + 1
    assert second.listener is first.listener
    assert second.route_config is first.route_config
    assert second.virtual_host is first.virtual_host
    assert second.clusters[V2] is first.clusters[V2]
    old, new = first.clusters[V1], second.clusters[V1]
    assert isinstance(old, ClusterConfig) and isinstance(new, ClusterConfig)
    assert new.cluster is old.cluster and new.endpoints is not old.endpoints
    assert new.endpoints is not None and len(new.endpoints.all_endpoints()) == 2


def test_same_objects_again_publish_nothing(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)
    serve_basic(client, V1)
    snap = handle.current()
    assert snap is not None
    client.set(LDS, TARGET, snap.listener)
    client.set(RDS, RDS_NAME, snap.route_config)
    client.drain()
    assert rec.snapshots == [snap]


# -- handles -----------------------------------------------------------------------------------


def test_handles_are_shared_and_ref_counted(client: FakeXdsClient) -> None:
    a = watch_target(client, TARGET)
    b = watch_target(client, f"xds:///{TARGET}")
    assert a is b
    client.drain()
    serve_basic(client, V1)
    assert a.current() is not None
    a.close()
    client.drain()
    assert not a.closed and client.subscribed  # b still holds it
    b.close()
    client.drain()
    assert a.closed and client.subscribed == set()
    c = watch_target(client, TARGET)  # a fresh handle after the last close
    assert c is not a
    client.drain()
    assert c.current() is not None  # served from the client's cache
    c.close()
    client.drain()


def test_subscribe_delivers_current_state_first(client: FakeXdsClient) -> None:
    handle, _ = open_target(client)
    serve_basic(client, V1)
    late = Recorder()
    cancel = handle.subscribe(late)
    client.drain()
    assert late.items == [handle.current()]
    cancel()
    client.set(EDS, V1, endpoints(V1, "10.0.0.42"))
    client.drain()
    assert len(late.items) == 1


def test_subscriber_exception_is_isolated(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)

    def boom(item: object) -> None:
        raise RuntimeError("subscriber bug")

    handle.subscribe(boom)
    serve_basic(client, V1)
    assert len(rec.snapshots) == 1


def test_wait_ready_wakes_up_when_a_snapshot_is_published(client: FakeXdsClient) -> None:
    handle, _ = open_target(client)
    result: list[object] = []

    def waiter() -> None:
        result.append(handle.wait_ready(10))

    thread = threading.Thread(target=waiter)
    thread.start()
    serve_basic(client, V1)
    thread.join(10)
    assert not thread.is_alive()
    assert result == [handle.current()]


def test_wait_ready_times_out(client: FakeXdsClient) -> None:
    handle, _ = open_target(client)
    with pytest.raises(XdsError, match="no xDS configuration"):
        handle.wait_ready(0.01)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("foo:80", (None, "foo:80")),
        ("xds:///foo:80", (None, "foo:80")),
        ("xds:foo:80", (None, "foo:80")),
        ("xds://other.example/foo:80", ("other.example", "foo:80")),
        ("xds:///foo%3A80", (None, "foo:80")),
    ],
)
def test_parse_target(target: str, expected: tuple[str | None, str]) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize("target", ["", "xds:///", "http://foo/bar"])
def test_parse_target_rejects(target: str) -> None:
    with pytest.raises(XdsError):
        parse_target(target)


def test_xdstp_authority_target_uses_its_listener_template(client: FakeXdsClient) -> None:
    handle = watch_target(client, "xds://other.example/foo:80")
    client.drain()
    assert handle.listener_name == (
        "xdstp://other.example/envoy.config.listener.v3.Listener/foo:80"
    )
    assert client.names(LDS) == {handle.listener_name}
    handle.close()
    client.drain()


# -- servers -----------------------------------------------------------------------------------


INBOUND = "xds.istio.io/grpc/lds/inbound/0.0.0.0:9080"


def server_listener(*rds_names: str) -> Listener:
    chains = tuple(
        FilterChain(
            name=f"chain{i}", match=FilterChainMatch(), hcm=HttpConnectionManager(rds_name=n)
        )
        for i, n in enumerate(rds_names)
    )
    return Listener(name=INBOUND, address=SocketAddress("0.0.0.0", 9080), filter_chains=chains)


def test_server_snapshot_with_route_configs_by_name(client: FakeXdsClient) -> None:
    handle = watch_server(client, "0.0.0.0", 9080)
    rec = Recorder()
    handle.subscribe(rec)
    client.drain()
    assert client.names(LDS) == {INBOUND}
    client.set(LDS, INBOUND, server_listener("in-a", "in-b"))
    client.set(RDS, "in-a", route_config(V1, name="in-a"))
    client.drain()
    assert rec.items == [] and client.names(RDS) == {"in-a", "in-b"}
    client.delete(RDS, "in-b")
    client.drain()
    [snap] = rec.items
    assert isinstance(snap, ServerSnapshot) and snap.listener_name == INBOUND
    assert isinstance(snap.route_configs["in-a"], RouteConfiguration)
    assert isinstance(snap.route_configs["in-b"], RouteConfigError)
    # The listener drops chain b: its RDS watch goes away.
    client.set(LDS, INBOUND, server_listener("in-a"))
    client.drain()
    assert client.names(RDS) == {"in-a"}
    snap2 = handle.current()
    assert snap2 is not None and set(snap2.route_configs) == {"in-a"}
    client.delete(LDS, INBOUND)
    client.drain()
    state = handle.state()
    assert isinstance(state, ServerError) and state.kind is ErrorKind.DOES_NOT_EXIST
    assert client.names(RDS) == set()
    handle.close()
    client.drain()
    assert client.subscribed == set()


# -- extra cluster subscriptions and ambient error de-duplication -------------------------------


def test_watch_cluster_adds_a_cluster_no_route_names(client: FakeXdsClient) -> None:
    handle, rec = open_target(client)
    serve_basic(client, V1)
    cancel = handle.watch_cluster("by-header")
    client.drain()
    assert "by-header" in client.names(CDS)
    assert len(rec.snapshots) == 1  # incomplete until the new cluster is known
    client.set(CDS, "by-header", eds_cluster("by-header"))
    client.set(EDS, "by-header", endpoints("by-header", "10.0.0.50"))
    client.drain()
    snap = handle.current()
    assert snap is not None and set(snap.clusters) == {V1, "by-header"}
    assert_consistent(snap)
    cancel()
    cancel()  # idempotent
    client.drain()
    assert client.names(CDS) == {V1}
    snap2 = handle.current()
    assert snap2 is not None and set(snap2.clusters) == {V1}


def test_same_ambient_error_is_reported_once_per_outage(client: FakeXdsClient) -> None:
    _handle, rec = open_target(client)
    serve_basic(client, V1)
    for _ in range(3):
        client.error(CDS, V1, "stream closed: UNAVAILABLE")
        client.drain()
    assert len(rec.errors) == 1
    client.set(EDS, V1, endpoints(V1, "10.0.0.3"))  # a new snapshot ends the outage
    client.drain()
    client.error(CDS, V1, "stream closed: UNAVAILABLE")
    client.drain()
    assert len(rec.errors) == 2


def test_eds_update_does_not_rescan_routes(client: FakeXdsClient) -> None:
    """A 1,000-route config: an endpoint update reuses the cached cluster set."""
    handle, _rec = open_target(client)
    clusters = [f"c{i}" for i in range(10)]
    client.set(LDS, TARGET, listener())
    client.set(RDS, RDS_NAME, route_config(*(clusters[i % 10] for i in range(1000))))
    for c in clusters:
        client.set(CDS, c, eds_cluster(c))
        client.set(EDS, c, endpoints(c, "10.0.0.1"))
    client.drain()
    first = handle.current()
    assert first is not None and set(first.clusters) == set(clusters)
    manager = handle.manager
    roots = manager._roots
    client.set(EDS, "c3", endpoints("c3", "10.0.0.2"))
    client.drain()
    assert manager._roots is roots
    second = handle.current()
    assert second is not None and second.version == 2
    assert sum(second.clusters[c] is not first.clusters[c] for c in clusters) == 1


# -- property: any sequence of control-plane events ----------------------------------------------

_ROUTE_NAMES = ("rA", "rB")
_LEAVES = ("c1", "c2", "c3")
_CLUSTER_NAMES = (*_LEAVES, "agg", "loop")


def _cluster_value(name: str, variant: int) -> Cluster:
    if name == "agg":
        return aggregate("agg", *(("c1", "c2"), ("c3", "loop"), ("c2",))[variant % 3])
    if name == "loop":
        return aggregate("loop", "agg") if variant % 2 else eds_cluster("loop", "c1")
    return eds_cluster(name)


_events = st.one_of(
    st.tuples(st.just("lds"), st.sampled_from((*_ROUTE_NAMES, "inline", None))),
    st.tuples(
        st.just("rds"),
        st.sampled_from(_ROUTE_NAMES),
        st.lists(st.sampled_from(_CLUSTER_NAMES), min_size=1, max_size=3, unique=True),
    ),
    st.tuples(st.just("cds"), st.sampled_from(_CLUSTER_NAMES), st.integers(0, 5)),
    st.tuples(st.just("eds"), st.sampled_from(_LEAVES), st.integers(1, 250)),
    st.tuples(st.just("delete"), st.sampled_from(("lds", "rds", "cds", "eds"))),
    st.tuples(st.just("error"), st.sampled_from(("lds", "rds", "cds", "eds"))),
    st.just(("drain",)),
)


def _apply(client: FakeXdsClient, event: tuple[object, ...]) -> None:
    kind = event[0]
    if kind == "lds":
        rds = event[1]
        if rds == "inline":
            client.set(
                LDS,
                TARGET,
                Listener(
                    name=TARGET,
                    api_listener=HttpConnectionManager(route_config=route_config("c1", name="in")),
                ),
            )
        elif rds is None:
            client.delete(LDS, TARGET)
        else:
            client.set(LDS, TARGET, listener(rds=str(rds)))
    elif kind == "rds":
        name = str(event[1])
        client.set(RDS, name, route_config(*event[2], name=name))  # type: ignore[misc]
    elif kind == "cds":
        name = str(event[1])
        client.set(CDS, name, _cluster_value(name, int(event[2])))  # type: ignore[call-overload]
    elif kind == "eds":
        client.set(EDS, str(event[1]), endpoints(str(event[1]), f"10.0.0.{event[2]}"))
    elif kind in ("delete", "error"):
        subscribed = sorted(
            (k for k in client.subscribed if k[0].abbrev.lower() == event[1]), key=str
        )
        if subscribed:
            rtype, name = subscribed[0]
            if kind == "delete":
                client.delete(rtype, name)
            else:
                client.error(rtype, name, "boom")
    else:
        client.drain()


@settings(max_examples=150, deadline=None)
@given(st.lists(_events, max_size=40))
def test_any_event_sequence_keeps_invariants(events: list[tuple[object, ...]]) -> None:
    client = FakeXdsClient()
    handle, rec = open_target(client)
    # Start from a served, different tree (c3, and a loop through agg) so that leaks show.
    client.set(LDS, TARGET, listener(rds="rB"))
    client.set(RDS, "rB", route_config("c3", "loop", name="rB"))
    client.set(CDS, "loop", _cluster_value("loop", 1))
    client.set(CDS, "agg", _cluster_value("agg", 1))
    client.set(CDS, "c3", _cluster_value("c3", 0))
    client.set(EDS, "c3", endpoints("c3", "10.0.0.3"))
    client.drain()
    assert handle.current() is not None
    for event in events:
        _apply(client, event)
        client.drain()
        # The manager watches exactly what the client has subscriptions for.
        assert client.subscribed == handle.manager.watched
    # Settle: every resource exists; the final snapshot reflects the latest of each.
    client.set(LDS, TARGET, listener(rds="rA"))
    client.set(RDS, "rA", route_config("agg", name="rA"))
    for name in _CLUSTER_NAMES:
        client.set(CDS, name, _cluster_value(name, 0))
    for name in _LEAVES:
        client.set(EDS, name, endpoints(name, "10.9.9.9"))
    client.drain()
    snap = handle.current()
    assert snap is not None and snap.route_config.name == "rA"
    agg = snap.clusters["agg"]
    assert isinstance(agg, ClusterConfig) and agg.leaf_clusters == ("c1", "c2")
    # Nothing leaks from earlier states: exactly the tree of the final route is watched.
    assert client.subscribed == {(LDS, TARGET), (RDS, "rA")} | {
        (CDS, "agg"),
        (CDS, "c1"),
        (CDS, "c2"),
        (EDS, "c1"),
        (EDS, "c2"),
    }
    for item in rec.snapshots:
        assert_consistent(item)
    versions = [s.version for s in rec.snapshots]
    assert versions == sorted(set(versions))
    handle.close()
    client.drain()
    assert client.subscribed == frozenset()


def test_unknown_authority_is_a_bootstrap_error(client: FakeXdsClient) -> None:
    from pymesh.errors import BootstrapError

    with pytest.raises(BootstrapError, match=r"nowhere\.example"):
        watch_target(client, "xds://nowhere.example/foo:80")


def test_concurrent_watch_and_close_keep_ref_counts_exact(client: FakeXdsClient) -> None:
    from pymesh.xds import watch as watch_module

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(200):
                watch_target(client, TARGET).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    keeper = watch_target(client, TARGET)  # keeps the target alive throughout
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert not keeper.closed and keeper._refs == 1
    keeper.close()
    client.drain()
    assert keeper.closed and client.subscribed == frozenset()
    assert id(client) not in watch_module._REGISTRY


def test_wait_ready_on_the_work_thread_fails_fast(client: FakeXdsClient) -> None:
    handle, _ = open_target(client)
    seen: list[str] = []

    def callback(item: object) -> None:
        try:
            handle.wait_ready(30)
        except XdsError as exc:
            seen.append(str(exc))

    handle.subscribe(callback)
    client.error(LDS, TARGET, "connection refused")  # not ready: waiting would deadlock
    client.drain()
    assert len(seen) == 1 and "work thread" in seen[0]
    serve_basic(client, V1)  # once ready, wait_ready returns at once, on any thread
    assert len(seen) == 1


def test_snapshots_are_immutable(client: FakeXdsClient) -> None:
    handle, _ = open_target(client)
    serve_basic(client, V1)
    snap = handle.current()
    assert snap is not None
    with pytest.raises(AttributeError):
        snap.version = 99  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.clusters["new"] = snap.clusters[V1]  # type: ignore[index]
    config = snap.clusters[V1]
    with pytest.raises(AttributeError):
        config.endpoints = None  # type: ignore[misc]
    # Compact reprs (logs, assertion messages): names and counts, not every endpoint.
    assert repr(config) == f"ClusterConfig({V1!r}, EDS, endpoints=1)"
    assert repr(snap).startswith(f"TargetSnapshot(target={TARGET!r}, version=1, ")
    assert len(repr(snap)) < 600


def test_public_names_are_pinned() -> None:
    import pymesh.model.snapshot
    import pymesh.xds.codec.csds
    import pymesh.xds.dependency
    import pymesh.xds.status
    import pymesh.xds.transport.csds
    import pymesh.xds.watch

    assert sorted(pymesh.xds.watch.__all__) == [
        "ServerHandle",
        "TargetHandle",
        "parse_target",
        "watch_server",
        "watch_target",
    ]
    assert set(pymesh.model.snapshot.__all__) == {
        "MAX_AGGREGATE_DEPTH",
        "ClusterConfig",
        "ClusterError",
        "ErrorKind",
        "RouteConfigError",
        "ServerError",
        "ServerSnapshot",
        "TargetError",
        "TargetSnapshot",
    }
    assert sorted(pymesh.xds.dependency.__all__) == [
        "ServerDependencyManager",
        "TargetDependencyManager",
        "WatchClient",
    ]
    assert sorted(pymesh.xds.status.__all__) == ["DecodedStatus", "config_dump", "decoded"]
    assert sorted(pymesh.xds.transport.csds.__all__) == [
        "CSDS_SERVICE",
        "add_csds_servicer",
        "csds_handler",
        "serve_csds",
    ]
    assert "encode_status_response" in pymesh.xds.codec.csds.__all__
    for name in ("current", "state", "wait_ready", "subscribe", "close", "watch_cluster"):
        assert callable(getattr(pymesh.xds.watch.TargetHandle, name))


def test_server_listener_must_match_the_server_address(client: FakeXdsClient) -> None:
    handle = watch_server(client, "0.0.0.0", 9080)
    rec = Recorder()
    handle.subscribe(rec)
    client.drain()
    wrong = Listener(name=INBOUND, address=SocketAddress("0.0.0.0", 8080))
    client.set(LDS, INBOUND, wrong)
    client.drain()
    state = handle.state()
    assert isinstance(state, ServerError) and state.kind is ErrorKind.INVALID
    assert "does not match" in state.message
    client.set(LDS, INBOUND, Listener(name=INBOUND, api_listener=HttpConnectionManager()))
    client.drain()
    state = handle.state()
    assert isinstance(state, ServerError) and "api_listener" in state.message
    client.set(LDS, INBOUND, server_listener())  # right address, no chains: serves nothing yet
    client.drain()
    assert isinstance(handle.current(), ServerSnapshot)
    handle.close()
    client.drain()
