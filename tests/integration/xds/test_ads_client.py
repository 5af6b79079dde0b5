"""XdsClient against a real grpcio ADS server on loopback (tests/xdsserver.py).

Time is a FakeClock everywhere: timers (does-not-exist, reconnect backoff, fallback probes)
fire only when a test advances it; waiting for the network is waiting for events.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymesh.bootstrap import parse_bootstrap
from pymesh.errors import BootstrapError, ResourceError, XdsError
from pymesh.xds.ads import Backoff
from pymesh.xds.client import XdsClient, get_client
from pymesh.xds.clock import FakeClock
from pymesh.xds.codec import Decoded
from pymesh.xds.resource_types import ResourceType
from tests.xdsserver import CDS, EDS, WatchRecorder, XdsTestServer

CLUSTER = ResourceType.CLUSTER


def decode_cluster(type_url: str, data: bytes) -> Decoded:
    """A tiny validating decoder: the value is connect_timeout seconds; negative is invalid."""
    assert type_url in (CDS, EDS)
    c = cluster_pb2.Cluster.FromString(data)
    if c.connect_timeout.seconds < 0:
        raise ResourceError(
            "must not be negative",
            type_name="Cluster",
            resource_name=c.name,
            field="connect_timeout",
        )
    return Decoded(c.name, c.connect_timeout.seconds)


def cluster(name: str, seconds: int) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(name=name, connect_timeout={"seconds": seconds})


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def advance_until(clock: FakeClock, cond: Callable[[], bool], step: float = 2.0) -> None:
    """Advance fake time in steps (firing backoff timers) until ``cond`` holds."""
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline, "condition not reached while advancing the clock"
        clock.advance(step)
        time.sleep(0.05)


@pytest.fixture
def server() -> Iterator[XdsTestServer]:
    with XdsTestServer() as s:
        yield s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(server: XdsTestServer, clock: FakeClock) -> Iterator[XdsClient]:
    c = XdsClient(server.bootstrap(), clock=clock, decoder=decode_cluster)
    yield c
    c.close()


def test_initial_fetch_ack_and_callbacks_on_the_serializer(
    server: XdsTestServer, client: XdsClient
) -> None:
    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    rec = WatchRecorder()
    client.watch(CLUSTER, "c1", rec)
    assert rec.wait_for(lambda e: e[0] == "changed") == ("changed", "c1", 1)
    ack = server.wait_for_ack(CDS, "1")
    assert list(ack.request.resource_names) == ["c1"]
    first = server.requests[0].request
    assert first.node.id.startswith("sidecar~")
    assert first.node.user_agent_name == "pymesh"
    assert first.node.locality.zone == "z1"
    assert not ack.request.HasField("node")  # the node goes in the first request only
    assert rec.thread_names and all(n.startswith("pymesh-xds-") for n in rec.thread_names)
    (status,) = client.resource_statuses()
    assert (status.status, status.version, status.value) == ("ACKED", "1", 1)
    assert status.raw == cluster("c1", 1).SerializeToString()
    assert client.connection_state().connected


def test_update_and_identical_push_is_silent(server: XdsTestServer, client: XdsClient) -> None:
    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    rec = WatchRecorder()
    client.watch(CLUSTER, "c1", rec)
    rec.wait_for(lambda e: e[0] == "changed")
    server.set_resources(CDS, {"c1": cluster("c1", 2)})
    rec.wait_for(lambda e: e == ("changed", "c1", 2))
    server.set_resources(CDS, {"c1": cluster("c1", 2)})  # same bytes, version 3
    server.wait_for_ack(CDS, "3")
    assert rec.values() == [1, 2]


def test_nack_keeps_last_good_then_recovers(server: XdsTestServer, client: XdsClient) -> None:
    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    rec = WatchRecorder()
    client.watch(CLUSTER, "c1", rec)
    server.wait_for_ack(CDS, "1")
    server.set_resources(CDS, {"c1": cluster("c1", -5)})
    nack = server.wait_for_nack(CDS)
    assert nack.request.version_info == "1"  # the previous good version
    assert nack.request.response_nonce
    assert nack.request.error_detail.code == 3  # INVALID_ARGUMENT
    assert "Cluster 'c1'" in nack.request.error_detail.message
    assert "connect_timeout" in nack.request.error_detail.message
    event = rec.wait_for(lambda e: e[0] == "ambient_error")
    assert "connect_timeout" in event[2]
    (status,) = client.resource_statuses()
    assert (status.status, status.value, status.failed_version) == ("NACKED", 1, "2")
    assert status.error is not None and "connect_timeout" in status.error
    server.set_resources(CDS, {"c1": cluster("c1", 3)})
    rec.wait_for(lambda e: e == ("changed", "c1", 3))
    server.wait_for_ack(CDS, "3")
    assert "does_not_exist" not in rec.kinds()
    assert client.resource_statuses()[0].status == "ACKED"


def test_partial_nack_accepts_the_good_resources(server: XdsTestServer, client: XdsClient) -> None:
    server.set_resources(CDS, {"good": cluster("good", 1), "bad": cluster("bad", 1)})
    good, bad = WatchRecorder(), WatchRecorder()
    client.watch(CLUSTER, "good", good)
    client.watch(CLUSTER, "bad", bad)
    server.wait_for_ack(CDS, "1", start=0)
    wait_until(lambda: good.values() == [1] and bad.values() == [1])
    server.set_resources(CDS, {"good": cluster("good", 2), "bad": cluster("bad", -1)})
    nack = server.wait_for_nack(CDS)
    assert "'bad'" in nack.request.error_detail.message
    assert "'good'" not in nack.request.error_detail.message
    good.wait_for(lambda e: e == ("changed", "good", 2))
    bad.wait_for(lambda e: e[0] == "ambient_error")
    assert bad.values() == [1]


def test_removal_from_cds_is_a_deletion(server: XdsTestServer, client: XdsClient) -> None:
    server.set_resources(CDS, {"c1": cluster("c1", 1), "c2": cluster("c2", 1)})
    rec = WatchRecorder()
    client.watch(CLUSTER, "c1", rec)
    rec.wait_for(lambda e: e[0] == "changed")
    server.remove_resources(CDS, ["c1"])
    rec.wait_for(lambda e: e == ("does_not_exist", "c1"))
    assert client.resource_statuses()[0].status == "DOES_NOT_EXIST"
    server.set_resources(CDS, {"c1": cluster("c1", 4)})
    rec.wait_for(lambda e: e == ("changed", "c1", 4))


def test_ignore_resource_deletion_keeps_the_resource(
    server: XdsTestServer, clock: FakeClock
) -> None:
    bootstrap = server.bootstrap(server_features=["xds_v3", "ignore_resource_deletion"])
    with XdsClient(bootstrap, clock=clock, decoder=decode_cluster) as client:
        server.set_resources(CDS, {"c1": cluster("c1", 1)})
        rec = WatchRecorder()
        client.watch(CLUSTER, "c1", rec)
        rec.wait_for(lambda e: e[0] == "changed")
        server.remove_resources(CDS, ["c1"])
        server.wait_for_ack(CDS, "2")
        assert rec.kinds() == ["changed"]
        assert client.resource_statuses()[0].value == 1


def test_second_watcher_gets_the_cached_value_and_cancel_unsubscribes(
    server: XdsTestServer, client: XdsClient
) -> None:
    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    first, second = WatchRecorder(), WatchRecorder()
    cancel_first = client.watch(CLUSTER, "c1", first)
    server.wait_for_ack(CDS, "1")
    count = len(server.requests)
    cancel_second = client.watch(CLUSTER, "c1", second)
    assert second.wait_for(lambda e: e[0] == "changed") == ("changed", "c1", 1)
    cancel_first()
    cancel_second()
    unsub = server.wait_for_request(lambda r: list(r.request.resource_names) == [], start=count)
    assert unsub.request.version_info == "1"
    assert len([r for r in server.requests[count:] if r.type_url == CDS]) == 1
    server.set_resources(CDS, {"c1": cluster("c1", 2)})
    time.sleep(0.2)
    assert first.values() == [1] and second.values() == [1]


def test_subscriptions_widen_in_one_request(server: XdsTestServer, client: XdsClient) -> None:
    server.set_resources(CDS, {f"c{i}": cluster(f"c{i}", i) for i in range(20)})
    recs = [WatchRecorder() for _ in range(20)]

    def watch_all() -> None:  # from the serializer: one task, one request
        for i, rec in enumerate(recs):
            client.watch(CLUSTER, f"c{i}", rec)

    client.run_in_serializer(watch_all)
    for i, rec in enumerate(recs):
        assert rec.wait_for(lambda e: e[0] == "changed")[2] == i
    subs = [r for r in server.requests if r.type_url == CDS and not r.request.response_nonce]
    assert len(subs) == 1
    assert len(subs[0].request.resource_names) == 20


def test_does_not_exist_after_15s_on_the_fake_clock(
    server: XdsTestServer, clock: FakeClock, client: XdsClient
) -> None:
    rec = WatchRecorder()
    client.watch(ResourceType.CLUSTER_LOAD_ASSIGNMENT, "missing", rec)
    server.wait_for_request(lambda r: r.type_url == EDS)
    clock.advance(14.9)
    assert rec.events == []
    clock.advance(0.2)
    assert rec.events == [("does_not_exist", "missing")]


def test_does_not_exist_timer_is_paused_while_disconnected(clock: FakeClock) -> None:
    server = XdsTestServer(port=free_port())  # never started: connection refused
    client = XdsClient(server.bootstrap(), clock=clock, decoder=decode_cluster)
    try:
        rec = WatchRecorder()
        client.watch(CLUSTER, "c1", rec)
        rec.wait_for(lambda e: e[0] == "ambient_error")
        for _ in range(5):
            clock.advance(10)
        assert "does_not_exist" not in rec.kinds()
        assert not client.connection_state().connected
        assert client.connection_state().last_error
    finally:
        client.close()


def test_server_restart_is_invisible_to_watchers(
    server: XdsTestServer, clock: FakeClock, client: XdsClient
) -> None:
    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    rec = WatchRecorder()
    client.watch(CLUSTER, "c1", rec)
    server.wait_for_ack(CDS, "1")
    count = len(server.requests)
    server.stop()
    wait_until(lambda: not client.connection_state().connected)
    assert client.resource_statuses()[0].value == 1  # last good stays served
    server.start()  # same port, same resources (version 1)
    advance_until(clock, lambda: client.connection_state().connected)
    resub = server.wait_for_request(lambda r: r.type_url == CDS, start=count)
    assert resub.request.version_info == "1"  # we tell the server what we have
    assert list(resub.request.resource_names) == ["c1"]
    server.wait_for_ack(CDS, "1", start=count)
    assert "does_not_exist" not in rec.kinds()
    assert rec.values() == [1]


def test_stream_killed_after_response_reconnects_at_once(
    server: XdsTestServer, client: XdsClient
) -> None:
    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    rec = WatchRecorder()
    client.watch(CLUSTER, "c1", rec)
    server.wait_for_ack(CDS, "1")
    count = len(server.requests)
    server.kill_streams()
    # no clock advance: a stream that had responses restarts immediately
    server.wait_for_request(lambda r: r.type_url == CDS, start=count)
    server.set_resources(CDS, {"c1": cluster("c1", 2)})
    rec.wait_for(lambda e: e == ("changed", "c1", 2))
    assert rec.kinds() == ["changed", "changed"]


def test_fallback_to_second_server_and_back(clock: FakeClock) -> None:
    primary = XdsTestServer(port=free_port())  # down at first
    with XdsTestServer() as secondary:
        secondary.set_resources(CDS, {"c1": cluster("c1", 2)})
        primary.set_resources(CDS, {"c1": cluster("c1", 1)})
        bootstrap = primary.bootstrap(extra_servers=[secondary.address])
        with XdsClient(bootstrap, clock=clock, decoder=decode_cluster) as client:
            rec = WatchRecorder()
            client.watch(CLUSTER, "c1", rec)
            assert rec.wait_for(lambda e: e[0] == "changed") == ("changed", "c1", 2)
            assert client.connection_state().server_uri == secondary.address
            primary.start()
            try:
                advance_until(clock, lambda: rec.values() == [2, 1])
                assert client.connection_state().server_uri == primary.address
                wait_until(lambda: secondary.active_streams == 0)
                assert "does_not_exist" not in rec.kinds()
            finally:
                primary.stop()


def test_delta_fetch_update_and_removal(server: XdsTestServer, clock: FakeClock) -> None:
    bootstrap = server.bootstrap(server_features=["xds_v3", "pymesh.delta"])
    with XdsClient(bootstrap, clock=clock, decoder=decode_cluster) as client:
        server.set_resources(CDS, {"c1": cluster("c1", 1), "c2": cluster("c2", 1)})
        rec = WatchRecorder()
        client.watch(CLUSTER, "c1", rec)
        assert rec.wait_for(lambda e: e[0] == "changed") == ("changed", "c1", 1)
        first = server.requests[0]
        assert first.delta and list(first.request.resource_names_subscribe) == ["c1"]
        server.wait_for_ack(CDS, "")
        server.set_resources(CDS, {"c1": cluster("c1", -1)})
        nack = server.wait_for_nack(CDS)
        assert "connect_timeout" in nack.request.error_detail.message
        server.set_resources(CDS, {"c1": cluster("c1", 2)})
        rec.wait_for(lambda e: e == ("changed", "c1", 2))
        server.remove_resources(CDS, ["c1"])
        rec.wait_for(lambda e: e == ("does_not_exist", "c1"))


def test_delta_reconnect_sends_initial_resource_versions(
    server: XdsTestServer, clock: FakeClock
) -> None:
    with XdsClient(server.bootstrap(), clock=clock, decoder=decode_cluster, delta=True) as client:
        server.set_resources(CDS, {"c1": cluster("c1", 1)})
        rec = WatchRecorder()
        client.watch(CLUSTER, "c1", rec)
        rec.wait_for(lambda e: e[0] == "changed")
        server.wait_for_ack(CDS, "")
        count = len(server.requests)
        server.kill_streams()
        again = server.wait_for_request(lambda r: r.type_url == CDS, start=count)
        assert dict(again.request.initial_resource_versions)  # we hold c1 at some version
        assert list(again.request.resource_names_subscribe) == ["c1"]
        time.sleep(0.2)
        assert rec.kinds() == ["changed"]  # nothing resent, nothing visible


def test_watcher_exception_is_isolated(server: XdsTestServer, client: XdsClient) -> None:
    class Boom(WatchRecorder):
        def on_resource_changed(self, rtype: object, name: str, value: object) -> None:
            super().on_resource_changed(rtype, name, value)
            raise RuntimeError("watcher bug")

    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    boom, ok = Boom(), WatchRecorder()
    client.watch(CLUSTER, "c1", boom)
    client.watch(CLUSTER, "c1", ok)
    ok.wait_for(lambda e: e[0] == "changed")
    server.set_resources(CDS, {"c1": cluster("c1", 2)})
    ok.wait_for(lambda e: e == ("changed", "c1", 2))
    boom.wait_for(lambda e: e == ("changed", "c1", 2))


def test_garbage_resources_are_nacked(server: XdsTestServer, client: XdsClient) -> None:
    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    rec = WatchRecorder()
    client.watch(CLUSTER, "c1", rec)
    server.wait_for_ack(CDS, "1")
    server.push_raw(CDS, [(CDS, b"\xff\xff\xff")], version="junk")
    nack = server.wait_for_nack(CDS)
    assert nack.request.version_info == "1"
    server.push_raw("type.googleapis.com/some.Unknown", [], version="x")
    server.wait_for_nack("type.googleapis.com/some.Unknown")
    server.set_resources(CDS, {"c1": cluster("c1", 7)})
    rec.wait_for(lambda e: e == ("changed", "c1", 7))


def test_create_and_close_50_clients_leaks_no_thread(server: XdsTestServer) -> None:
    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    bootstrap = server.bootstrap()

    def cycle() -> None:
        client = XdsClient(bootstrap, clock=FakeClock(), decoder=decode_cluster)
        rec = WatchRecorder()
        client.watch(CLUSTER, "c1", rec)
        rec.wait_for(lambda e: e[0] == "changed")
        client.close()

    cycle()  # warm grpc's own process-wide threads
    time.sleep(0.2)
    before = threading.active_count()
    for _ in range(50):
        cycle()
    wait_until(lambda: threading.active_count() <= before + 2, timeout=10)
    names = [t.name for t in threading.enumerate()]
    assert not any(n.startswith(("pymesh-xds-", "pymesh-xds-reader")) for n in names), names


# -- the real decoders -------------------------------------------------------------------------

EDS_TYPE = ResourceType.CLUSTER_LOAD_ASSIGNMENT


def cla(name: str, port: int = 8080, overprovisioning: int | None = None) -> bytes:
    msg = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    loc = msg.endpoints.add()
    loc.locality.zone = "z1"
    loc.load_balancing_weight.value = 1
    lb = loc.lb_endpoints.add()
    lb.endpoint.address.socket_address.address = "10.0.0.1"
    lb.endpoint.address.socket_address.port_value = port
    if overprovisioning is not None:
        msg.policy.overprovisioning_factor.value = overprovisioning
    return bytes(msg.SerializeToString())


@pytest.fixture
def real_client(server: XdsTestServer, clock: FakeClock) -> Iterator[XdsClient]:
    c = XdsClient(server.bootstrap(), clock=clock)  # default decoder: pymesh.xds.codec
    yield c
    c.close()


def test_real_eds_decoder_fetch_and_nack_names_the_field(
    server: XdsTestServer, real_client: XdsClient
) -> None:
    server.set_resources(EDS, {"e1": cla("e1")})
    rec = WatchRecorder()
    real_client.watch(EDS_TYPE, "e1", rec)
    value = rec.wait_for(lambda e: e[0] == "changed")[2]
    assert value.cluster_name == "e1"
    assert value.localities[0].endpoints[0].address.port == 8080
    server.set_resources(EDS, {"e1": cla("e1", overprovisioning=0)})
    nack = server.wait_for_nack(EDS)
    message = nack.request.error_detail.message
    assert "ClusterLoadAssignment 'e1'" in message
    assert "policy.overprovisioning_factor" in message
    assert rec.values() == [value]


def test_mutated_resources_through_the_client(
    server: XdsTestServer, real_client: XdsClient
) -> None:
    good = cla("e1", port=9000)
    server.set_resources(EDS, {"e1": good})
    rec = WatchRecorder()
    real_client.watch(EDS_TYPE, "e1", rec)
    good_value = rec.wait_for(lambda e: e[0] == "changed")[2]

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        out = bytearray(good)
        for _ in range(data.draw(st.integers(1, 3))):
            pos = data.draw(st.integers(0, len(out) - 1))
            out[pos] ^= data.draw(st.integers(1, 255))
        count = len(server.requests)
        events = len(rec.events)
        server.set_resources(EDS, {"e1": bytes(out)})
        answer = server.wait_for_request(
            lambda r: r.type_url == EDS and bool(r.request.response_nonce), start=count
        )
        (status,) = real_client.resource_statuses()
        if answer.is_nack:
            assert status.value == good_value or status.status == "ACKED"
            assert all(e[0] == "ambient_error" for e in rec.events[events:])
        assert "does_not_exist" not in rec.kinds()
        # back to the good resource: the client still works
        count = len(server.requests)
        version = server.set_resources(EDS, {"e1": good})
        server.wait_for_ack(EDS, version, start=count)
        assert real_client.resource_statuses()[0].value == good_value

    run()
    assert real_client.connection_state().connected


# -- targets, credentials, authorities, the process-wide client ---------------------------------


def test_unix_socket_server(tmp_path: Path, clock: FakeClock) -> None:
    with XdsTestServer(unix_path=str(tmp_path / "xds.sock")) as server:
        server.set_resources(CDS, {"c1": cluster("c1", 1)})
        assert server.address.startswith("unix:")
        with XdsClient(server.bootstrap(), clock=clock, decoder=decode_cluster) as client:
            rec = WatchRecorder()
            client.watch(CLUSTER, "c1", rec)
            assert rec.wait_for(lambda e: e[0] == "changed") == ("changed", "c1", 1)


def _tls_files(tmp_path: Path) -> tuple[tuple[bytes, bytes], Path]:
    """A CA and a server certificate for 127.0.0.1; returns ((key, chain), ca file)."""
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test ca"))
        .issuer_name(name("test ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("xds"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    return (key_pem, cert.public_bytes(pem)), ca_file


def test_tls_channel_credentials(tmp_path: Path, clock: FakeClock) -> None:
    identity, ca_file = _tls_files(tmp_path)
    with XdsTestServer(tls=identity) as server:
        server.set_resources(CDS, {"c1": cluster("c1", 1)})
        creds = {"type": "tls", "config": {"ca_certificate_file": str(ca_file)}}
        bootstrap = server.bootstrap(channel_creds=creds)
        with XdsClient(bootstrap, clock=clock, decoder=decode_cluster) as client:
            rec = WatchRecorder()
            client.watch(CLUSTER, "c1", rec)
            assert rec.wait_for(lambda e: e[0] == "changed") == ("changed", "c1", 1)
        # the same server with insecure credentials cannot be used
        with XdsClient(server.bootstrap(), clock=clock, decoder=decode_cluster) as client:
            rec = WatchRecorder()
            client.watch(CLUSTER, "c1", rec)
            rec.wait_for(lambda e: e[0] == "ambient_error")
            assert rec.values() == []


def test_missing_tls_file_is_a_connection_error_not_a_crash(
    tmp_path: Path, clock: FakeClock
) -> None:
    server = XdsTestServer(port=free_port())
    creds = {"type": "tls", "config": {"ca_certificate_file": str(tmp_path / "nope.pem")}}
    with XdsClient(
        server.bootstrap(channel_creds=creds), clock=clock, decoder=decode_cluster
    ) as client:
        rec = WatchRecorder()
        client.watch(CLUSTER, "c1", rec)
        event = rec.wait_for(lambda e: e[0] == "ambient_error")
        assert "nope.pem" in event[2]
        assert "nope.pem" in (client.connection_state().last_error or "")


def test_authorities_get_their_own_stream(server: XdsTestServer, clock: FakeClock) -> None:
    with XdsTestServer() as other:
        data = server.bootstrap_dict()
        data["authorities"] = {
            "other.example": {
                "xds_servers": [
                    {"server_uri": other.address, "channel_creds": [{"type": "insecure"}]}
                ]
            }
        }
        bootstrap = parse_bootstrap(json.dumps(data), source="test")
        xdstp = "xdstp://other.example/envoy.config.cluster.v3.Cluster/c2"
        server.set_resources(CDS, {"c1": cluster("c1", 1)})
        other.set_resources(CDS, {xdstp: cluster(xdstp, 2)})
        with XdsClient(bootstrap, clock=clock, decoder=decode_cluster) as client:
            rec1, rec2 = WatchRecorder(), WatchRecorder()
            client.watch(CLUSTER, "c1", rec1)
            client.watch(CLUSTER, xdstp, rec2)
            assert rec1.wait_for(lambda e: e[0] == "changed")[2] == 1
            assert rec2.wait_for(lambda e: e[0] == "changed")[2] == 2
            assert all(xdstp not in r.request.resource_names for r in server.requests)
            assert len(client.connection_states()) == 2
            with pytest.raises(BootstrapError):
                client.watch(CLUSTER, "xdstp://unknown/envoy.config.cluster.v3.Cluster/x", rec1)


def test_shared_client_from_the_environment(
    server: XdsTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", json.dumps(server.bootstrap_dict()))
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP", raising=False)
    monkeypatch.setattr(XdsClient, "_shared", None)
    client = get_client()
    try:
        assert XdsClient.shared() is client
        assert client.bootstrap.xds_servers[0].uri == server.address
    finally:
        client.close()
    assert get_client() is not client  # a closed shared client is replaced
    get_client().close()


def test_no_fallback_while_everything_is_cached_then_fallback_for_a_new_resource(
    clock: FakeClock,
) -> None:
    """gRFC A71: fall back only if the primary is unreachable *and* a watched resource is
    not cached."""
    with XdsTestServer() as primary, XdsTestServer() as secondary:
        primary.set_resources(CDS, {"c1": cluster("c1", 1)})
        secondary.set_resources(CDS, {"c1": cluster("c1", 1), "c2": cluster("c2", 2)})
        bootstrap = primary.bootstrap(extra_servers=[secondary.address])
        with XdsClient(bootstrap, clock=clock, decoder=decode_cluster) as client:
            rec = WatchRecorder()
            client.watch(CLUSTER, "c1", rec)
            rec.wait_for(lambda e: e[0] == "changed")
            primary.stop()
            rec.wait_for(lambda e: e[0] == "ambient_error")  # the retry failed: no fallback
            assert client.connection_state().server_uri == primary.address
            assert secondary.requests == []
            rec2 = WatchRecorder()
            client.watch(CLUSTER, "c2", rec2)  # not cached: now fall back
            assert rec2.wait_for(lambda e: e[0] == "changed") == ("changed", "c2", 2)
            assert client.connection_state().server_uri == secondary.address
            secondary.set_resources(CDS, {"c1": cluster("c1", 5)})
            rec.wait_for(lambda e: e == ("changed", "c1", 5))
            assert "does_not_exist" not in rec.kinds()


def test_close_from_a_callback(server: XdsTestServer, clock: FakeClock) -> None:
    client = XdsClient(server.bootstrap(), clock=clock, decoder=decode_cluster)
    closed = threading.Event()

    class Closer(WatchRecorder):
        def on_resource_changed(self, rtype: object, name: str, value: object) -> None:
            client.close()
            closed.set()

    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    client.watch(CLUSTER, "c1", Closer())
    assert closed.wait(10)
    wait_until(lambda: not any(t.name.startswith("pymesh-xds-") for t in threading.enumerate()))
    with pytest.raises(XdsError):
        client.watch(CLUSTER, "c1", WatchRecorder())
    assert client.resource_statuses() == []


def test_new_watcher_hears_at_once_that_the_servers_are_down(clock: FakeClock) -> None:
    server = XdsTestServer(port=free_port())  # never started
    with XdsClient(server.bootstrap(), clock=clock, decoder=decode_cluster) as client:
        first = WatchRecorder()
        client.watch(CLUSTER, "c1", first)
        first.wait_for(lambda e: e[0] == "ambient_error")
        second = WatchRecorder()
        client.watch(CLUSTER, "c2", second)  # the group is waiting out its backoff
        event = second.wait_for(lambda e: e[0] == "ambient_error")
        assert "cannot connect" in event[2]


def test_watch_from_a_callback_is_requested_after_the_ack(
    server: XdsTestServer, client: XdsClient
) -> None:
    """A watcher that widens the subscription while its response is handled (as the
    dependency manager does for clusters) must not be narrowed back by that response's ACK."""
    server.set_resources(CDS, {"a": cluster("a", 1), "b": cluster("b", 2)})
    rec_b = WatchRecorder()

    class Widen(WatchRecorder):
        def on_resource_changed(self, rtype: object, name: str, value: object) -> None:
            super().on_resource_changed(rtype, name, value)
            client.watch(CLUSTER, "b", rec_b)

    client.watch(CLUSTER, "a", Widen())
    assert rec_b.wait_for(lambda e: e[0] == "changed") == ("changed", "b", 2)
    server.wait_for_request(lambda r: r.type_url == CDS and r.request.response_nonce == "2")
    cds = [r.request for r in server.requests if r.type_url == CDS]
    assert [list(r.resource_names) for r in cds] == [["a"], ["a"], ["a", "b"], ["a", "b"]]
    assert [r.response_nonce for r in cds] == ["", "1", "1", "2"]  # ACK, widen, ACK


