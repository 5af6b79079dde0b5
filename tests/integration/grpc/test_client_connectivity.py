"""Endpoint connectivity in the mesh gRPC client (real grpcio servers on loopback, the
embedded control plane): a subchannel in TRANSIENT_FAILURE is left out by the load balancer
until it is usable again (sync and aio); an attempt that could not connect reaches the
policies as a connect failure (``retryOn: connect-failure`` retries it); the server's
``grpc-retry-pushback-ms`` drives the retry (gRFC A6). No sleeps decide anything: every wait
is a bounded poll on a real event (a connectivity report, a call's result)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable

import grpc
import grpc.aio
import pytest

import pymesh.grpc
import pymesh.grpc.aio
from pymesh.core.types import ResetKind
from pymesh.grpc._channel import classify
from tests.integration.grpc._client_mesh import (
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

NO_RETRIES = (
    "http:\n- route:\n  - destination: {host: echo.default.svc.cluster.local}\n"
    "  retries: {attempts: 0}\n"
)
# Quick reconnects, so a restarted endpoint is seen READY again within the test.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _poll(check: Callable[[], bool], timeout: float) -> bool:
    """Whether ``check()`` holds within ``timeout`` s (a bounded poll on a real event)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _calls_until(call: Callable[[], object], done: Callable[[], bool], limit: int = 40) -> int:
    """Make calls until ``done()`` (bounded); returns how many failed. After a failure, give
    the connectivity report up to 1 s to arrive before the next call."""
    failed = 0
    for _ in range(limit):
        if done():
            return failed
        try:
            call()
        except grpc.RpcError:
            failed += 1
            _poll(done, 1.0)
    raise AssertionError("the condition never held")


def test_transient_failure_endpoint_skipped_until_ready(
    grpc_mesh: GrpcMesh, echo_servers: Servers
) -> None:
    a, b = echo_servers("v1"), echo_servers("v2")
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}, virtual_service=NO_RETRIES))
    grpc_mesh.start()
    key = f"127.0.0.1:{a.port}"
    with pymesh.grpc.insecure_channel(
        TARGET, FAST_RECONNECT, xds_client=grpc_mesh.client
    ) as channel:
        runtime = channel.runtime  # type: ignore[attr-defined]
        who = channel.unary_unary(WHO)
        assert Counter(who(b"x", timeout=10) for _ in range(20)) == {b"v1": 10, b"v2": 10}
        port = a.port
        a.stop()
        # The next attempts on v1 fail to connect; its subchannel reports TRANSIENT_FAILURE.
        failed = _calls_until(lambda: who(b"x", timeout=10), lambda: key in runtime.unreachable)
        assert failed <= 3
        # No retries configured, yet no call fails: the balancer skips the dead endpoint
        # (round robin would otherwise send it every other call, failing each).
        assert Counter(who(b"x", timeout=10) for _ in range(40)) == {b"v2": 40}
        # The endpoint comes back on its port: grpcio reconnects, READY, picked again.
        back = echo_servers_restart(port)
        try:
            wait_until(lambda: key not in runtime.unreachable, 20, "v1 reachable again")
            seen = Counter(who(b"x", timeout=10) for _ in range(40))
            assert seen[b"v1"] >= 10 and seen[b"v2"] >= 10, seen
        finally:
            back.stop()


def echo_servers_restart(port: int) -> EchoServer:
    """A new v1 server on ``port`` (the test stops it)."""
    for _ in range(50):  # bounded: the old listener's port can take a moment to free
        try:
            server = EchoServer("v1", port)
        except RuntimeError:
            time.sleep(0.02)
            continue
        if server.port == port:
            return server
        server.stop()
    raise AssertionError(f"port {port} could not be reused")


def test_aio_transient_failure_endpoint_skipped(grpc_mesh: GrpcMesh, echo_servers: Servers) -> None:
    a, b = echo_servers("v1"), echo_servers("v2")
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}, virtual_service=NO_RETRIES))
    grpc_mesh.start()
    key = f"127.0.0.1:{a.port}"

    async def main() -> None:
        async with pymesh.grpc.aio.insecure_channel(TARGET, xds_client=grpc_mesh.client) as ch:
            runtime = ch.runtime  # type: ignore[attr-defined]
            who = ch.unary_unary(WHO)
            seen = Counter([await who(b"x", timeout=10) for _ in range(20)])
            assert seen == {b"v1": 10, b"v2": 10}
            a.stop()
            failed = 0
            for _ in range(40):  # bounded: until v1's subchannel reports TRANSIENT_FAILURE
                if key in runtime.unreachable:
                    break
                try:
                    await who(b"x", timeout=10)
                except grpc.RpcError:
                    failed += 1
                    for _ in range(100):  # up to ~1 s for the connectivity watch's report
                        if key in runtime.unreachable:
                            break
                        await asyncio.sleep(0.01)
            assert key in runtime.unreachable and failed <= 3
            assert Counter([await who(b"x", timeout=10) for _ in range(40)]) == {b"v2": 40}
        assert key not in runtime.unreachable  # the closed channel no longer reports it

    asyncio.run(main())


