"""The EDS decoder's reuse of unchanged localities: same result as a full decode, same
errors, shared objects for the localities whose bytes did not change, nothing kept once no
snapshot holds them."""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import pickle
from typing import Any

import pytest
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymesh.errors import ResourceError
from pymesh.model.common import Locality
from pymesh.model.endpoint import ClusterLoadAssignment
from pymesh.xds.codec import endpoint as eds
from pymesh.xds.codec._common import Ctx, parse_message
from tests.unit.codec.test_endpoint import NAME, cla, encode, ep, loc, random_assignments


@pytest.fixture(autouse=True)
def reuse_small_localities(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' localities are small: reuse them all (the size floor has its own test)."""
    monkeypatch.setattr(eds, "REUSE_MIN_BYTES", 0)


def canonical_digest(record: bytes | memoryview) -> bytes:
    proto = endpoint_components_pb2.LocalityLbEndpoints.FromString(record)
    return hashlib.sha1(proto.SerializeToString(deterministic=True)).digest()


def split_decode(data: bytes) -> ClusterLoadAssignment:
    value = eds.decode_cluster_load_assignment(data).value
    assert isinstance(value, ClusterLoadAssignment)
    return value


def full_decode(data: bytes) -> ClusterLoadAssignment:
    """The message path (the registered decoder before reuse): one parse of the whole
    assignment, no cache."""
    ctx = Ctx("ClusterLoadAssignment")
    msg = parse_message(endpoint_pb2.ClusterLoadAssignment, data, ctx)
    if not msg.cluster_name:
        raise ctx.error("cluster_name", "cluster_name is empty")
    return eds.decode_load_assignment(msg, ctx.named(msg.cluster_name))


def outcome(fn: Any, data: bytes) -> object:
    try:
        return fn(data)
    except ResourceError as exc:
        return ("error", str(exc), exc.field)


def three_zones(port_b: int = 9080) -> bytes:
    return encode(
        cla(
            loc("a", ep("10.0.0.1"), ep("10.0.0.2"), loadBalancingWeight=1),
            loc("b", ep("10.0.1.1", port_b), metadata_ep(), loadBalancingWeight=1),
            loc("c", ep("10.0.2.1"), loadBalancingWeight=1),
        )
    )


def metadata_ep() -> dict[str, Any]:
    return ep(
        "10.0.1.2",
        metadata={"filterMetadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}},
        loadBalancingWeight=3,
    )


def test_an_update_reuses_the_localities_that_did_not_change() -> None:
    eds.clear_locality_cache()
    first = split_decode(three_zones())
    second = split_decode(three_zones(port_b=9081))
    assert second == full_decode(three_zones(port_b=9081))
    assert second.localities[0] is first.localities[0]
    assert second.localities[2] is first.localities[2]
    assert second.localities[1] is not first.localities[1]
    assert second.localities[1].endpoints[0].address.port == 9081
    # the same bytes again: every locality is shared
    third = split_decode(three_zones(port_b=9081))
    assert all(a is b for a, b in zip(third.localities, second.localities, strict=True))


def test_decoded_localities_are_forgotten_with_the_last_snapshot_holding_them() -> None:
    eds.clear_locality_cache()
    data = three_zones()
    value = split_decode(data)
    assert len(eds._LOCALITY_KEYS) == 3
    first = value.localities[0]
    del value
    gc.collect()
    # only the locality still referenced stays known
    assert len(eds._LOCALITY_KEYS) == 1 and len(eds._LOCALITY_CACHE) == 1
    assert split_decode(data).localities[0] is first
    del first
    gc.collect()
    assert len(eds._LOCALITY_KEYS) == 0 and len(eds._LOCALITY_CACHE) == 0


def test_a_cleared_cache_is_refilled_consistently() -> None:
    eds.clear_locality_cache()
    data = three_zones()
    held = [split_decode(data) for _ in range(2)]
    eds.clear_locality_cache()
    again = split_decode(data)  # decoded anew: a new object per locality
    assert again == held[0] and again.localities[0] is not held[0].localities[0]
    del held
    gc.collect()  # the old objects' cleanup must not forget the new ones
    assert split_decode(data).localities[0] is again.localities[0]


# Errors whose rule spans localities, with the offending locality taken from the cache.
CROSS_LOCALITY = [
    pytest.param(
        [cla(loc("a", ep("10.0.0.1")))],
        cla(loc("z", ep("10.0.0.1")), loc("a", ep("10.0.0.1"))),
        "endpoints[1].lb_endpoints[0].endpoint.address",
        id="duplicate-address-in-a-cached-locality",
    ),
    pytest.param(
        [cla(loc("a", ep("10.0.0.9"), ep("10.0.0.1")))],
        cla(loc("z", ep("10.0.0.1")), loc("a", ep("10.0.0.9"), ep("10.0.0.1"))),
        "endpoints[1].lb_endpoints[1].endpoint.address",
        id="duplicate-address-later-in-a-cached-locality",
    ),
    pytest.param(
        [
            cla(
                loc(
                    "a",
                    ep(
                        "10.0.0.9",
                        endpoint={
                            "address": {"socketAddress": {"address": "10.0.0.9", "portValue": 80}},
                            "additionalAddresses": [
                                {
                                    "address": {
                                        "socketAddress": {"address": "10.0.0.1", "portValue": 80}
                                    }
                                }
                            ],
                        },
                    ),
                )
            )
        ],
        cla(
            loc("z", ep("10.0.0.1", 80)),
            loc(
                "a",
                ep(
                    "10.0.0.9",
                    endpoint={
                        "address": {"socketAddress": {"address": "10.0.0.9", "portValue": 80}},
                        "additionalAddresses": [
                            {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 80}}}
                        ],
                    },
                ),
            ),
        ),
        "endpoints[1].lb_endpoints[0].endpoint.additional_addresses[0].address",
        id="duplicate-additional-address-in-a-cached-locality",
    ),
    pytest.param(
        [cla(loc("a", ep("10.0.0.1")))],
        cla(loc("a", ep("10.0.0.2")), loc("a", ep("10.0.0.1"))),
        "endpoints[1].locality",
        id="duplicate-locality",
    ),
    pytest.param(
        [cla(loc("a", ep("10.0.0.1"), loadBalancingWeight=2**32 - 1))],
        cla(
            loc("z", ep("10.0.0.2"), loadBalancingWeight=1),
            loc("a", ep("10.0.0.1"), loadBalancingWeight=2**32 - 1),
        ),
        "endpoints[1].load_balancing_weight",
        id="priority-weight-sum",
    ),
    pytest.param(
        [cla(loc("a", ep("10.0.0.1"), priority=1))],
        cla(loc("a", ep("10.0.0.1"), priority=1)),
        "endpoints",
        id="priorities-not-contiguous",
    ),
]