def test_resource_wrappers_in_sotw(clock: FakeClock) -> None:
    with XdsTestServer(wrap_in_resource=True) as server:
        server.set_resources(CDS, {"c1": cluster("c1", 1)})
        with XdsClient(server.bootstrap(), clock=clock, decoder=decode_cluster) as client:
            rec = WatchRecorder()
            client.watch(CLUSTER, "c1", rec)
            assert rec.wait_for(lambda e: e[0] == "changed") == ("changed", "c1", 1)
            server.wait_for_ack(CDS, "1")
            first = server.requests[0].request
            assert "xds.config.resource-in-sotw" in first.node.client_features


# -- against pymesh's own control plane (a real istiod-shaped xDS server) -----------------------


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_against_the_embedded_control_plane(bookinfo_dir: Path, delta: bool) -> None:
    from pymesh.bootstrap import generate_bootstrap
    from pymesh.controlplane import ControlPlane

    reviews = "outbound|9080||reviews.default.svc.cluster.local"
    config = bookinfo_dir / "platform" / "kube" / "bookinfo.yaml"
    with ControlPlane([config], xds_address="127.0.0.1:0", admin_port=None) as cp:
        data = generate_bootstrap(xds_address=cp.address, workload="productpage-v1")
        bootstrap = parse_bootstrap(json.dumps(data), source="generated")
        with XdsClient(bootstrap, delta=delta) as client:  # real decoders, real time
            recs = {rtype: WatchRecorder() for rtype in (CLUSTER, EDS_TYPE)}
            for rtype, rec in recs.items():
                client.watch(rtype, reviews, rec)
            cluster_value = recs[CLUSTER].wait_for(lambda e: e[0] == "changed")[2]
            endpoints = recs[EDS_TYPE].wait_for(lambda e: e[0] == "changed")[2]
            assert cluster_value.name == reviews
            assert endpoints.cluster_name == reviews
            wait_until(
                lambda: all(s.status == "ACKED" for s in client.resource_statuses()), timeout=10
            )


