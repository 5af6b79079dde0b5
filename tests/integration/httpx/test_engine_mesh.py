"""The HTTP/1.1 engine under the mesh transport: what an application sees from upstreams
that close keep-alive connections, truncate bodies or stream them (sync and async clients,
embedded control plane, raw-socket upstreams on loopback)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

import pymesh.httpx
from tests.integration.httpx.conftest import HOST, PORT, Mesh, service_yaml
from tests.integration.httpx.test_h1_engine import RawServer, read_request

URL = f"http://{HOST}:{PORT}"


@pytest.fixture
def raw_upstream() -> Iterator[Callable[[Callable[[socket.socket, int], None]], RawServer]]:
    servers: list[RawServer] = []

    def make(script: Callable[[socket.socket, int], None]) -> RawServer:
        server = RawServer(script)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def _no_requests_in_flight(client: httpx.Client | httpx.AsyncClient) -> bool:
    transport = client.mesh_transport  # type: ignore[union-attr]
    return all(c.limits.requests == 0 for c in transport.runtime.clusters().values())


def test_upstream_closing_keep_alive_connections_costs_no_error_and_no_mesh_retry(
    mesh: Mesh, raw_upstream: Callable[..., RawServer]
) -> None:
    received: list[bytes] = []
    closed = threading.Semaphore(0)

    def script(sock: socket.socket, index: int) -> None:
        req = read_request(sock)  # one request per connection, then close (no warning)
        received.append(req)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        sock.shutdown(socket.SHUT_RDWR)
        closed.release()

    # The client sends its next request once the server has closed (a close racing with a
    # request is a reset for the retry policy, as with Envoy: not what this test is about).
    server = raw_upstream(script)
    mesh.write(service_yaml({"v1": server.port}))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        for _ in range(10):
            r = client.get(URL + "/")
            assert (r.status_code, r.text) == (200, "ok")
            assert r.extensions[pymesh.httpx.RESULT_EXTENSION].attempts == 1
            assert closed.acquire(timeout=10)
            time.sleep(0.02)  # the FIN reaches us (loopback)

    async def run() -> None:
        async with pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10) as client:
            for _ in range(10):
                r = await client.get(URL + "/")
                assert (r.status_code, r.text) == (200, "ok")
                assert r.extensions[pymesh.httpx.RESULT_EXTENSION].attempts == 1
                assert closed.acquire(timeout=10)
                await asyncio.sleep(0.02)  # the loop sees the FIN

    asyncio.run(run())
    assert len(received) == 20  # each request reached the upstream exactly once
    assert server.connections == 20


def test_truncated_body_raises_as_httpx_and_gives_the_slot_back(
    mesh: Mesh, raw_upstream: Callable[..., RawServer]
) -> None:
    def script(sock: socket.socket, index: int) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")

    server = raw_upstream(script)
    mesh.write(service_yaml({"v1": server.port}))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(URL + "/")
        assert _no_requests_in_flight(client)

    async def run() -> None:
        async with pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(URL + "/")
            assert _no_requests_in_flight(client)

    asyncio.run(run())


def test_chunked_body_streams_through_the_mesh(
    mesh: Mesh, raw_upstream: Callable[..., RawServer]
) -> None:
    def script(sock: socket.socket, index: int) -> None:
        while read_request(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
            time.sleep(0.05)
            sock.sendall(b"3\r\ntwo\r\n0\r\n\r\n")

    server = raw_upstream(script)
    mesh.write(service_yaml({"v1": server.port}))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        with client.stream("GET", URL + "/") as r:
            assert list(r.iter_raw()) == [b"one", b"two"]
        assert client.get(URL + "/").text == "onetwo"
        assert _no_requests_in_flight(client)

    async def run() -> None:
        async with pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10) as client:
            async with client.stream("GET", URL + "/") as r:
                assert [part async for part in r.aiter_raw()] == [b"one", b"two"]
            assert (await client.get(URL + "/")).text == "onetwo"
            assert _no_requests_in_flight(client)

    asyncio.run(run())
    assert server.connections == 2  # one per client: every body read to the end, reused