@pytest.mark.parametrize(("warm", "data", "field"), CROSS_LOCALITY)
def test_rules_across_localities_hold_for_reused_localities(
    warm: list[dict[str, Any]], data: dict[str, Any], field: str
) -> None:
    eds.clear_locality_cache()
    held = []
    for w in warm:
        try:
            held.append(split_decode(encode(w)))
        except ResourceError:
            held.append(None)  # the warm-up itself may be invalid (priority 1 alone)
    raw = encode(data)
    split = eds._split_field(raw, 2)
    assert split is not None
    digests = {canonical_digest(r) for r in split[0]}
    with pytest.raises(ResourceError) as exc:
        split_decode(raw)
    assert exc.value.field == field and exc.value.resource_name == NAME
    assert outcome(full_decode, raw) == ("error", str(exc.value), field)
    if any(h is not None for h in held):
        assert digests & set(eds._LOCALITY_KEYS), "the test must exercise a reused locality"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (three_zones()[:-3], "cannot parse"),  # truncated inside a locality
        (b"\x12\xff\xff\xff\xff\x0f", "cannot parse"),  # a length past the end
        (b"\x0b\x0c", "cluster_name is empty"),  # a group: left to the full parser
        (encode(cla(loc("a", ep("10.0.0.1")))) + b"\x12\x02\x08", "cannot parse"),
    ],
)
def test_malformed_bytes_give_the_full_parsers_error(data: bytes, expected: str) -> None:
    got = outcome(split_decode, data)
    assert got == outcome(full_decode, data)
    assert isinstance(got, tuple) and expected in got[1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_assignments(), random_assignments())
