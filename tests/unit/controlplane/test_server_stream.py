"""The ADS stream state machine: SotW and Delta tables, no I/O."""

from __future__ import annotations

from pymesh.controlplane.server._stream import AdsStream, Outcome, Request, Resource

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def res(name: str, version: str = "v1") -> Resource:
    return Resource(name, version, payload=f"{name}@{version}")


def test_sotw_first_request_responds_then_ack() -> None:
    s = AdsStream(delta=False)
    d = s.on_request(Request(LDS, names=("a:80",)), now=1.0)
    assert d.outcome is Outcome.RESPOND and d.respond
    r = s.respond(LDS, [res("a:80")], "3", force=True)
    assert r is not None and r.nonce == "1" and r.version == "3"
    assert [x.name for x in r.resources] == ["a:80"]
    d = s.on_request(Request(LDS, nonce="1", version_info="3", names=("a:80",)), now=2.0)
    assert d.outcome is Outcome.ACK and not d.respond
    assert s.types[LDS].acked_version == "3"
    assert s.types[LDS].acked_at == 2.0


def test_sotw_nack_recorded_with_message() -> None:
    s = AdsStream(delta=False)
    s.on_request(Request(CDS), now=0.0)
    s.respond(CDS, [res("c")], "7", force=True)
    d = s.on_request(Request(CDS, nonce="1", version_info="", error="bad cluster"), now=1.0)
    assert d.outcome is Outcome.NACK and not d.respond
    nack = s.types[CDS].nack
    assert nack is not None
    assert (nack.version, nack.nonce, nack.message) == ("7", "1", "bad cluster")
    assert s.types[CDS].acked_version == ""


def test_sotw_stale_nonce_ignored() -> None:
    s = AdsStream(delta=False)
    s.on_request(Request(CDS), now=0.0)
    s.respond(CDS, [res("c")], "1", force=True)
    s.respond(CDS, [res("c", "v2")], "2")
    d = s.on_request(Request(CDS, nonce="1", version_info="1", names=("x",)), now=1.0)
    assert d.outcome is Outcome.STALE and not d.respond
    assert s.types[CDS].wildcard  # subscription not touched by the stale request


def test_sotw_wildcard_rules() -> None:
    s = AdsStream(delta=False)
    s.on_request(Request(CDS), now=0)
    s.on_request(Request(LDS), now=0)
    s.on_request(Request(EDS), now=0)
    s.on_request(Request(RDS, names=("*",)), now=0)
    subs = s.subscriptions()
    assert subs[CDS].wildcard and subs[LDS].wildcard
    assert not subs[EDS].wildcard and subs[EDS].names == frozenset()
    assert subs[RDS].wildcard and subs[RDS].generator_names() is None


def test_sotw_names_change_in_ack_responds() -> None:
    s = AdsStream(delta=False)
    s.on_request(Request(EDS, names=("a",)), now=0)
    s.respond(EDS, [res("a")], "1", force=True)
    d = s.on_request(Request(EDS, nonce="1", version_info="1", names=("a", "b")), now=1)
    assert d.outcome is Outcome.ACK and d.respond
    assert s.subscriptions()[EDS].names == frozenset({"a", "b"})


def test_sotw_unchanged_push_is_suppressed_and_changed_is_sent() -> None:
    s = AdsStream(delta=False)
    s.on_request(Request(CDS), now=0)
    s.respond(CDS, [res("a"), res("b")], "1", force=True)
    assert s.respond(CDS, [res("a"), res("b")], "2") is None
    r = s.respond(CDS, [res("a")], "3")  # b removed: SotW sends the full new state
    assert r is not None and [x.name for x in r.resources] == ["a"] and r.nonce == "2"


def test_sotw_eds_always_answered_after_cds() -> None:
    s = AdsStream(delta=False)
    s.on_request(Request(CDS), now=0)
    s.on_request(Request(EDS, names=("a",)), now=0)
    s.respond(EDS, [res("a")], "1", force=True)  # nonce 1
    s.respond(CDS, [res("a", "v2")], "2", force=True)  # nonce 2: cluster re-created
    d = s.on_request(Request(EDS, nonce="1", version_info="1", names=("a",)), now=1)
    assert d.outcome is Outcome.ACK and d.respond  # Envoy keeps the cluster warming otherwise
    d = s.on_request(Request(EDS, nonce="1", version_info="1", names=("a",)), now=1)
    assert not d.respond


