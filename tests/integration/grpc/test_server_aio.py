"""The asyncio xDS-managed server (``pymesh.grpc.aio.server``): grpcio has none.

Same ADS server and listener protos as ``test_server_xds.py``; here: serving state and health,
RBAC and fault on the asyncio path, 100 concurrent streams under load, and a listener update
applied while streams stay open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pymesh.grpc.aio._server import AioXdsServer
from pymesh.grpc.aio._server import server as aio_server
from pymesh.xds.client import XdsClient
from tests.integration.grpc.test_server_xds import (
    SERVICE,
    StatusRecorder,
    fault_filter,
    header_policy,
    inbound_listener,
    listener_name,
    make_bootstrap,
    rbac_filter,
)
from tests.xdsserver import LDS, XdsTestServer


@pytest.fixture
def ads() -> Iterator[XdsTestServer]:
    with XdsTestServer() as server:
        yield server


@pytest.fixture
def xds_client(ads: XdsTestServer) -> Iterator[XdsClient]:
    client = XdsClient(make_bootstrap(ads), does_not_exist_timeout=2.0)
    yield client
    client.close()


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return b"echo:" + request


async def _chat(
    request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for item in request_iterator:
        await asyncio.sleep(0)
        yield b"echo:" + item


def _handlers() -> list[grpc.GenericRpcHandler]:
    return [
        grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(_unary),
                "Chat": grpc.stream_stream_rpc_method_handler(_chat),
            },
        )
    ]


async def _start(client: XdsClient, statuses: StatusRecorder) -> tuple[AioXdsServer, int]:
    srv = aio_server(handlers=_handlers(), xds_serving_callback=statuses, xds_client=client)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    return srv, port


def _serve(ads: XdsTestServer, port: int, **kw: Any) -> None:
    ads.set_resources(LDS, {listener_name("127.0.0.1", port): inbound_listener(port, **kw)})


async def _code(channel: grpc.aio.Channel, **kw: Any) -> grpc.StatusCode:
    try:
        await channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=5, **kw)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _until(channel: grpc.aio.Channel, code: grpc.StatusCode, **kw: Any) -> None:
    deadline = time.monotonic() + 10
    while await _code(channel, **kw) is not code:
        assert time.monotonic() < deadline, f"never got {code}"
        await asyncio.sleep(0.05)


def test_aio_serving_rbac_fault_and_health(ads: XdsTestServer, xds_client: XdsClient) -> None:
    async def main() -> None:
        statuses = StatusRecorder()
        srv, port = await _start(xds_client, statuses)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                assert await _code(channel) is grpc.StatusCode.UNAVAILABLE
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
                _serve(ads, port)
                assert await srv.wait_for_serving(10)
                assert await _code(channel) is grpc.StatusCode.OK
                deadline = time.monotonic() + 5
                while (
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                ).status != health_pb2.HealthCheckResponse.SERVING:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                _serve(
                    ads,
                    port,
                    filters=[rbac_filter("DENY", {"bad": header_policy("x-user", "bad")})],
                )
                await _until(
                    channel, grpc.StatusCode.PERMISSION_DENIED, metadata=[("x-user", "bad")]
                )
                assert await _code(channel, metadata=[("x-user", "ok")]) is grpc.StatusCode.OK
                _serve(ads, port, filters=[fault_filter(abort_grpc=14)])
                await _until(channel, grpc.StatusCode.UNAVAILABLE)
                _serve(ads, port, filters=[fault_filter(delay=0.3)])
                await _until(channel, grpc.StatusCode.OK)
                started = time.monotonic()
                assert await _code(channel) is grpc.StatusCode.OK
                assert time.monotonic() - started >= 0.3
                ads.remove_resources(LDS, [listener_name("127.0.0.1", port)])
                await _until(channel, grpc.StatusCode.UNAVAILABLE)
                assert not srv.serving
                assert [s.serving for s in statuses.items][-2:] == [True, False]
        finally:
            await srv.stop(None)

    asyncio.run(main())


def test_aio_100_concurrent_streams_survive_a_listener_update(
    ads: XdsTestServer, xds_client: XdsClient
) -> None:
    streams, rounds = 100, 20

    async def main() -> None:
        statuses = StatusRecorder()
        srv, port = await _start(xds_client, statuses)
        _serve(ads, port)
        try:
            assert await srv.wait_for_serving(10)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                chat = channel.stream_stream(f"/{SERVICE}/Chat")
                calls = [chat(timeout=60) for _ in range(streams)]
                for i, call in enumerate(calls):
                    await call.write(f"{i}:0".encode())
                assert [await c.read() for c in calls] == [
                    f"echo:{i}:0".encode() for i in range(streams)
                ]
                # Deny every new RPC; the 100 open streams keep exchanging messages.
                _serve(ads, port, filters=[rbac_filter("ALLOW", {})])
                await _until(channel, grpc.StatusCode.PERMISSION_DENIED)

                async def run(i: int, call: Any) -> int:
                    for r in range(1, rounds):
                        await call.write(f"{i}:{r}".encode())
                        assert await call.read() == f"echo:{i}:{r}".encode()
                    await call.done_writing()
                    assert await call.read() is grpc.aio.EOF
                    return int((await call.code()) is grpc.StatusCode.OK)

                started = time.monotonic()
                ok = await asyncio.gather(*(run(i, c) for i, c in enumerate(calls)))
                elapsed = time.monotonic() - started
                assert sum(ok) == streams
                # 100 streams x 19 round trips on a loaded 2-core box: generous bound.
                assert elapsed < 30, elapsed
        finally:
            await srv.stop(None)

    asyncio.run(main())


def test_aio_registered_methods_and_denied_streams(
    ads: XdsTestServer, xds_client: XdsClient
) -> None:
    async def main() -> None:
        srv = aio_server(handlers=_handlers(), xds_client=xds_client)
        srv.add_registered_method_handlers(
            "test.Registered", {"Ping": grpc.unary_unary_rpc_method_handler(_unary)}
        )
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        try:
            _serve(
                ads, port, filters=[rbac_filter("DENY", {"bad": header_policy("x-user", "bad")})]
            )
            assert await srv.wait_for_serving(10)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                ping = channel.unary_unary("/test.Registered/Ping")
                assert await ping(b"a", timeout=5) == b"echo:a"
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await ping(b"a", timeout=5, metadata=[("x-user", "bad")])
                assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
                chat = channel.stream_stream(f"/{SERVICE}/Chat")
                call = chat(timeout=5, metadata=[("x-user", "bad")])
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await call.write(b"1")
                    await call.read()
                assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
                assert denied.value.details() == "RBAC: access denied"
        finally:
            await srv.stop(None)

    asyncio.run(main())
