"""Table tests of the EDS decoder (gRFC A27/A61 rules) and a mutation property test."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymesh.errors import ResourceError
from pymesh.model.common import Locality, SocketAddress
from pymesh.model.endpoint import ClusterLoadAssignment, HealthStatus
from pymesh.model.route import FractionalPercent
from pymesh.xds.codec.endpoint import decode_cluster_load_assignment
from tests.fixtures.xds.cds_eds_fixtures import fixture_names, load_dict, message_from_dict

NAME = "outbound|9080||reviews.default.svc.cluster.local"


def encode(data: dict[str, Any]) -> bytes:
    return message_from_dict(data, endpoint_pb2.ClusterLoadAssignment).SerializeToString()


def decode(data: dict[str, Any]) -> ClusterLoadAssignment:
    got = decode_cluster_load_assignment(encode(data))
    assert isinstance(got.value, ClusterLoadAssignment)
    assert got.name == got.value.cluster_name
    return got.value


def ep(host: str, port: int = 9080, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint": {"address": {"socketAddress": {"address": host, "portValue": port}}},
        **extra,
    }


def loc(zone: str, *endpoints: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "locality": {"region": "us-central1", "zone": zone},
        "lbEndpoints": list(endpoints),
        **extra,
    }


def cla(*localities: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"clusterName": NAME, "endpoints": list(localities), **extra}


BASE = cla(
    loc("us-central1-a", ep("10.0.0.1"), ep("10.0.0.2")), loc("us-central1-b", ep("10.0.1.1"))
)


# ----------------------------------------------------------------------------- accepted


def test_istio_fixture() -> None:
    got = decode(load_dict("eds_istio_reviews_v1"))
    assert got.cluster_name == "outbound|9080|v1|reviews.default.svc.cluster.local"
    assert [str(loc.locality) for loc in got.localities] == [
        "us-central1/us-central1-a",
        "us-central1/us-central1-b",
    ]
    assert [loc.load_balancing_weight for loc in got.localities] == [2, 1]
    first = got.localities[0].endpoints[0]
    assert first.address == SocketAddress("10.48.0.12", 9080)
    assert first.health_status is HealthStatus.HEALTHY
    assert first.metadata["istio"]["workload"] == "reviews-v1;default;reviews;v1;Kubernetes"
    assert first.transport_socket_match == {"tlsMode": "istio"}
    assert got.localities[1].endpoints[0].health_status is HealthStatus.DRAINING
    assert not HealthStatus.DRAINING.usable and HealthStatus.HEALTHY.usable
    assert got.overprovisioning_factor == 140 and got.drop_overloads == ()
    # Identical metadata is decoded once and shared.
    assert got.localities[0].endpoints[1].metadata is first.metadata


def test_dualstack_fixture() -> None:
    got = decode(load_dict("eds_dualstack"))
    e = got.localities[0].endpoints[0]
    assert e.address == SocketAddress("10.48.0.20", 9080)
    assert e.additional_addresses == (SocketAddress("fd00:10:48::20", 9080),)
    assert e.hostname == "details-v1-abc.default.svc.cluster.local"
    assert e.load_balancing_weight == 3
    assert got.localities[0].locality == Locality("us-central1", "us-central1-a", "rack1")
    assert got.localities[1].priority == 1
    assert str(got.localities[1].endpoints[0].address) == "[fd00:10:52::9]:9080"
    assert [len(p) for p in got.priorities] == [1, 1]
    assert got.overprovisioning_factor == 200
    assert got.drop_overloads[0].category == "throttle"
    assert got.drop_overloads[0].drop_percentage == FractionalPercent(5, 10_000)
    assert got.endpoint_stale_after == 30.0


@pytest.mark.parametrize(
    ("data", "check"),
    [
        pytest.param(
            cla(),
            lambda c: c.localities == () and c.priorities == () and c.all_endpoints() == (),
            id="no-endpoints",
        ),
        pytest.param(
            cla(loc("a", ep("10.0.0.1"), loadBalancingWeight=0), loc("b", ep("10.0.0.2"))),
            lambda c: [str(x.locality) for x in c.localities] == ["us-central1/b"],
            id="locality-weight-0-ignored",
        ),
        pytest.param(
            cla(loc("a", ep("10.0.0.1")), loc("a", ep("10.0.0.2"), priority=1)),
            lambda c: [x.priority for x in c.localities] == [0, 1],
            id="same-locality-other-priority",
        ),
        pytest.param(
            cla(loc("a", ep("10.0.0.1", 80), ep("10.0.0.1", 81))),
            lambda c: len(c.all_endpoints()) == 2,
            id="same-ip-other-port",
        ),
        pytest.param(
            cla(loc("a", ep("10.0.0.1"), priority=1), loc("b", ep("10.0.0.2"))),
            lambda c: [len(p) for p in c.priorities] == [1, 1],
            id="priorities-in-any-order",
        ),
        pytest.param(
            cla(loc("a", ep("10.0.0.1", loadBalancingWeight=4_000_000_000), loadBalancingWeight=7)),
            lambda c: c.localities[0].endpoints[0].load_balancing_weight == 4_000_000_000,
            id="large-weight",
        ),
        pytest.param(
            cla(loc("a", ep("::1"), ep("10.0.0.1", healthStatus="DEGRADED"))),
            lambda c: (
                c.localities[0].load_balancing_weight is None
                and c.localities[0].endpoints[1].health_status is HealthStatus.DEGRADED
            ),
            id="unset-locality-weight-kept",
        ),
    ],
)
def test_accepted(data: dict[str, Any], check: Callable[[ClusterLoadAssignment], bool]) -> None:
    assert check(decode(data))


# ----------------------------------------------------------------------------- rejected


def mutate(fn: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    fn(data)
    return data


def _sa(data: dict[str, Any], i: int = 0, j: int = 0) -> dict[str, Any]:
    sa: dict[str, Any] = data["endpoints"][i]["lbEndpoints"][j]["endpoint"]["address"][
        "socketAddress"
    ]
    return sa


EP00 = "endpoints[0].lb_endpoints[0]"
SA00 = f"{EP00}.endpoint.address.socket_address"

REJECTED = [
    pytest.param(
        mutate(lambda d: _sa(d).update(portValue=70000)),
        f"{SA00}.port_value",
        "out of range",
        id="port-range",
    ),
    pytest.param(
        mutate(lambda d: _sa(d).update(portValue=0)), f"{SA00}.port_value", "port 0", id="port-zero"
    ),
    pytest.param(
        mutate(lambda d: (_sa(d).pop("portValue"), _sa(d).update(namedPort="http"))),
        f"{SA00}.port_value",
        "numeric port_value",
        id="named-port",
    ),
    pytest.param(
        mutate(
            lambda d: d["endpoints"][0]["lbEndpoints"][0]["endpoint"].update(
                address={"pipe": {"path": "/s"}}
            )
        ),
        f"{EP00}.endpoint.address",
        "only socket_address",
        id="pipe",
    ),
    pytest.param(
        mutate(lambda d: _sa(d).update(address="reviews")),
        f"{SA00}.address",
        "not an IP",
        id="hostname",
    ),
    pytest.param(
        mutate(lambda d: _sa(d).update(address="")),
        f"{SA00}.address",
        "empty address",
        id="empty-address",
    ),
    pytest.param(
        mutate(lambda d: _sa(d).update(protocol="UDP")), f"{SA00}.protocol", "only TCP", id="udp"
    ),
    pytest.param(
        mutate(lambda d: _sa(d).update(resolverName="custom")),
        f"{SA00}.resolver_name",
        "resolvers",
        id="resolver",
    ),
    pytest.param(
        mutate(lambda d: _sa(d, 1, 0).update(address="10.0.0.1")),
        "endpoints[1].lb_endpoints[0].endpoint.address",
        "duplicate endpoint address 10.0.0.1:9080",
        id="duplicate-address",
    ),
    pytest.param(
        mutate(
            lambda d: d["endpoints"][0]["lbEndpoints"][1]["endpoint"].update(
                additionalAddresses=[
                    {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 9080}}}
                ]
            )
        ),
        "endpoints[0].lb_endpoints[1].endpoint.additional_addresses[0].address",
        "duplicate endpoint address",
        id="duplicate-additional-address-A61",
    ),
    pytest.param(
        mutate(
            lambda d: d["endpoints"][0]["lbEndpoints"][1]["endpoint"].update(
                additionalAddresses=[
                    {"address": {"socketAddress": {"address": "fd00::1", "portValue": 99999}}}
                ]
            )
        ),
        "endpoints[0].lb_endpoints[1].endpoint.additional_addresses[0].address.socket_address.port_value",
        "out of range",
        id="bad-additional-address",
    ),
    pytest.param(
        mutate(lambda d: d["endpoints"][0]["lbEndpoints"][0].update(loadBalancingWeight=0)),
        f"{EP00}.load_balancing_weight",
        "at least 1",
        id="endpoint-weight-0",
    ),
    pytest.param(
        mutate(lambda d: d["endpoints"][1].update(priority=2)),
        "endpoints",
        "missing [1]",
        id="priority-gap",
    ),
    pytest.param(
        mutate(
            lambda d: (
                d["endpoints"][0].update(loadBalancingWeight=0)
                or d["endpoints"][1].update(priority=1)
            )
        ),
        "endpoints",
        "missing [0]",
        id="priority-gap-after-ignoring-weight-0",
    ),
    pytest.param(
        mutate(lambda d: d["endpoints"][1]["locality"].update(zone="us-central1-a")),
        "endpoints[1].locality",
        "duplicate locality 'us-central1/us-central1-a' in priority 0",
        id="duplicate-locality",
    ),
    pytest.param(
        mutate(
            lambda d: (
                d["endpoints"][0].update(loadBalancingWeight=4_000_000_000),
                d["endpoints"][1].update(loadBalancingWeight=400_000_000),
            )
        ),
        "endpoints[1].load_balancing_weight",
        "sum of locality weights in priority 0",
        id="locality-weight-overflow",
    ),
    pytest.param(
        mutate(
            lambda d: [
                e.update(loadBalancingWeight=3_000_000_000)
                for e in d["endpoints"][0]["lbEndpoints"]
            ]
        ),
        "endpoints[0].lb_endpoints",
        "sum of endpoint weights",
        id="endpoint-weight-overflow",
    ),
    pytest.param(
        mutate(lambda d: d["endpoints"][0]["lbEndpoints"][0].update(healthStatus=9)),
        f"{EP00}.health_status",
        "unknown health status 9",
        id="unknown-health",
    ),
    pytest.param(
        mutate(
            lambda d: d["endpoints"][0]["lbEndpoints"][0].update(
                endpoint=None, endpointName="named"
            )
        ),
        EP00,
        "named endpoints",
        id="named-endpoint",
    ),
    pytest.param(
        mutate(
            lambda d: d["endpoints"][0].update(
                ledsClusterLocalityConfig={"ledsCollectionName": "x"}
            )
        ),
        "endpoints[0].leds_cluster_locality_config",
        "LEDS",
        id="leds",
    ),
    pytest.param(
        mutate(lambda d: d.update(policy={"overprovisioningFactor": 0})),
        "policy.overprovisioning_factor",
        "greater than 0",
        id="overprovisioning-0",
    ),
    pytest.param(
        mutate(
            lambda d: d.update(policy={"dropOverloads": [{"dropPercentage": {"numerator": 1}}]})
        ),
        "policy.drop_overloads[0].category",
        "category is empty",
        id="drop-without-category",
    ),
    pytest.param(
        mutate(
            lambda d: d.update(
                policy={"dropOverloads": [{"category": "x", "dropPercentage": {"denominator": 7}}]}
            )
        ),
        "policy.drop_overloads[0].drop_percentage.denominator",
        "unknown denominator",
        id="drop-bad-denominator",
    ),
    pytest.param(
        mutate(lambda d: d.update(policy={"endpointStaleAfter": "0s"})),
        "policy.endpoint_stale_after",
        "greater than 0",
        id="stale-after-0",
    ),
]


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` values left by mutations (JSON null would mean 'unset' anyway)."""
    for loc_ in data.get("endpoints", []):
        for e in loc_.get("lbEndpoints", []):
            for k in [k for k, v in e.items() if v is None]:
                del e[k]
    return data


