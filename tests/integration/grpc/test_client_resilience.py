"""Mesh policies on gRPC calls end to end (real grpcio servers, the embedded control plane):
failover, retries on UNAVAILABLE, circuit breaking, route timeouts, faults, a weight change
mid-traffic, subchannels closed when EDS drops an endpoint, and where pymesh goes beyond
grpcio's C-core: LEAST_REQUEST and consecutive-5xx outlier ejection on gRPC statuses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc
import grpc.aio
import pytest

import pymesh.grpc
import pymesh.grpc.aio
from pymesh.grpc import MeshRpcError
from tests.integration.grpc._client_mesh import (
    HOST,
    STREAM,
    TARGET,
    WHO,
    EchoServer,
    GrpcMesh,
    echo_servers,
    grpc_mesh,
    mesh_yaml,
    wait_until,
)

__all__ = ["echo_servers", "grpc_mesh"]

Servers = Callable[[str], EchoServer]


def split(v1: int, *, extra: str = "") -> str:
    return f"""\
http:
- {extra}route:
  - destination: {{host: {HOST}, subset: v1}}
    weight: {v1}
  - destination: {{host: {HOST}, subset: v2}}
    weight: {100 - v1}
"""


def test_failover_when_an_endpoint_dies(grpc_mesh: GrpcMesh, echo_servers: Servers) -> None:
    a, b = echo_servers("v1"), echo_servers("v2")
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}))
    grpc_mesh.start()
    with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
        who = channel.unary_unary(WHO)
        assert Counter(who(b"x", timeout=10) for _ in range(20)) == {b"v1": 10, b"v2": 10}
        a.stop()  # the endpoint dies; EDS still lists it
        # Istio's default retry policy (connect-failure, previous hosts) fails over.
        seen = Counter(who(b"x", timeout=10) for _ in range(100))
        assert seen == {b"v2": 100}


def test_retries_on_unavailable(grpc_mesh: GrpcMesh, echo_servers: Servers) -> None:
    a, b = echo_servers("v1"), echo_servers("v2")
    a.fail_code = grpc.StatusCode.UNAVAILABLE  # every call on v1 answers UNAVAILABLE
    retries = "  retries: {attempts: 3, retryOn: unavailable}\n"
    vs = f"http:\n- route:\n  - destination: {{host: {HOST}}}\n{retries}"
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}, virtual_service=vs))
    grpc_mesh.start()
    with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
        who = channel.unary_unary(WHO)
        assert all(who(b"x", timeout=10) == b"v2" for _ in range(60))
        assert a.count > 10  # v1 was tried and its UNAVAILABLE retried away
        # Without retries the same failures reach the caller as grpcio's UNAVAILABLE.
        vs = f"http:\n- route:\n  - destination: {{host: {HOST}}}\n  retries: {{attempts: 0}}\n"
        grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}, virtual_service=vs))
        errors: Counter[grpc.StatusCode] = Counter()

        def failing() -> bool:
            errors.clear()
            for _ in range(20):
                try:
                    who(b"x", timeout=10)
                except grpc.RpcError as error:
                    errors[error.code()] += 1
            return errors[grpc.StatusCode.UNAVAILABLE] >= 5

        wait_until(failing, 10, "retries disabled")
        assert set(errors) == {grpc.StatusCode.UNAVAILABLE}


def test_circuit_breaker_overflow(grpc_mesh: GrpcMesh, echo_servers: Servers) -> None:
    a = echo_servers("v1")
    a.delay = 0.4
    dr = "trafficPolicy:\n  connectionPool:\n    http: {http2MaxRequests: 2}\n"
    vs = f"http:\n- route:\n  - destination: {{host: {HOST}}}\n  retries: {{attempts: 0}}\n"
    grpc_mesh.write(mesh_yaml({"v1": a.port}, destination_rule=dr, virtual_service=vs))
    grpc_mesh.start()
    with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
        who = channel.unary_unary(WHO)
        who(b"x", timeout=10)  # config loaded, connection up
        futures = [who.future(b"x", timeout=10) for _ in range(8)]
        ok, overflow = 0, 0
        for f in futures:
            try:
                f.result(10)
                ok += 1
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.UNAVAILABLE
                assert isinstance(error, MeshRpcError) and error.result is not None
                assert "UO" in error.result.flags
                overflow += 1
        assert ok >= 2 and overflow >= 1 and ok + overflow == 8
        assert a.max_active <= 2


def test_route_timeout_and_faults(grpc_mesh: GrpcMesh, echo_servers: Servers) -> None:
    a = echo_servers("v1")
    vs = f"""\