def test_soak_restarts_and_pushes_never_show_a_deletion(
    server: XdsTestServer, clock: FakeClock, client: XdsClient
) -> None:
    names = [f"c{i}" for i in range(20)]
    server.set_resources(CDS, {n: cluster(n, 1) for n in names})
    recs = {n: WatchRecorder() for n in names}
    for n, rec in recs.items():
        client.watch(CLUSTER, n, rec)
    for rec in recs.values():
        rec.wait_for(lambda e: e[0] == "changed")
    for round_ in range(2, 32):
        server.set_resources(CDS, {n: cluster(n, round_) for n in names})
        if round_ % 3 == 0:
            server.kill_streams()
        if round_ % 5 == 0:
            server.stop()
            server.start()
        if round_ % 7 == 0:  # a bad push in between
            server.set_resources(CDS, {"c0": cluster("c0", -1)})
            server.set_resources(CDS, {"c0": cluster("c0", round_)})

        def all_at(r: int = round_) -> bool:
            return all(rec.values() and rec.values()[-1] == r for rec in recs.values())

        advance_until(clock, all_at, step=0.5)
    for rec in recs.values():
        assert "does_not_exist" not in rec.kinds()
    assert all(s.status == "ACKED" for s in client.resource_statuses())


def test_reconnect_waits_for_the_backoff_on_the_fake_clock(clock: FakeClock) -> None:
    server = XdsTestServer(port=free_port())  # down: the first attempt fails
    server.set_resources(CDS, {"c1": cluster("c1", 1)})
    with XdsClient(server.bootstrap(), clock=clock, decoder=decode_cluster) as client:
        rec = WatchRecorder()
        client.watch(CLUSTER, "c1", rec)
        rec.wait_for(lambda e: e[0] == "ambient_error")
        server.start()
        try:
            clock.advance(0.75)  # the first backoff is 1 s +/- 20 %: too early
            time.sleep(0.3)
            assert rec.values() == [] and server.requests == []
            clock.advance(0.5)  # 1.25 s: past any jitter
            assert rec.wait_for(lambda e: e[0] == "changed") == ("changed", "c1", 1)
        finally:
            server.stop()