@pytest.mark.parametrize(("data", "field", "message"), REJECTED)
def test_rejected(data: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ResourceError) as err:
        decode_cluster_load_assignment(encode(_clean(data)))
    assert err.value.type_name == "ClusterLoadAssignment"
    assert err.value.resource_name == NAME
    assert err.value.field == field
    assert message in err.value.message
    assert f"field {field}" in str(err.value)


def test_rejected_without_name_and_garbage() -> None:
    with pytest.raises(ResourceError) as err:
        decode_cluster_load_assignment(encode({"endpoints": []}))
    assert err.value.field == "cluster_name"
    with pytest.raises(ResourceError) as err:
        decode_cluster_load_assignment(b"\xff\xff\xff")
    assert "cannot parse" in err.value.message


# ----------------------------------------------------------------------------- property


SEEDS = [encode(load_dict(name)) for name in fixture_names("eds_")] + [encode(BASE)]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_bytes_only_raise_resource_error(data: bytes) -> None:
    try:
        got = decode_cluster_load_assignment(data)
    except ResourceError as err:
        assert err.type_name == "ClusterLoadAssignment"
    else:
        assert isinstance(got.value, ClusterLoadAssignment)


def test_registered_for_the_eds_type_url() -> None:
    from pymesh.xds.codec import decode_resource
    from pymesh.xds.resource_types import ResourceType

    url = ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url
    got = decode_resource(url, encode(BASE))
    assert isinstance(got.value, ClusterLoadAssignment) and got.name == NAME


