"""Workload auto-registration: group matching, grace period, health (fake clock)."""

from __future__ import annotations

import types

import pytest

from pymesh.controlplane.registry import (
    GroupTemplate,
    NodeInfo,
    WorkloadRegistry,
    ports_from_metadata,
)
from pymesh.model.common import Locality

GROUPS = [
    GroupTemplate("default", "reviews-v1", {"app": "reviews", "version": "v1"}, {"http": 9080}),
    GroupTemplate("default", "ratings", {"app": "ratings"}, {"http": 9080}, "bookinfo-ratings"),
    GroupTemplate("other", "reviews-v1", {"app": "reviews"}, {"http": 1}),
]


def node(**kw: object) -> NodeInfo:
    base: dict[str, object] = {
        "id": "sidecar~10.0.0.5~r.default~default.svc.cluster.local",
        "namespace": "default",
        "labels": {"app": "reviews", "version": "v1", "extra": "x"},
        "ips": ("10.0.0.5",),
        "locality": Locality("us", "z1"),
    }
    base.update(kw)
    return NodeInfo(**base)  # type: ignore[arg-type]


def test_label_match_builds_entry_from_template() -> None:
    reg = WorkloadRegistry(grace=10)
    e = reg.connect("c1", node(), GROUPS, now=0)
    assert e is not None
    assert (e.namespace, e.name, e.group) == ("default", "reviews-v1-10.0.0.5", "reviews-v1")
    assert e.address == "10.0.0.5" and dict(e.ports) == {"http": 9080}
    assert dict(e.labels)["extra"] == "x" and e.locality == "us/z1"
    assert e.health == "HEALTHY" and e.connected


def test_explicit_group_and_no_match() -> None:
    reg = WorkloadRegistry()
    e = reg.connect("c1", node(group="ratings", labels={}), GROUPS, now=0)
    assert e is not None and e.group == "ratings" and e.service_account == "bookinfo-ratings"
    assert reg.connect("c2", node(labels={"app": "nope"}, ips=("10.0.0.6",)), GROUPS, 0) is None
    assert reg.connect("c3", node(group="missing"), GROUPS, 0) is None
    assert reg.connect("c4", node(ips=()), GROUPS, 0) is None


def test_grace_period_on_fake_clock() -> None:
    reg = WorkloadRegistry(grace=10)
    reg.connect("c1", node(), GROUPS, now=0)
    assert not reg.disconnect("c1", now=5)
    (e,) = reg.entries()
    assert not e.connected and e.disconnected_at == 5
    assert reg.next_expiry() == 15
    assert not reg.expire(14.9)
    assert len(reg.entries()) == 1
    assert reg.expire(15.0)
    assert reg.entries() == ()


def test_reconnect_within_grace_keeps_entry() -> None:
    reg = WorkloadRegistry(grace=10)
    reg.connect("c1", node(), GROUPS, now=0)
    reg.disconnect("c1", now=1)
    reg.connect("c2", node(), GROUPS, now=3)
    assert not reg.expire(100)
    (e,) = reg.entries()
    assert e.connected and e.connections == frozenset({"c2"})


def test_two_streams_one_entry() -> None:
    reg = WorkloadRegistry(grace=0)
    reg.connect("c1", node(), GROUPS, now=0)
    reg.connect("c2", node(), GROUPS, now=0)
    assert len(reg.entries()) == 1
    reg.disconnect("c1", now=1)
    assert reg.entries()[0].connected
    assert reg.disconnect("c2", now=2)  # grace 0: removed at once
    assert reg.entries() == ()


def test_health() -> None:
    reg = WorkloadRegistry()
    reg.connect("c1", node(), GROUPS, now=0)
    nid = node().id
    assert reg.set_health(nid, "DRAINING")
    assert not reg.set_health(nid, "DRAINING")
    assert reg.entries()[0].health == "DRAINING"
    assert reg.set_health_for_conn("c1", "UNHEALTHY")
    assert reg.entries()[0].health == "UNHEALTHY"
    with pytest.raises(ValueError):
        reg.set_health(nid, "SICK")


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"POD_PORTS": '[{"name":"http","containerPort":9080,"protocol":"TCP"}]'}, {"http": 9080}),
        ({"POD_PORTS": [{"containerPort": 80}]}, {"port80": 80}),
        ({"PYMESH_PORTS": {"grpc": "50051"}}, {"grpc": 50051}),
        ({"PYMESH_PORTS": "http:8080,grpc:9090"}, {"http": 8080, "grpc": 9090}),
        ({"PYMESH_PORTS": '{"http": 99999}'}, {}),
        ({"POD_PORTS": "not json"}, {}),
        ({}, {}),
    ],
)
def test_ports_from_metadata(metadata: dict[str, object], expected: dict[str, int]) -> None:
    got = ports_from_metadata(types.MappingProxyType(metadata))
    assert dict(got) == expected


def test_workloads_sharing_an_ip_are_told_apart_by_their_ports() -> None:
    reg = WorkloadRegistry()
    a = reg.connect("c1", node(id="a", ports={"http": 9081}, ips=("127.0.0.1",)), GROUPS, 0)
    b = reg.connect("c2", node(id="b", ports={"http": 9082}, ips=("127.0.0.1",)), GROUPS, 0)
    assert a is not None and b is not None
    assert (a.name, b.name) == ("reviews-v1-127.0.0.1-9081", "reviews-v1-127.0.0.1-9082")
    assert len(reg.entries()) == 2
