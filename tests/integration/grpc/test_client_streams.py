"""Streaming calls under retries, as gRPC retries them: a stream is retried only until its
first response message (the attempt commits there), and a retried request stream is replayed
from the buffer. Sync and aio, real grpcio servers, the embedded control plane."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import grpc
import pytest

import pymesh.grpc
import pymesh.grpc.aio
from tests.integration.grpc._client_mesh import (
    CHAT,
    COLLECT,
    HOST,
    STREAM,
    TARGET,
    EchoServer,
    GrpcMesh,
    echo_servers,
    grpc_mesh,
    mesh_yaml,
)

__all__ = ["echo_servers", "grpc_mesh"]

RETRIES = (
    f"http:\n- route:\n  - destination: {{host: {HOST}}}\n"
    "  retries: {attempts: 4, retryOn: unavailable}\n"
)


@pytest.fixture
def flaky(
    grpc_mesh: GrpcMesh, echo_servers: Callable[[str], EchoServer]
) -> Iterator[tuple[GrpcMesh, EchoServer, EchoServer]]:
    """v1 answers every call UNAVAILABLE before any message; v2 works."""
    a, b = echo_servers("v1"), echo_servers("v2")
    a.fail_code = grpc.StatusCode.UNAVAILABLE
    grpc_mesh.write(mesh_yaml({"v1": a.port, "v2": b.port}, virtual_service=RETRIES))
    grpc_mesh.start()
    yield grpc_mesh, a, b


def test_sync_streams_retry_before_the_first_message(
    flaky: tuple[GrpcMesh, EchoServer, EchoServer],
) -> None:
    mesh, a, _ = flaky
    sent: list[bytes] = []

    def requests() -> Iterator[bytes]:
        for m in (b"p", b"q", b"r"):
            sent.append(m)
            yield m

    with pymesh.grpc.insecure_channel(TARGET, xds_client=mesh.client) as channel:
        for _ in range(4):
            assert list(channel.unary_stream(STREAM)(b"2", timeout=10)) == [b"v2:0", b"v2:1"]
            sent.clear()
            chat = list(channel.stream_stream(CHAT)(requests(), timeout=10))
            assert chat == [b"v2:p", b"v2:q", b"v2:r"]  # the buffer replayed to v2
            assert sent == [b"p", b"q", b"r"]  # the app's iterator was read once
            sent.clear()
            assert channel.stream_unary(COLLECT)(requests(), timeout=10) == b"v2:p,q,r"
            assert sent == [b"p", b"q", b"r"]
    assert a.count >= 4  # v1 was tried, and its failures retried away


def test_sync_stream_is_committed_at_its_first_message(
    flaky: tuple[GrpcMesh, EchoServer, EchoServer],
) -> None:
    mesh, a, b = flaky
    a.fail_code = None  # both answer; v1 and v2 fail after their first message
    with pymesh.grpc.insecure_channel(TARGET, xds_client=mesh.client) as channel:
        for _ in range(4):
            before = a.count + b.count
            it = channel.unary_stream(STREAM)(b"3", metadata=[("x-fail-after-first", "1")])
            first = next(it)
            assert first.endswith(b":0")
            with pytest.raises(grpc.RpcError) as info:
                next(it)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert a.count + b.count == before + 1  # committed: never retried


def test_aio_streams_retry_replay_commit_and_cancel(
    flaky: tuple[GrpcMesh, EchoServer, EchoServer],
) -> None:
    mesh, a, b = flaky

    async def main() -> None:
        async with pymesh.grpc.aio.insecure_channel(TARGET, xds_client=mesh.client) as ch:
            for _ in range(4):
                items = [m async for m in ch.unary_stream(STREAM)(b"2", timeout=10)]
                assert items == [b"v2:0", b"v2:1"]
                call = ch.stream_stream(CHAT)(timeout=10)  # write() API, replayed on retry
                await call.write(b"w")
                assert await call.read() == b"v2:w"
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
                out = await ch.stream_unary(COLLECT)(iter([b"x", b"y"]), timeout=10)
                assert out == b"v2:x,y"
            # Cancelling a stream after its first message.
            call = ch.unary_stream(STREAM)(b"100000", timeout=10)
            assert (await call.read()).startswith(b"v2:")
            assert call.cancel()
            with pytest.raises((asyncio.CancelledError, grpc.RpcError)):
                while True:
                    if await call.read() is grpc.aio.EOF:
                        break
            assert call.cancelled()
            # A stream failing after its first message is not retried.
            a.fail_code = None
            before = a.count + b.count
            call = ch.unary_stream(STREAM)(b"3", metadata=[("x-fail-after-first", "1")])
            assert (await call.read()).endswith(b":0")
            with pytest.raises(grpc.RpcError) as info:
                await call.read()
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert a.count + b.count == before + 1

    asyncio.run(main())
    assert a.count >= 4
