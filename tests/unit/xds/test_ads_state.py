"""The ADS state machine on its own: no threads, no sockets, time passed in by hand."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymesh.errors import ResourceError
from pymesh.xds.ads import (
    AdsState,
    AmbientError,
    Backoff,
    Changed,
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    DoesNotExist,
    Effect,
    RawResource,
    Send,
)
from pymesh.xds.codec import Decoded, decode_resource
from pymesh.xds.resource_types import ResourceType

LDS = ResourceType.LISTENER
RDS = ResourceType.ROUTE_CONFIGURATION
CDS = ResourceType.CLUSTER
EDS = ResourceType.CLUSTER_LOAD_ASSIGNMENT

SERVER = "server-a"


def decoder(type_url: str, data: bytes) -> Decoded:
    """``b"name=value"`` decodes; ``b"name!"`` is invalid (named); ``b"!"`` unnamed; else
    a crash (like a decoder bug on garbage)."""
    text = data.decode()
    rtype = ResourceType.from_type_url(type_url)
    assert rtype is not None
    if text.endswith("!"):
        raise ResourceError(
            "bad value", type_name=rtype.short_name, resource_name=text[:-1], field="spec.x"
        )
    if "=" not in text:
        raise ValueError(f"garbage {text!r}")
    name, value = text.split("=", 1)
    return Decoded(name, value)


def res(rtype: ResourceType, text: str, **kw: object) -> RawResource:
    return RawResource(type_url=rtype.type_url, data=text.encode(), **kw)  # type: ignore[arg-type]


def sotw(rtype: ResourceType, version: str, nonce: str, *texts: str) -> DiscoveryResponse:
    return DiscoveryResponse(
        type_url=rtype.type_url,
        version_info=version,
        nonce=nonce,
        resources=tuple(res(rtype, t) for t in texts),
    )


def sends(effects: list[Effect]) -> list[DiscoveryRequest | DeltaDiscoveryRequest]:
    return [e.request for e in effects if isinstance(e, Send)]


def notes(effects: list[Effect]) -> list[Effect]:
    return [e for e in effects if not isinstance(e, Send)]


def one_send(effects: list[Effect]) -> DiscoveryRequest:
    (request,) = sends(effects)
    assert isinstance(request, DiscoveryRequest)
    return request


def connected_state(**kw: object) -> AdsState:
    state = AdsState(decoder=decoder, wall_clock=lambda: 5.0, **kw)  # type: ignore[arg-type]
    state.connected(0.0, SERVER)
    return state


# -- SotW ---------------------------------------------------------------------------------


def test_initial_request_carries_node_once_and_sorted_names() -> None:
    state = connected_state()
    state.subscribe(CDS, "b")
    state.subscribe(CDS, "a")
    state.subscribe(EDS, "e")
    requests = sends(state.flush(0.0))
    assert requests == [
        DiscoveryRequest(CDS.type_url, ("a", "b"), include_node=True),
        DiscoveryRequest(EDS.type_url, ("e",)),
    ]
    assert state.flush(0.0) == []  # nothing dirty any more


def test_nothing_is_sent_while_disconnected_and_all_on_connect() -> None:
    state = AdsState(decoder=decoder)
    state.subscribe(CDS, "a")
    assert state.flush(0.0) == []
    requests = sends(state.connected(1.0, SERVER))
    assert requests == [DiscoveryRequest(CDS.type_url, ("a",), include_node=True)]


def test_ack_carries_version_and_nonce() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    effects = state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    assert notes(effects) == [Changed(CDS, "a", "1")]
    assert one_send(effects) == DiscoveryRequest(CDS.type_url, ("a",), "v1", "n1")
    status = state.status(CDS, "a")
    assert status is not None
    assert (status.status, status.version, status.raw, status.value) == (
        "ACKED",
        "v1",
        b"a=1",
        "1",
    )


def test_nack_carries_previous_version_new_nonce_and_detail() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    effects = state.response(sotw(CDS, "v2", "n2", "a!"), 2.0)
    request = one_send(effects)
    assert (request.version_info, request.response_nonce) == ("v1", "n2")
    assert request.error_detail == "Cluster 'a': field spec.x: bad value"
    (note,) = notes(effects)
    assert isinstance(note, AmbientError) and "spec.x" in note.error
    status = state.status(CDS, "a")
    assert status is not None
    assert (status.status, status.value, status.failed_version) == ("NACKED", "1", "v2")
    assert status.error == "Cluster 'a': field spec.x: bad value"
    # recovery
    effects = state.response(sotw(CDS, "v3", "n3", "a=3"), 3.0)
    assert notes(effects) == [Changed(CDS, "a", "3")]
    assert one_send(effects).version_info == "v3"


def test_partial_nack_accepts_good_resources_and_names_the_bad() -> None:
    state = connected_state()
    for name in ("a", "b", "c"):
        state.subscribe(CDS, name)
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1", "b=1", "c=1"), 1.0)
    effects = state.response(sotw(CDS, "v2", "n2", "a=2", "b!", "c=1"), 2.0)
    assert notes(effects)[0] == Changed(CDS, "a", "2")
    assert isinstance(notes(effects)[1], AmbientError)
    assert len(notes(effects)) == 2  # c unchanged, b kept (not deleted)
    request = one_send(effects)
    assert request.version_info == "v1"
    assert request.error_detail is not None and "'b'" in request.error_detail
    assert "'a'" not in request.error_detail
    b = state.status(CDS, "b")
    assert b is not None and b.value == "1"


def test_garbage_and_decoder_crash_are_nacked_not_raised() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    effects = state.response(sotw(CDS, "v1", "n1", "\x00\x01"), 1.0)
    request = one_send(effects)
    assert request.error_detail is not None and "resources[0]" in request.error_detail
    assert request.version_info == ""


def test_resource_of_the_wrong_type_is_nacked() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    message = DiscoveryResponse(CDS.type_url, "v1", "n1", (res(EDS, "a=1"),))
    request = one_send(state.response(message, 1.0))
    assert request.error_detail is not None and "in a response of type" in request.error_detail


def test_duplicate_names_are_nacked() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    effects = state.response(sotw(CDS, "v1", "n1", "a=1", "a=2"), 1.0)
    request = one_send(effects)
    assert request.error_detail is not None and "duplicate" in request.error_detail
    assert not any(isinstance(e, Changed) for e in effects)


def test_unrequested_known_type_is_ignored_not_answered() -> None:
    state = connected_state()
    assert state.response(sotw(LDS, "v1", "n1", "l=1"), 1.0) == []


def test_unknown_type_url_is_nacked() -> None:
    state = connected_state()
    message = DiscoveryResponse("type.googleapis.com/x.Y", "v1", "n1", ())
    request = one_send(state.response(message, 1.0))
    assert request.type_url == "type.googleapis.com/x.Y"
    assert request.response_nonce == "n1" and request.error_detail


def test_unsubscribed_resources_in_a_response_are_ignored_stale_nonce_too() -> None:
    state = connected_state()
    state.subscribe(EDS, "a")
    state.subscribe(EDS, "b")
    state.flush(0.0)
    state.unsubscribe(EDS, "b")
    narrowed = one_send(state.flush(0.0))
    assert narrowed.resource_names == ("a",)
    # a response to the older subscription still arrives: b is ignored, the ACK is for it
    effects = state.response(sotw(EDS, "v1", "n1", "a=1", "b=1"), 1.0)
    assert notes(effects) == [Changed(EDS, "a", "1")]
    assert one_send(effects) == DiscoveryRequest(EDS.type_url, ("a",), "v1", "n1")
    assert state.status(EDS, "b") is None


def test_widen_and_narrow_send_current_version_and_nonce() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    state.subscribe(CDS, "b")
    state.subscribe(CDS, "c")
    widened = one_send(state.flush(2.0))
    assert widened == DiscoveryRequest(CDS.type_url, ("a", "b", "c"), "v1", "n1")
    state.unsubscribe(CDS, "a")
    state.unsubscribe(CDS, "b")
    state.unsubscribe(CDS, "c")
    last = one_send(state.flush(3.0))
    assert last == DiscoveryRequest(CDS.type_url, (), "v1", "n1")  # empty: unsubscribe all
    assert state.next_deadline() is None


@pytest.mark.parametrize("rtype", [LDS, CDS])
def test_lds_cds_absence_is_deletion(rtype: ResourceType) -> None:
    state = connected_state()
    state.subscribe(rtype, "a")
    state.subscribe(rtype, "b")
    state.flush(0.0)
    state.response(sotw(rtype, "v1", "n1", "a=1", "b=1"), 1.0)
    effects = state.response(sotw(rtype, "v2", "n2", "b=1"), 2.0)
    assert notes(effects) == [DoesNotExist(rtype, "a")]
    status = state.status(rtype, "a")
    assert status is not None and status.status == "DOES_NOT_EXIST" and status.raw is None
    # and it may come back
    effects = state.response(sotw(rtype, "v3", "n3", "a=1", "b=1"), 3.0)
    assert notes(effects) == [Changed(rtype, "a", "1")]


@pytest.mark.parametrize("rtype", [RDS, EDS])
def test_rds_eds_absence_means_nothing(rtype: ResourceType) -> None:
    state = connected_state()
    state.subscribe(rtype, "a")
    state.subscribe(rtype, "b")
    state.flush(0.0)
    state.response(sotw(rtype, "v1", "n1", "a=1", "b=1"), 1.0)
    effects = state.response(sotw(rtype, "v2", "n2", "b=2"), 2.0)
    assert notes(effects) == [Changed(rtype, "b", "2")]
    status = state.status(rtype, "a")
    assert status is not None and status.value == "1"


def test_ignore_resource_deletion_keeps_lds_cds() -> None:
    state = connected_state(ignore_resource_deletion=True)
    state.subscribe(CDS, "a")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    effects = state.response(sotw(CDS, "v2", "n2"), 2.0)
    assert notes(effects) == []
    assert one_send(effects).version_info == "v2"
    status = state.status(CDS, "a")
    assert status is not None and (status.status, status.value) == ("ACKED", "1")


def test_unnamed_error_suppresses_deletion() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    effects = state.response(sotw(CDS, "v2", "n2", "!"), 2.0)
    assert notes(effects) == []  # we cannot tell whether "a" is the broken one
    assert one_send(effects).error_detail


def test_identical_resource_is_not_renotified() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    effects = state.response(sotw(CDS, "v2", "n2", "a=1"), 2.0)
    assert notes(effects) == []
    status = state.status(CDS, "a")
    assert status is not None and status.version == "v2"


def test_resource_wrapper_name_is_used_for_errors() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    bad = RawResource(type_url=CDS.type_url, data=b"\x00", name="a")
    effects = state.response(DiscoveryResponse(CDS.type_url, "v1", "n1", (bad,)), 1.0)
    (note,) = notes(effects)
    assert isinstance(note, AmbientError) and note.name == "a"


def test_bodyless_wrapper_is_a_heartbeat_not_a_deletion() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    heartbeat = RawResource(type_url="", data=None, name="a")
    effects = state.response(DiscoveryResponse(CDS.type_url, "v2", "n2", (heartbeat,)), 2.0)
    assert notes(effects) == []  # neither a change nor a deletion of "a"
    assert one_send(effects).error_detail is None
    status = state.status(CDS, "a")
    assert status is not None and status.value == "1"


# -- does-not-exist timer -------------------------------------------------------------------


def test_does_not_exist_fires_15s_after_the_request_is_sent() -> None:
    state = connected_state()
    state.subscribe(EDS, "a")
    state.flush(100.0)
    assert state.next_deadline() == 115.0
    assert state.tick(114.9) == []
    assert state.tick(115.0) == [DoesNotExist(EDS, "a")]
    assert state.next_deadline() is None
    status = state.status(EDS, "a")
    assert status is not None and status.status == "DOES_NOT_EXIST"
    effects = state.response(sotw(EDS, "v1", "n1", "a=1"), 120.0)
    assert notes(effects) == [Changed(EDS, "a", "1")]


def test_does_not_exist_timer_needs_a_connected_stream() -> None:
    state = AdsState(decoder=decoder)
    state.subscribe(EDS, "a")
    state.flush(0.0)
    assert state.next_deadline() is None  # nothing was sent
    state.connected(50.0, SERVER)
    assert state.next_deadline() == 65.0
    effects = state.disconnected(60.0, "UNAVAILABLE")
    assert effects == [AmbientError(EDS, "a", "xDS stream error: UNAVAILABLE")]
    assert state.next_deadline() is None
    assert state.tick(1000.0) == []
    state.connected(2000.0, SERVER)  # resumes with the 5 s it had left
    assert state.next_deadline() == 2005.0
    state.disconnected(2004.0, "again")
    state.connected(3000.0, SERVER)
    assert state.next_deadline() == 3001.0
    assert state.tick(3001.0) == [DoesNotExist(EDS, "a")]


def test_received_resource_cancels_the_timer() -> None:
    state = connected_state()
    state.subscribe(EDS, "a")
    state.flush(0.0)
    state.response(sotw(EDS, "v1", "n1", "a=1"), 1.0)
    assert state.next_deadline() is None
    state.subscribe(EDS, "b")
    state.flush(2.0)
    state.response(sotw(EDS, "v2", "n2", "b!"), 3.0)  # received, even if invalid
    assert state.next_deadline() is None


# -- reconnect --------------------------------------------------------------------------------


def test_reconnect_resubscribes_with_versions_and_no_nonce() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.subscribe(EDS, "e")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    effects = state.disconnected(2.0, "UNAVAILABLE")
    assert effects == []  # a response was seen: not an ambient error
    requests = sends(state.connected(3.0, SERVER))
    assert requests == [
        DiscoveryRequest(CDS.type_url, ("a",), "v1", "", include_node=True),
        DiscoveryRequest(EDS.type_url, ("e",), "", ""),
    ]
    status = state.status(CDS, "a")
    assert status is not None and status.value == "1"


def test_failure_before_any_response_is_an_ambient_error_for_all() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    state.disconnected(2.0, "x")
    state.connected(3.0, SERVER)
    effects = state.disconnected(4.0, "refused")
    assert effects == [AmbientError(CDS, "a", "xDS stream error: refused")]
    status = state.status(CDS, "a")
    assert status is not None and status.value == "1" and status.status == "ACKED"


def test_other_server_gets_no_versions_but_values_stay() -> None:
    state = connected_state()
    state.subscribe(CDS, "a")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    state.disconnected(2.0, "x")
    (request,) = sends(state.connected(3.0, "server-b"))
    assert isinstance(request, DiscoveryRequest) and request.version_info == ""
    status = state.status(CDS, "a")
    assert status is not None and status.value == "1"
    effects = state.response(sotw(CDS, "b7", "n1", "a=1"), 4.0)
    assert notes(effects) == []  # same bytes from the fallback: nothing visible


# -- Delta ------------------------------------------------------------------------------------


def delta(
    rtype: ResourceType,
    nonce: str,
    resources: tuple[tuple[str, str], ...] = (),
    removed: tuple[str, ...] = (),
) -> DeltaDiscoveryResponse:
    return DeltaDiscoveryResponse(
        type_url=rtype.type_url,
        system_version_info="sys",
        nonce=nonce,
        resources=tuple(
            RawResource(rtype.type_url, text.encode(), name=text.split("=")[0], version=v)
            for text, v in resources
        ),
        removed_resources=removed,
    )


def test_delta_subscribe_and_unsubscribe_are_incremental() -> None:
    state = connected_state(delta=True)
    state.subscribe(CDS, "a")
    state.subscribe(CDS, "b")
    (first,) = sends(state.flush(0.0))
    assert first == DeltaDiscoveryRequest(CDS.type_url, subscribe=("a", "b"), include_node=True)
    state.subscribe(CDS, "c")
    state.unsubscribe(CDS, "a")
    (second,) = sends(state.flush(1.0))
    assert second == DeltaDiscoveryRequest(CDS.type_url, subscribe=("c",), unsubscribe=("a",))
    state.subscribe(CDS, "d")
    state.unsubscribe(CDS, "d")  # cancelled before it went out: nothing to send
    assert state.flush(2.0) == []


def test_delta_ack_nack_and_removed_resources() -> None:
    state = connected_state(delta=True)
    state.subscribe(CDS, "a")
    state.subscribe(CDS, "b")
    state.flush(0.0)
    effects = state.response(delta(CDS, "n1", (("a=1", "1"), ("b=1", "1"))), 1.0)
    assert notes(effects) == [Changed(CDS, "a", "1"), Changed(CDS, "b", "1")]
    assert sends(effects) == [DeltaDiscoveryRequest(CDS.type_url, response_nonce="n1")]
    effects = state.response(delta(CDS, "n2", (("a!", "2"),)), 2.0)
    (nack,) = sends(effects)
    assert isinstance(nack, DeltaDiscoveryRequest)
    assert nack.response_nonce == "n2" and nack.error_detail is not None
    effects = state.response(delta(CDS, "n3", removed=("b",)), 3.0)
    assert notes(effects) == [DoesNotExist(CDS, "b")]
    status = state.status(CDS, "a")
    assert status is not None and (status.version, status.value) == ("1", "1")


def test_delta_removal_applies_to_every_type_and_respects_ignore_deletion() -> None:
    state = connected_state(delta=True)
    state.subscribe(EDS, "e")
    state.flush(0.0)
    state.response(delta(EDS, "n1", (("e=1", "1"),)), 1.0)
    assert notes(state.response(delta(EDS, "n2", removed=("e",)), 2.0)) == [DoesNotExist(EDS, "e")]
    keep = connected_state(delta=True, ignore_resource_deletion=True)
    keep.subscribe(CDS, "a")
    keep.flush(0.0)
    keep.response(delta(CDS, "n1", (("a=1", "1"),)), 1.0)
    assert notes(keep.response(delta(CDS, "n2", removed=("a",)), 2.0)) == []


def test_delta_reconnect_sends_initial_resource_versions() -> None:
    state = connected_state(delta=True)
    state.subscribe(CDS, "a")
    state.subscribe(CDS, "b")
    state.flush(0.0)
    state.response(delta(CDS, "n1", (("a=1", "7"),)), 1.0)
    state.disconnected(2.0, "x")
    (request,) = sends(state.connected(3.0, SERVER))
    assert isinstance(request, DeltaDiscoveryRequest)
    assert request.subscribe == ("a", "b")
    assert dict(request.initial_resource_versions) == {"a": "7"}
    state.disconnected(4.0, "x")
    (request,) = sends(state.connected(5.0, "server-b"))
    assert isinstance(request, DeltaDiscoveryRequest)
    assert dict(request.initial_resource_versions) == {}


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_grows_with_jitter_and_caps() -> None:
    import random

    backoff = Backoff()
    rng = random.Random(7)
    delays = [backoff.next_delay(rng) for _ in range(20)]
    assert 0.8 <= delays[0] <= 1.2
    assert 1.28 <= delays[1] <= 1.92
    assert all(d <= 120.0 for d in delays)
    assert delays[-1] >= 96.0  # capped base 120 minus 20 % jitter
    backoff.reset()
    assert backoff.next_delay(rng) <= 1.2


# -- property: mutated resources never break the state machine --------------------------------


def _good_eds() -> bytes:
    from envoy.config.endpoint.v3 import endpoint_pb2

    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name="e1")
    loc = cla.endpoints.add()
    loc.locality.zone = "z1"
    loc.load_balancing_weight.value = 3
    for i in range(3):
        lb = loc.lb_endpoints.add()
        lb.endpoint.address.socket_address.address = f"10.0.0.{i + 1}"
        lb.endpoint.address.socket_address.port_value = 8080 + i
        lb.load_balancing_weight.value = i + 1
    return bytes(cla.SerializeToString())


def _good_route() -> bytes:
    from envoy.config.route.v3 import route_pb2

    rc = route_pb2.RouteConfiguration(name="r1")
    vh = rc.virtual_hosts.add(name="vh", domains=["*"])
    route = vh.routes.add()
    route.match.prefix = "/"
    route.route.cluster = "c1"
    return bytes(rc.SerializeToString())


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and out:
            del out[pos]
        elif op == "truncate":
            del out[pos:]
    return bytes(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_resources_are_acked_or_nacked_and_last_good_stays(data: st.DataObject) -> None:
    rtype, name, good = data.draw(
        st.sampled_from([(EDS, "e1", _good_eds()), (RDS, "r1", _good_route())])
    )
    state = AdsState(decoder=decode_resource)
    state.connected(0.0, SERVER)
    state.subscribe(rtype, name)
    state.flush(0.0)
    ok = DiscoveryResponse(rtype.type_url, "v1", "n1", (RawResource(rtype.type_url, good),))
    first = state.response(ok, 1.0)
    assert isinstance(notes(first)[0], Changed)
    good_value = notes(first)[0].value  # type: ignore[union-attr]
    mutated = data.draw(mutations(good))
    bad = DiscoveryResponse(rtype.type_url, "v2", "n2", (RawResource(rtype.type_url, mutated),))
    effects = state.response(bad, 2.0)  # must not raise
    request = one_send(effects)
    assert request.response_nonce == "n2"
    status = state.status(rtype, name)
    assert status is not None
    if request.error_detail is not None:  # NACK: previous version, last good value kept
        assert request.version_info == "v1"
        if status.value is not None:
            assert status.value == good_value or status.raw == mutated
    else:  # ACK: the mutation was still a valid resource (perhaps under another name)
        assert request.version_info == "v2"
    assert status.status in {"ACKED", "NACKED"}
    if status.status == "NACKED":
        assert status.value == good_value


def test_ignored_deletion_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    state = connected_state(ignore_resource_deletion=True)
    state.subscribe(CDS, "a")
    state.flush(0.0)
    state.response(sotw(CDS, "v1", "n1", "a=1"), 1.0)
    with caplog.at_level("WARNING"):
        for i in range(3):
            state.response(sotw(CDS, f"v{i + 2}", f"n{i + 2}"), 2.0)
    assert len([r for r in caplog.records if "ignore_resource_deletion" in r.message]) == 1


def test_identical_bytes_are_not_decoded_again() -> None:
    calls: list[bytes] = []

    def counting(type_url: str, data: bytes) -> Decoded:
        calls.append(data)
        return decoder(type_url, data)

    state = AdsState(decoder=counting)
    state.connected(0.0, SERVER)
    for name in ("a", "b"):
        state.subscribe(EDS, name)
    state.flush(0.0)
    state.response(sotw(EDS, "v1", "n1", "a=1", "b=1"), 1.0)
    effects = state.response(sotw(EDS, "v2", "n2", "a=1", "b=2"), 2.0)
    assert calls == [b"a=1", b"b=1", b"b=2"]
    assert notes(effects) == [Changed(EDS, "b", "2")]


def test_nack_detail_is_bounded() -> None:
    state = connected_state()
    state.subscribe(EDS, "x")
    state.flush(0.0)
    bad = [f"{'n' * 50}{i}!" for i in range(1000)]
    request = one_send(state.response(sotw(EDS, "v1", "n1", *bad), 1.0))
    assert request.error_detail is not None
    assert len(request.error_detail) <= 8192
    assert request.error_detail.endswith("more invalid resources")
    assert f"'{'n' * 50}0'" in request.error_detail


def test_no_empty_first_request_which_would_mean_wildcard() -> None:
    state = connected_state()
    state.subscribe(LDS, "l")
    state.unsubscribe(LDS, "l")  # in the same task: nothing was ever requested
    assert state.flush(0.0) == []
    state.subscribe(LDS, "l")
    assert one_send(state.flush(1.0)).resource_names == ("l",)
    state.unsubscribe(LDS, "l")
    assert one_send(state.flush(2.0)).resource_names == ()  # a real unsubscription


def test_has_unanswered_counts_does_not_exist_and_nacks_as_answered() -> None:
    state = connected_state()
    assert not state.has_unanswered()
    for name in ("ok", "bad", "gone"):
        state.subscribe(EDS, name)
    state.flush(0.0)
    assert state.has_unanswered()
    state.response(sotw(EDS, "v1", "n1", "ok=1", "bad!"), 1.0)
    assert state.has_unanswered()  # "gone" still unanswered
    state.tick(15.0)  # "gone" does not exist: that is an answer too
    assert not state.has_unanswered()