def test_reuse_gives_the_full_decoders_result(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    held = outcome(split_decode, encode(before))  # may fill the cache
    # share some localities between the two, in another order
    mixed = cla(*after["endpoints"], *before["endpoints"][:2])
    for data in (encode(after), encode(mixed), encode(before)):
        assert outcome(split_decode, data) == outcome(full_decode, data)
    del held


def test_locality_hash_is_cached_and_survives_copies() -> None:
    a = Locality("us-central1", "us-central1-a")
    b = Locality("us-central1", "us-central1-a", "")
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != Locality("us-central1", "us-central1-b")
    for copied in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a), copy.copy(a)):
        assert copied == a and hash(copied) == hash(a)
    moved = dataclasses.replace(a, zone="us-central1-c")
    assert hash(moved) == hash(Locality("us-central1", "us-central1-c"))
    assert repr(a) == "Locality(region='us-central1', zone='us-central1-a', sub_zone='')"


def test_small_localities_are_decoded_again_and_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    eds.clear_locality_cache()
    data = encode(cla(loc("a", ep("10.0.9.1")), loc("b", *BIG)))
    split = eds._split_field(data, 2)
    assert split is not None
    small, big = (len(r) for r in split[0])
    monkeypatch.setattr(eds, "REUSE_MIN_BYTES", big)
    assert small < big
    first = split_decode(data)
    second = split_decode(data)
    assert second == first == full_decode(data)
    assert second.localities[0] is not first.localities[0]  # small: decoded again
    assert second.localities[1] is first.localities[1]  # large enough: reused
    assert len(eds._LOCALITY_KEYS) == 1


BIG = [ep(f"10.1.0.{i}") for i in range(1, 40)]


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited record of field ``number``."""
    n = len(payload)
    length = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            length += bytes([byte | 0x80])
        else:
            length += bytes([byte])
            break
    return bytes([number << 3 | 2]) + length + payload


def _metadata_entry(key: str, value: str) -> bytes:
    struct = struct_pb2.Struct()
    struct.update({"k": value})
    entry = _field(1, key.encode()) + _field(2, struct.SerializeToString())
    return _field(1, entry)  # Metadata.filter_metadata map entry


def _assignment(order: tuple[str, str]) -> bytes:
    """An assignment whose endpoints' metadata map entries come in the wire order given."""
    entries = {"istio": _metadata_entry("istio", "w"), "envoy.lb": _metadata_entry("envoy.lb", "x")}
    metadata = b"".join(entries[k] for k in order)
    endpoints = b""
    for i in range(1, 40):
        ep_bytes = endpoint_components_pb2.LbEndpoint(
            endpoint={"address": {"socket_address": {"address": f"10.3.0.{i}", "port_value": 80}}}
        ).SerializeToString()
        endpoints += _field(2, ep_bytes + _field(3, metadata))  # lb_endpoints, .metadata
    locality = endpoint_components_pb2.LocalityLbEndpoints(
        locality={"zone": "a"}
    ).SerializeToString()
    return _field(1, NAME.encode()) + _field(2, locality + endpoints)


def test_map_entries_in_another_order_still_reuse_the_locality() -> None:
    eds.clear_locality_cache()
    one, other = _assignment(("istio", "envoy.lb")), _assignment(("envoy.lb", "istio"))
    assert one != other  # the same content, other bytes
    first = split_decode(one)
    second = split_decode(other)
    assert second.localities[0] is first.localities[0]
    assert second == full_decode(other) == full_decode(one)
    assert set(first.localities[0].endpoints[0].metadata) == {"istio", "envoy.lb"}