def test_connect_failure_is_retried_under_connect_failure(
    grpc_mesh: GrpcMesh, echo_servers: Servers
) -> None:
    b = echo_servers("v2")
    dead = _free_port()  # nothing listens here: never connected
    vs = (
        "http:\n- route:\n  - destination: {host: echo.default.svc.cluster.local}\n"
        "  retries: {attempts: 2, retryOn: connect-failure}\n"
    )
    grpc_mesh.write(mesh_yaml({"v1": dead, "v2": b.port}, virtual_service=vs))
    grpc_mesh.start()
    key = f"127.0.0.1:{dead}"
    with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
        runtime = channel.runtime  # type: ignore[attr-defined]
        who = channel.unary_unary(WHO)
        # The attempts that go to the dead endpoint fail to connect and are retried on v2
        # (retryOn has only connect-failure: an UNAVAILABLE status would not be retried).
        assert _calls_until(lambda: who(b"x", timeout=10), lambda: key in runtime.unreachable) == 0
        assert all(who(b"x", timeout=10) == b"v2" for _ in range(10))
        # A real UNAVAILABLE status from a connected server is not a connect failure.
        with pytest.raises(grpc.RpcError) as info:
            who(b"x", timeout=10, metadata=[("x-fail", "UNAVAILABLE")])
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert b.count >= 12


def test_classify_real_errors(echo_servers: Servers) -> None:
    """The edge translation on real grpcio errors: refused connection -> CONNECT_FAILURE;
    a status with pushback metadata -> that status, the header in the outcome."""
    with (
        grpc.insecure_channel(f"127.0.0.1:{_free_port()}") as ch,
        pytest.raises(grpc.RpcError) as refused,
    ):
        ch.unary_unary(WHO)(b"x", timeout=5)
    assert classify(refused.value, False).outcome.reset is ResetKind.CONNECT_FAILURE
    a = echo_servers("v1")
    md = [("x-fail", "UNAVAILABLE"), ("x-pushback-ms", "250")]
    with grpc.insecure_channel(f"127.0.0.1:{a.port}") as ch, pytest.raises(grpc.RpcError) as pushed:
        ch.unary_unary(WHO)(b"x", timeout=5, metadata=md)
    outcome = classify(pushed.value, False).outcome
    assert outcome.reset is None and outcome.grpc_status == 14
    assert outcome.headers.get("grpc-retry-pushback-ms") == "250"


def test_server_pushback(grpc_mesh: GrpcMesh, echo_servers: Servers) -> None:
    a = echo_servers("v1")
    vs = (
        "http:\n- route:\n  - destination: {host: echo.default.svc.cluster.local}\n"
        "  retries: {attempts: 3, retryOn: unavailable}\n"
    )
    grpc_mesh.write(mesh_yaml({"v1": a.port}, virtual_service=vs))
    grpc_mesh.start()
    with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
        who = channel.unary_unary(WHO)
        assert who(b"x", timeout=10) == b"v1"
        # A negative pushback: the server forbids retries; one attempt only.
        before = a.count
        with pytest.raises(grpc.RpcError) as info:
            who(b"x", timeout=10, metadata=[("x-fail", "UNAVAILABLE"), ("x-pushback-ms", "-1")])
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert a.count - before == 1
        # Garbled: the same.
        before = a.count
        with pytest.raises(grpc.RpcError):
            who(b"x", timeout=10, metadata=[("x-fail", "UNAVAILABLE"), ("x-pushback-ms", "x")])
        assert a.count - before == 1
        # 100 ms: every retry waits the server's delay (3 retries >= 0.3 s; the policy's own
        # jittered back-off would total at most 0.025 + 0.05 + 0.1 s).
        before = a.count
        start = time.monotonic()
        with pytest.raises(grpc.RpcError):
            who(b"x", timeout=10, metadata=[("x-fail", "UNAVAILABLE"), ("x-pushback-ms", "100")])
        assert time.monotonic() - start >= 0.3
        assert a.count - before == 4


def test_aio_close_ends_the_connectivity_watches(
    grpc_mesh: GrpcMesh, echo_servers: Servers
) -> None:
    """Closing an aio mesh channel ends its watch tasks on the loop: a loop closed right
    after holds no pending task (no "Task was destroyed but it is pending")."""
    a, b = echo_servers("v1"), echo_servers("v2")
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}))
    grpc_mesh.start()
    loop = asyncio.new_event_loop()
    try:

        async def main() -> set[asyncio.Task[None]]:
            ch = pymesh.grpc.aio.insecure_channel(TARGET, xds_client=grpc_mesh.client)
            who = ch.unary_unary(WHO)
            assert {await who(b"x", timeout=10) for _ in range(4)} == {b"v1", b"v2"}
            watching: set[asyncio.Task[None]] = set(ch._watching)  # type: ignore[attr-defined]
            assert len(watching) == 2  # one per endpoint channel
            await ch.close(None)
            return watching

        watching = loop.run_until_complete(main())
        assert all(task.done() for task in watching)
        assert not [t for t in asyncio.all_tasks(loop) if not t.done()]
    finally:
        loop.close()