http:
- match: [{{headers: {{x-case: {{exact: abort}}}}}}]
  fault: {{abort: {{grpcStatus: RESOURCE_EXHAUSTED, percentage: {{value: 100}}}}}}
  route: [{{destination: {{host: {HOST}}}}}]
- match: [{{headers: {{x-case: {{exact: http-abort}}}}}}]
  fault: {{abort: {{httpStatus: 403, percentage: {{value: 100}}}}}}
  route: [{{destination: {{host: {HOST}}}}}]
- match: [{{headers: {{x-case: {{exact: delay}}}}}}]
  fault: {{delay: {{fixedDelay: 0.3s, percentage: {{value: 100}}}}}}
  route: [{{destination: {{host: {HOST}}}}}]
- route: [{{destination: {{host: {HOST}}}}}]
  timeout: 0.25s
"""
    grpc_mesh.write(mesh_yaml({"v1": a.port}, virtual_service=vs))
    grpc_mesh.start()
    with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
        who = channel.unary_unary(WHO)
        with pytest.raises(grpc.RpcError) as info:
            who(b"x", metadata=[("x-case", "abort")], timeout=10)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as info:
            who(b"x", metadata=[("x-case", "http-abort")], timeout=10)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED  # 403 per the mapping
        before = a.count
        start = time.monotonic()
        assert who(b"x", metadata=[("x-case", "delay")], timeout=10) == b"v1"
        assert 0.28 <= time.monotonic() - start < 2.0
        assert a.count == before + 1  # aborts never reached the server
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            who(b"x", metadata=[("x-sleep-ms", "1500")], timeout=10)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # the route's 0.25 s
        assert time.monotonic() - start < 1.2
        assert isinstance(info.value, MeshRpcError) and info.value.result is not None
        # Istio sends a gRPC route's timeout as max_stream_duration: Envoy's flag is DT.
        assert {"UT", "DT"} & set(info.value.result.flags)


def test_weight_change_mid_traffic_and_subchannel_removal(
    grpc_mesh: GrpcMesh, echo_servers: Servers
) -> None:
    a, b = echo_servers("v1"), echo_servers("v2")
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}, virtual_service=split(100)))
    grpc_mesh.start()
    channel = pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client)
    assert isinstance(channel, pymesh.grpc.MeshChannel)
    who = channel.unary_unary(WHO)
    seen: list[bytes] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                seen.append(who(b"x", timeout=10))
            except grpc.RpcError as error:
                errors.append(error)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        wait_until(lambda: len(seen) >= 50, 10, "traffic")
        assert set(seen) == {b"v1"}
        grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}, virtual_service=split(0)))
        wait_until(lambda: seen[-20:] == [b"v2"] * 20, 10, "the new weights")
        # EDS drops v1: its subchannel is closed (after the grace period for calls on it).
        only_v2 = f"http:\n- route:\n  - destination: {{host: {HOST}, subset: v2}}\n"
        grpc_mesh.write(mesh_yaml({"v2": b.port}, virtual_service=only_v2))
        key = f"127.0.0.1:{a.port}"
        wait_until(lambda: key not in channel._pool.endpoint_keys(), 10, "subchannel removal")
    finally:
        stop.set()
        thread.join(10)
        channel.close()
    assert errors == []


def test_least_request_prefers_the_idle_endpoint(
    grpc_mesh: GrpcMesh, echo_servers: Servers
) -> None:
    # grpcio's C-core rejects LEAST_REQUEST clusters; pymesh balances by active requests.
    a, b, c = echo_servers("v1"), echo_servers("v2"), echo_servers("v3")
    a.delay = 0.3
    dr = "trafficPolicy:\n  loadBalancer: {simple: LEAST_REQUEST}\n"
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port, "v3": c.port}, destination_rule=dr))
    grpc_mesh.start()
    with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
        who = channel.unary_unary(WHO)
        who(b"x", timeout=10)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = Counter(pool.map(lambda _: who(b"x", timeout=10), range(90)))
        # Round robin would give the slow v1 a third (30); power-of-two-choices on active
        # requests leaves it about one pick in nine while it is busy.
        assert answers[b"v1"] <= 20, answers


def test_outlier_ejection_on_grpc_status(grpc_mesh: GrpcMesh, echo_servers: Servers) -> None:
    # C-core's outlier detection has no consecutive-5xx; pymesh maps gRPC statuses to HTTP
    # as Envoy does (UNAVAILABLE -> 503, INTERNAL -> 500) and ejects.
    a, b = echo_servers("v1"), echo_servers("v2")
    a.fail_code = grpc.StatusCode.INTERNAL
    dr = (
        "trafficPolicy:\n  outlierDetection:\n"
        "    {consecutive5xxErrors: 3, interval: 10s, baseEjectionTime: 60s, "
        "maxEjectionPercent: 100}\n"
    )
    vs = f"http:\n- route:\n  - destination: {{host: {HOST}}}\n  retries: {{attempts: 0}}\n"
    grpc_mesh.write(
        mesh_yaml({"v1": a.port, "v2": b.port}, destination_rule=dr, virtual_service=vs)
    )
    grpc_mesh.start()
    with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
        who = channel.unary_unary(WHO)
        failures = 0
        for _ in range(100):
            try:
                assert who(b"x", timeout=10) == b"v2"
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.INTERNAL
                failures += 1
        assert failures == 3  # three consecutive 5xx, then v1 is ejected
        assert a.count == 3


def test_aio_failover_retries_and_streams(grpc_mesh: GrpcMesh, echo_servers: Servers) -> None:
    a, b, c = echo_servers("v1"), echo_servers("v2"), echo_servers("v3")
    b.fail_code = grpc.StatusCode.UNAVAILABLE
    retries = "  retries: {attempts: 4, retryOn: unavailable}\n"
    vs = f"http:\n- route:\n  - destination: {{host: {HOST}}}\n{retries}"
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port, "v3": c.port}, virtual_service=vs))
    grpc_mesh.start()

    async def main() -> None:
        async with pymesh.grpc.aio.insecure_channel(TARGET, xds_client=grpc_mesh.client) as ch:
            who = ch.unary_unary(WHO)
            answers = Counter(await asyncio.gather(*(who(b"x", timeout=10) for _ in range(30))))
            assert set(answers) == {b"v1", b"v3"} and sum(answers.values()) == 30
            a.stop()  # dies: connect failures fail over to v3 (v2 answers UNAVAILABLE)
            answers = Counter([await who(b"x", timeout=10) for _ in range(30)])
            assert answers == {b"v3": 30}
            # A stream is retried before its first message (v2's UNAVAILABLE) ...
            for _ in range(6):
                items = [m async for m in ch.unary_stream(STREAM)(b"2", timeout=10)]
                assert [m.split(b":")[0] for m in items] == [b"v3", b"v3"]

    asyncio.run(main())
    assert b.count >= 3


def test_aio_breaker_overflow_and_weight_change(grpc_mesh: GrpcMesh, echo_servers: Servers) -> None:
    a, b = echo_servers("v1"), echo_servers("v2")
    a.delay = b.delay = 0.3
    dr = "trafficPolicy:\n  connectionPool:\n    http: {http2MaxRequests: 3}\n"
    vs = split(100, extra="retries: {attempts: 0}\n  ")
    grpc_mesh.write(
        mesh_yaml({"v1": a.port, "v2": b.port}, destination_rule=dr, virtual_service=vs)
    )
    grpc_mesh.start()

    async def main() -> None:
        async with pymesh.grpc.aio.insecure_channel(TARGET, xds_client=grpc_mesh.client) as ch:
            who = ch.unary_unary(WHO)
            assert await who(b"x", timeout=10) == b"v1"
            results = await asyncio.gather(
                *(who(b"x", timeout=10) for _ in range(10)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) == 7, results  # 3 in flight at most, the rest overflow
            for error in errors:
                assert isinstance(error, grpc.aio.AioRpcError)
                assert error.code() is grpc.StatusCode.UNAVAILABLE
                assert ("x-pymesh-flags", "UO") in tuple(error.trailing_metadata() or ())
            assert a.max_active <= 3
            # The split flips to v2 while calls keep going; no call fails on the way.
            a.delay = b.delay = 0.0
            vs2 = split(0, extra="retries: {attempts: 0}\n  ")
            grpc_mesh.write(
                mesh_yaml({"v1": a.port, "v2": b.port}, destination_rule=dr, virtual_service=vs2)
            )
            seen: list[bytes] = []
            deadline = asyncio.get_running_loop().time() + 10
            while seen[-20:] != [b"v2"] * 20:
                assert asyncio.get_running_loop().time() < deadline, "the new weights"
                seen += await asyncio.gather(*(who(b"x", timeout=10) for _ in range(3)))

    asyncio.run(main())