# -- huge localities: parsed in runs of endpoints ---------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_assignments(), random_assignments(), st.sampled_from([0, 25, 60, 200]))
def test_runs_give_the_full_decoders_result(
    before: dict[str, Any], after: dict[str, Any], run_bytes: int
) -> None:
    """With a tiny RUN_BYTES every locality is parsed in runs (of one endpoint and up):
    the same model, the same errors (field paths count endpoints across runs), and reuse
    among localities parsed that way."""
    saved = eds.RUN_BYTES, eds.RUNS_ABOVE
    eds.RUN_BYTES = eds.RUNS_ABOVE = run_bytes
    try:
        held = outcome(split_decode, encode(before))
        mixed = cla(*after["endpoints"], *before["endpoints"][:2])
        for data in (encode(after), encode(mixed), encode(before)):
            assert outcome(split_decode, data) == outcome(full_decode, data)
        del held
    finally:
        eds.RUN_BYTES, eds.RUNS_ABOVE = saved


def test_runs_keep_the_locality_fields_found_between_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Protobuf allows a message's fields in any order and a field more than once (the last
    scalar wins, sub-messages merge): a locality whose endpoints are interleaved with its
    other fields decodes as the one-shot parse does."""
    monkeypatch.setattr(eds, "RUN_BYTES", 30)
    monkeypatch.setattr(eds, "RUNS_ABOVE", 30)
    one = endpoint_components_pb2.LocalityLbEndpoints

    def part(**kw: Any) -> bytes:
        return bytes(one(**kw).SerializeToString())

    full = endpoint_pb2.ClusterLoadAssignment.FromString(
        encode(cla(loc("z", *(ep(f"10.0.0.{k}") for k in range(1, 9)))))
    )
    eps = list(full.endpoints[0].lb_endpoints)
    body = (
        part(lb_endpoints=eps[:3])
        + part(priority=0, locality={"region": "r", "zone": "first"})
        + part(lb_endpoints=eps[3:5])
        + part(load_balancing_weight={"value": 7}, locality={"zone": "z"})
        + part(lb_endpoints=eps[5:])
    )
    cla_bytes = (
        endpoint_pb2.ClusterLoadAssignment(cluster_name=NAME).SerializeToString()
        + b"\x12"
        + _len(len(body))
        + body
    )
    got = split_decode(cla_bytes)
    assert got == full_decode(cla_bytes)
    (only,) = got.localities
    assert only.locality == Locality("r", "z") and only.load_balancing_weight == 7
    assert [e.address.host for e in only.endpoints] == [f"10.0.0.{k}" for k in range(1, 9)]


def _len(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (three_zones()[:-3], "cannot parse"),
        (encode(cla(loc("a", ep("10.0.0.1")))) + b"\x12\x02\x08", "cannot parse"),
        (encode(cla(loc("a", ep("10.0.0.1"), ep("10.0.0.2"))))[:-1], "cannot parse"),
    ],
)
def test_malformed_runs_give_the_full_parsers_error(
    data: bytes, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eds, "RUN_BYTES", 0)
    monkeypatch.setattr(eds, "RUNS_ABOVE", 0)
    got = outcome(split_decode, data)
    assert got == outcome(full_decode, data)
    assert isinstance(got, tuple) and expected in got[1]


def test_a_huge_locality_is_parsed_in_runs_and_reused() -> None:
    """12,000 endpoints (~290 KB, above RUNS_ABOVE): the run path, the one-shot result,
    and the next identical update reuses the decoded locality."""
    eds.clear_locality_cache()
    data = encode(cla(loc("big", *(ep(f"10.{k >> 8 & 255}.{k & 255}.1") for k in range(12_000)))))
    split = eds._split_field(data, 2)
    assert split is not None and len(split[0][0]) > eds.RUNS_ABOVE
    parts = eds._split_runs(bytes(split[0][0]), 2, eds.RUN_BYTES)
    assert parts is not None and len(parts[0]) == 5
    first = split_decode(data)
    assert first == full_decode(data)
    again = split_decode(data)
    assert again.localities[0] is first.localities[0]