def test_a_process_using_the_shared_client_exits_cleanly(
    server: XdsTestServer, python_exe: str
) -> None:
    server.set_resources(EDS, {"e1": cla("e1")})
    code = (
        "from pymesh.xds.client import get_client\n"
        "from pymesh.xds.resource_types import ResourceType\n"
        "from tests.xdsserver import WatchRecorder\n"
        "rec = WatchRecorder()\n"
        "get_client().watch(ResourceType.CLUSTER_LOAD_ASSIGNMENT, 'e1', rec)\n"
        "print(rec.wait_for(lambda e: True)[0])\n"
    )
    env = {
        **os.environ,
        "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(server.bootstrap_dict()),
        "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
    }
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    out = subprocess.run(
        [python_exe, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "changed"
    assert "Traceback" not in out.stderr and "Exception" not in out.stderr, out.stderr


def test_does_not_exist_timer_resumes_after_an_outage(
    server: XdsTestServer, clock: FakeClock
) -> None:
    backoff, rng = Backoff(), random.Random(7)
    delays = [backoff.next_delay(rng) for _ in range(2)]  # what the client will draw
    client = XdsClient(
        server.bootstrap(), clock=clock, decoder=decode_cluster, rng=random.Random(7)
    )
    try:
        rec = WatchRecorder()
        client.watch(EDS_TYPE, "missing", rec)
        server.wait_for_request(lambda r: r.type_url == EDS)
        clock.advance(10)  # 10 of the 15 s pass while connected
        server.stop()
        rec.wait_for(lambda e: e[0] == "ambient_error")  # retry in delays[0]
        clock.advance(100)  # disconnected: does not count; one retry, failing
        wait_until(lambda: rec.kinds().count("ambient_error") == 2)  # next in delays[1]
        server.start()
        clock.advance(delays[1] - 0.05)
        assert not client.connection_state().connected
        clock.advance(0.1)  # the retry: connects, resends, the timer resumes with 5 s
        wait_until(lambda: client.connection_state().connected)
        clock.advance(4.9)
        assert "does_not_exist" not in rec.kinds()
        clock.advance(0.2)
        assert rec.events[-1] == ("does_not_exist", "missing")
    finally:
        client.close()
