"""Mesh-managed gRPC channels, sync and aio, against real grpcio servers on loopback and the
embedded control plane: the four call shapes, metadata, errors, ``with_call``, ``future``,
cancellation, deadlines, connectivity, and plain targets passed to grpcio unchanged."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import grpc.aio
import pytest

import pymesh.grpc
import pymesh.grpc.aio
from tests.integration.grpc._client_mesh import (
    CHAT,
    COLLECT,
    STREAM,
    TARGET,
    WHO,
    EchoServer,
    GrpcMesh,
    echo_servers,
    grpc_mesh,
    mesh_yaml,
)

__all__ = ["echo_servers", "grpc_mesh"]  # fixtures used by name


@pytest.fixture
def two(
    grpc_mesh: GrpcMesh, echo_servers: Callable[[str], EchoServer]
) -> Iterator[tuple[GrpcMesh, EchoServer, EchoServer]]:
    a, b = echo_servers("v1"), echo_servers("v2")
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}))
    grpc_mesh.start()
    yield grpc_mesh, a, b


def test_sync_call_shapes(two: tuple[GrpcMesh, EchoServer, EchoServer]) -> None:
    mesh, a, b = two
    with pymesh.grpc.insecure_channel(TARGET, xds_client=mesh.client) as channel:
        who = channel.unary_unary(WHO)
        seen = Counter(who(b"x", timeout=10) for _ in range(100))
        assert seen == {b"v1": 50, b"v2": 50}  # round robin over both endpoints
        stream = list(channel.unary_stream(STREAM)(b"4", timeout=10))
        assert len(stream) == 4 and stream[0].endswith(b":0") and stream[3].endswith(b":3")
        collected = channel.stream_unary(COLLECT)(iter([b"a", b"b", b"c"]), timeout=10)
        assert collected.split(b":")[1] == b"a,b,c"
        chat = list(channel.stream_stream(CHAT)(iter([b"p", b"q"]), timeout=10))
        assert [m.split(b":")[1] for m in chat] == [b"p", b"q"]
        # with_call and future give grpc.Call objects
        value, call = who.with_call(b"x", timeout=10)
        assert value in (b"v1", b"v2") and call.code() is grpc.StatusCode.OK
        future = who.future(b"x", timeout=10)
        assert future.result(10) in (b"v1", b"v2")
        assert future.done() and future.code() is grpc.StatusCode.OK
        future = channel.stream_unary(COLLECT).future(iter([b"z"]), timeout=10)
        assert future.result(10).endswith(b":z")
        # per-call compression, wait_for_ready and call credentials pass through
        assert who(b"x" * 1000, timeout=10, compression=grpc.Compression.Gzip) in (b"v1", b"v2")
        assert who(b"x", timeout=10, wait_for_ready=True) in (b"v1", b"v2")
    assert a.count + b.count == 100 + 1 + 1 + 1 + 1 + 1 + 1 + 2
    # channel-level options and compression are given to every endpoint channel
    with pymesh.grpc.insecure_channel(
        TARGET,
        options=[("grpc.max_receive_message_length", 1 << 20)],
        compression=grpc.Compression.Deflate,
        xds_client=mesh.client,
    ) as channel:
        assert channel.unary_unary(WHO)(b"x", timeout=10) in (b"v1", b"v2")


def test_sync_metadata_and_upstream_errors(two: tuple[GrpcMesh, EchoServer, EchoServer]) -> None:
    mesh, a, b = two
    with pymesh.grpc.insecure_channel(TARGET, xds_client=mesh.client) as channel:
        who = channel.unary_unary(WHO)
        who(b"x", metadata=[("x-user", "alice"), ("x-blob-bin", b"\x00\x01\xff")], timeout=10)
        md = (a.seen_metadata + b.seen_metadata)[-1]
        assert md["x-user"] == "alice"
        assert md["x-blob-bin"] == b"\x00\x01\xff"  # binary metadata survives the flow
        # A non-retriable upstream status comes back as grpcio's own error, unchanged.
        with pytest.raises(grpc.RpcError) as info:
            who(b"x", metadata=[("x-fail", "PERMISSION_DENIED")], timeout=10)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "x-fail" in info.value.details()
        # Errors in a stream come from iterating it.
        it = channel.unary_stream(STREAM)(b"2", metadata=[("x-fail", "NOT_FOUND")], timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(it)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert it.code() is grpc.StatusCode.NOT_FOUND


def test_sync_deadline_and_cancel(two: tuple[GrpcMesh, EchoServer, EchoServer]) -> None:
    mesh, _, _ = two
    with pymesh.grpc.insecure_channel(TARGET, xds_client=mesh.client) as channel:
        who = channel.unary_unary(WHO)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            who(b"x", metadata=[("x-sleep-ms", "2000")], timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 1.5  # the caller's deadline, not retried
        future = who.future(b"x", metadata=[("x-sleep-ms", "3000")], timeout=10)
        time.sleep(0.3)
        assert future.cancel()
        assert future.cancelled()
        with pytest.raises(grpc.FutureCancelledError):
            future.result(5)
        it = channel.unary_stream(STREAM)(b"1000", timeout=10)
        assert next(it)
        assert it.cancel()
        with pytest.raises(grpc.RpcError) as info:
            for _ in it:
                pass
        assert info.value.code() is grpc.StatusCode.CANCELLED


def test_sync_subscribe_and_plain_target(two: tuple[GrpcMesh, EchoServer, EchoServer]) -> None:
    mesh, a, _ = two
    channel = pymesh.grpc.insecure_channel(TARGET, xds_client=mesh.client)
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append)
    deadline = time.monotonic() + 10
    while grpc.ChannelConnectivity.READY not in states and time.monotonic() < deadline:
        time.sleep(0.02)
    assert states[-1] is grpc.ChannelConnectivity.READY
    channel.unsubscribe(states.append)
    channel.close()
    with pytest.raises(ValueError):
        channel.unary_unary(WHO)(b"x")
    # A plain target is grpcio's own channel.
    plain = pymesh.grpc.insecure_channel(f"127.0.0.1:{a.port}")
    assert not isinstance(plain, pymesh.grpc.MeshChannel)
    assert plain.unary_unary(WHO)(b"x", timeout=10) == b"v1"
    plain.close()


def test_aio_call_shapes(two: tuple[GrpcMesh, EchoServer, EchoServer]) -> None:
    mesh, a, b = two

    async def main() -> None:
        async with pymesh.grpc.aio.insecure_channel(TARGET, xds_client=mesh.client) as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            who = channel.unary_unary(WHO)
            seen = Counter(await asyncio.gather(*(who(b"x", timeout=10) for _ in range(40))))
            assert seen == {b"v1": 20, b"v2": 20}
            call = channel.unary_stream(STREAM)(b"3", timeout=10)
            items = [m async for m in call]
            assert len(items) == 3
            assert await call.code() is grpc.StatusCode.OK
            out = await channel.stream_unary(COLLECT)(iter([b"a", b"b"]), timeout=10)
            assert out.endswith(b":a,b")

            async def gen() -> object:
                for m in (b"x", b"y"):
                    yield m

            chat = [m async for m in channel.stream_stream(CHAT)(gen(), timeout=10)]
            assert [m.split(b":")[1] for m in chat] == [b"x", b"y"]
            # write()/done_writing() without a request iterator
            call = channel.stream_stream(CHAT)(timeout=10)
            await call.write(b"w")
            assert (await call.read()).endswith(b":w")
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            # errors are grpc.aio.AioRpcError
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await who(b"x", metadata=[("x-fail", "ALREADY_EXISTS")], timeout=10)
            assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await who(b"x", metadata=[("x-sleep-ms", "2000")], timeout=0.3)
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # cancel() of a call in flight (awaited by another task), as grpc.aio
            slow = who(b"x", metadata=[("x-sleep-ms", "3000")], timeout=10)
            waiter = asyncio.ensure_future(slow)
            await asyncio.sleep(0.2)
            started = time.monotonic()
            assert slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert time.monotonic() - started < 1.0
            assert slow.cancelled()
            # ... and of a call not awaited yet
            pending = who(b"x", timeout=10)
            assert pending.cancel()
            with pytest.raises((asyncio.CancelledError, grpc.RpcError)):
                await pending
            # a call used before it is awaited runs as a task, as grpc.aio
            call = who(b"x", timeout=10)
            assert await call.code() is grpc.StatusCode.OK
            assert await call in (b"v1", b"v2")
            assert call.done()

    asyncio.run(main())
    assert a.count + b.count >= 40 + 6


def _self_signed(host: str) -> tuple[bytes, bytes]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_secure_channel_uses_the_credentials_per_endpoint(grpc_mesh: GrpcMesh) -> None:
    # A TLS server whose certificate names the mesh host: the endpoint channels must use
    # the given credentials and verify the target's HOST (the :authority), not 127.0.0.1.
    from concurrent import futures

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"secure"

    cert, key = _self_signed("echo.default.svc.cluster.local")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "echo.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
            ),
        )
    )
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    try:
        grpc_mesh.write(mesh_yaml({"v1": port}))
        grpc_mesh.start()
        tls = grpc.ssl_channel_credentials(root_certificates=cert)
        with pymesh.grpc.secure_channel(TARGET, tls, xds_client=grpc_mesh.client) as channel:
            assert channel.unary_unary(WHO)(b"x", timeout=10) == b"secure"

        async def aio() -> bytes:
            async with pymesh.grpc.aio.secure_channel(
                TARGET, tls, xds_client=grpc_mesh.client
            ) as ch:
                value: bytes = await ch.unary_unary(WHO)(b"x", timeout=10)
                return value

        assert asyncio.run(aio()) == b"secure"
        with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(WHO)(b"x", timeout=10)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE  # plaintext to TLS
    finally:
        server.stop(None).wait(5)


def test_generated_stubs_work_unchanged(grpc_mesh: GrpcMesh) -> None:
    # grpcio-health-checking's generated HealthStub (protobuf serializers, registered
    # methods) on a mesh channel, sync and aio: unary and server streaming.
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    servicer.set("echo.Echo", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        grpc_mesh.write(mesh_yaml({"v1": port}))
        grpc_mesh.start()
        request = health_pb2.HealthCheckRequest(service="echo.Echo")
        with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(request, timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
            watch = stub.Watch(request, timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()

        async def aio() -> None:
            async with pymesh.grpc.aio.insecure_channel(TARGET, xds_client=grpc_mesh.client) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                reply = await stub.Check(request, timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                call = stub.Watch(request, timeout=10)
                first = await call.read()
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                call.cancel()

        asyncio.run(aio())
    finally:
        server.stop(None).wait(5)


def test_wait_for_ready_waits_for_an_endpoint(grpc_mesh: GrpcMesh) -> None:
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there yet
    grpc_mesh.write(mesh_yaml({"v1": port}))
    grpc_mesh.start()
    started: list[EchoServer] = []
    timer = threading.Timer(0.6, lambda: started.append(EchoServer("late", port)))
    try:
        with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as channel:
            who = channel.unary_unary(WHO)
            begin = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                who(b"x", timeout=5)  # fail fast: no endpoint is ready
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - begin < 2
            timer.start()
            assert who(b"x", timeout=10, wait_for_ready=True) == b"late"
            assert time.monotonic() - begin >= 0.6

            async def aio() -> bytes:
                async with pymesh.grpc.aio.insecure_channel(
                    TARGET, xds_client=grpc_mesh.client
                ) as ch:
                    value: bytes = await ch.unary_unary(WHO)(b"x", wait_for_ready=True)
                    return value

            assert asyncio.run(aio()) == b"late"
    finally:
        timer.cancel()
        timer.join(5)
        for s in started:
            s.stop()


def test_one_runtime_shared_with_the_httpx_adapter(
    two: tuple[GrpcMesh, EchoServer, EchoServer],
) -> None:
    # Same xDS client -> the same MeshRuntime: one set of breakers, outlier detectors and
    # balancers per cluster for gRPC and HTTP calls alike.
    import pymesh.httpx
    from pymesh.core.runtime import MeshRuntime

    mesh, _, _ = two
    assert mesh.client is not None
    runtime = MeshRuntime.for_client(mesh.client)
    channel = pymesh.grpc.insecure_channel(TARGET, xds_client=mesh.client)
    aio_runtime: list[MeshRuntime] = []

    async def aio() -> None:
        async with pymesh.grpc.aio.insecure_channel(TARGET, xds_client=mesh.client) as ch:
            assert isinstance(ch, pymesh.grpc.aio.AioMeshChannel)
            aio_runtime.append(ch.runtime)

    transport = pymesh.httpx.MeshTransport(mesh.client)
    try:
        assert isinstance(channel, pymesh.grpc.MeshChannel)
        assert channel.runtime is runtime
        asyncio.run(aio())
        assert aio_runtime == [runtime]
        assert transport.runtime is runtime
        channel.unary_unary(WHO)(b"x", timeout=10)
        assert any(name.startswith("outbound|7070||") for name in runtime.clusters())
    finally:
        transport.close()
        channel.close()


def test_unknown_target_fails_unavailable(two: tuple[GrpcMesh, EchoServer, EchoServer]) -> None:
    # The control plane has no listener for the name: the call fails UNAVAILABLE (as
    # grpcio's xDS client does once the listener does not exist), sync and aio.
    # (A client with a short does-not-exist timer: the listener never comes, gRFC A27.)
    import json

    from pymesh.bootstrap import parse_bootstrap
    from pymesh.xds.client import XdsClient

    mesh, _, _ = two
    target = "xds:///nobody.default.svc.cluster.local:7070"
    bootstrap = parse_bootstrap(json.dumps(mesh.bootstrap), source="test")
    with XdsClient(bootstrap, does_not_exist_timeout=0.5) as client:
        started = time.monotonic()
        with pymesh.grpc.insecure_channel(target, xds_client=client) as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(WHO)(b"x", timeout=30)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "nobody.default.svc.cluster.local:7070" in info.value.details()
            assert time.monotonic() - started < 10

            async def aio() -> None:
                async with pymesh.grpc.aio.insecure_channel(target, xds_client=client) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await ch.unary_unary(WHO)(b"x", timeout=30)
                    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                    assert ch.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE

            asyncio.run(aio())


def test_aio_unary_call_object_after_an_inline_run(
    two: tuple[GrpcMesh, EchoServer, EchoServer],
) -> None:
    # An awaited unary call runs inline and makes no future unless one is asked for; the
    # call object still answers as grpc.aio's does, before, during and after its run.
    mesh, _, _ = two

    async def main() -> None:
        async with pymesh.grpc.aio.insecure_channel(TARGET, xds_client=mesh.client) as channel:
            who = channel.unary_unary(WHO)
            call = who(b"x", timeout=10)
            assert not call.done()
            value = await call
            assert value in (b"v1", b"v2")
            assert call.done() and not call.cancelled()
            assert not call.cancel()  # finished: nothing to cancel
            assert await call == value  # awaiting again gives the same answer
            assert await call.code() is grpc.StatusCode.OK
            seen: list[object] = []
            call.add_done_callback(seen.append)
            await asyncio.sleep(0)
            assert seen == [call]
            # A callback added while the call runs inline fires when it ends.
            running = who(b"x", timeout=10, metadata=[("x-sleep-ms", "100")])
            task = asyncio.ensure_future(running)
            await asyncio.sleep(0.02)
            assert not running.done()
            running.add_done_callback(seen.append)
            assert await task in (b"v1", b"v2")
            await asyncio.sleep(0)
            assert seen == [call, running] and running.done()
            # A failure is raised again to a second awaiter, as grpc.aio.
            failing = who(b"x", timeout=10, metadata=[("x-fail", "NOT_FOUND")])
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await failing
                assert info.value.code() is grpc.StatusCode.NOT_FOUND
            assert failing.done()

    asyncio.run(main())