_CORRUPTIONS: list[tuple[str, Any]] = [
    ("host", "h.example"),
    ("host", ""),
    ("host", "10.0.0.1"),  # may duplicate another endpoint
    ("port", 0),
    ("port", 65536),
    ("weight", 0),
    ("weight", 2**32 - 1),
    ("health", 6),
    ("priority", 3),
    ("zone", "z0"),  # may duplicate another locality of the priority
    ("locality_weight", 0),
    ("locality_weight", 2**32 - 1),
]


@st.composite
def random_assignments(draw: st.DrawFn) -> dict[str, Any]:
    """A valid assignment (unique addresses, contiguous priorities) with up to two random
    corruptions that may or may not break a rule."""
    localities = []
    n = 0
    for i in range(draw(st.integers(0, 4))):
        endpoints = []
        for _ in range(draw(st.integers(0, 3))):
            n += 1
            e: dict[str, Any] = ep(f"10.0.0.{n}" if n % 2 else f"fd00::{n}")
            e["loadBalancingWeight"] = draw(st.integers(1, 10))
            e["healthStatus"] = draw(st.integers(0, 5))
            endpoints.append(e)
        extra = {"priority": min(i, draw(st.integers(0, 1))), "loadBalancingWeight": 1}
        localities.append(loc(f"z{i}", *endpoints, **extra))
    data = cla(*localities)
    for _ in range(draw(st.integers(0, 2))):
        if not localities:
            break
        what, value = draw(st.sampled_from(_CORRUPTIONS))
        target = draw(st.sampled_from(localities))
        if what == "priority":
            target["priority"] = value
        elif what == "zone":
            target["locality"]["zone"] = value
        elif what == "locality_weight":
            target["loadBalancingWeight"] = value
        elif target["lbEndpoints"]:
            e = draw(st.sampled_from(target["lbEndpoints"]))
            sa = e["endpoint"]["address"]["socketAddress"]
            if what == "host":
                sa["address"] = value
            elif what == "port":
                sa["portValue"] = value
            elif what == "weight":
                e["loadBalancingWeight"] = value
            else:
                e["healthStatus"] = value
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_assignments())
def test_accepted_assignments_hold_the_invariants(data: dict[str, Any]) -> None:
    try:
        got = decode(data)
    except ResourceError as err:
        assert err.resource_name == NAME and err.field
        return
    priorities = sorted({x.priority for x in got.localities})
    assert priorities == list(range(len(priorities)))
    addresses = [(e.address.host, e.address.port) for e in got.all_endpoints()]
    assert len(addresses) == len(set(addresses))
    seen = set()
    for x in got.localities:
        assert (x.priority, x.locality) not in seen
        seen.add((x.priority, x.locality))
        assert x.load_balancing_weight != 0
        assert sum(e.load_balancing_weight for e in x.endpoints) <= 2**32 - 1
        for e in x.endpoints:
            assert e.load_balancing_weight >= 1 and 1 <= e.address.port <= 65535
            assert e.address.host != "h.example" and e.health_status.value <= 5
    for p in priorities:
        weights = [x.load_balancing_weight or 0 for x in got.localities if x.priority == p]
        assert sum(weights) <= 2**32 - 1


def test_decoded_endpoints_are_hashable() -> None:
    got = decode(load_dict("eds_istio_reviews_v1"))
    endpoints = got.all_endpoints()
    assert len(set(endpoints)) == len(endpoints) == 3
    assert hash(got) == hash(decode(load_dict("eds_istio_reviews_v1")))