def test_delta_subscribe_changes_and_removed() -> None:
    s = AdsStream(delta=True)
    d = s.on_request(Request(CDS, subscribe=()), now=0)  # wildcard
    assert d.respond and s.types[CDS].wildcard
    r = s.respond(CDS, [res("a"), res("b")], "1", force=True)
    assert r is not None and {x.name for x in r.resources} == {"a", "b"} and r.removed == ()
    d = s.on_request(Request(CDS, nonce=r.nonce), now=1)
    assert d.outcome is Outcome.ACK and not d.respond
    assert s.types[CDS].acked_version == "1"
    r = s.respond(CDS, [res("a"), res("c")], "2")
    assert r is not None
    assert [x.name for x in r.resources] == ["c"] and r.removed == ("b",)
    assert s.respond(CDS, [res("a"), res("c")], "3") is None


def test_delta_named_and_initial_versions() -> None:
    s = AdsStream(delta=True)
    d = s.on_request(Request(EDS, subscribe=("a", "b"), initial_versions={"a": "v1"}), now=0)
    assert d.respond and not s.types[EDS].wildcard
    r = s.respond(EDS, [res("a"), res("b")], "1", force=True)
    assert r is not None and [x.name for x in r.resources] == ["b"]  # client already has a@v1
    d = s.on_request(Request(EDS, nonce=r.nonce, unsubscribe=("a",)), now=1)
    assert d.outcome is Outcome.ACK
    assert s.subscriptions()[EDS].names == frozenset({"b"})
    # Subscription changes ride along even on a stale nonce.
    d = s.on_request(Request(EDS, nonce="old", subscribe=("z",)), now=2)
    assert d.outcome is Outcome.STALE and d.respond
    assert "z" in s.subscriptions()[EDS].names


def test_delta_nack() -> None:
    s = AdsStream(delta=True)
    s.on_request(Request(LDS, subscribe=("l",)), now=0)
    r = s.respond(LDS, [res("l")], "4", force=True)
    assert r is not None
    d = s.on_request(Request(LDS, nonce=r.nonce, error="nope"), now=1)
    assert d.outcome is Outcome.NACK
    nack = s.types[LDS].nack
    assert nack is not None and nack.message == "nope" and nack.version == "4"


def test_sotw_eds_sent_after_cds_clears_always_respond() -> None:
    s = AdsStream(delta=False)
    s.on_request(Request(CDS), now=0)
    s.on_request(Request(EDS, names=("a",)), now=0)
    s.respond(EDS, [res("a")], "1", force=True)  # nonce 1
    s.respond(CDS, [res("a", "v2")], "2")  # nonce 2
    s.respond(EDS, [res("a", "v2")], "2")  # nonce 3: the EDS answer after CDS went out
    d = s.on_request(Request(EDS, nonce="3", version_info="2", names=("a",)), now=1)
    assert d.outcome is Outcome.ACK and not d.respond


def test_delta_resubscribe_resends() -> None:
    s = AdsStream(delta=True)
    s.on_request(Request(EDS, subscribe=("a",)), now=0)
    r = s.respond(EDS, [res("a")], "1", force=True)
    assert r is not None
    s.on_request(Request(EDS, nonce=r.nonce), now=1)
    d = s.on_request(Request(EDS, nonce=r.nonce, subscribe=("a",)), now=2)
    assert d.respond
    r = s.respond(EDS, [res("a")], "1", force=True)
    assert r is not None and [x.name for x in r.resources] == ["a"]


def test_delta_clusters_sent_make_their_endpoints_resent() -> None:
    s = AdsStream(delta=True)
    s.on_request(Request(CDS), now=0)
    s.on_request(Request(EDS, subscribe=("a", "b")), now=0)
    s.respond(CDS, [res("a"), res("b")], "1", force=True)
    s.respond(EDS, [res("a"), res("b")], "1", force=True)
    assert s.respond(EDS, [res("a"), res("b")], "1") is None
    r = s.respond(CDS, [res("a", "v2"), res("b")], "2")  # cluster a re-created
    assert r is not None and [x.name for x in r.resources] == ["a"]
    r = s.respond(EDS, [res("a"), res("b")], "2")  # unchanged endpoints, still sent for a
    assert r is not None and [x.name for x in r.resources] == ["a"]
