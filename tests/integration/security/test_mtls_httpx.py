"""httpx (sync and async) against uvicorn, both with provider-backed
contexts: mTLS works, the peer identity is visible, a SAN mismatch never reaches the app,
and a rotated server certificate is served to new connections without a restart."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from pymesh.controlplane.ca import CertificateAuthority
from pymesh.model.matcher import StringMatcher
from pymesh.security import (
    MeshSSLContext,
    StaticProvider,
    client_ssl_context,
    peer_identity,
    server_ssl_context,
)
from tests.integration.security.tls_servers import HttpsServer, serial_of
from tests.unit.security.pki_helpers import ca_bundle, spiffe

SERVER = spiffe("default", "server")


class App:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})


class Uvicorn:
    def __init__(self, app: App, ctx: MeshSSLContext) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", http="h11")
        config.load()
        config.ssl = ctx  # the server wrapper's SSL context: follows the provider
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            threading.Event().wait(0.02)
        assert self.server.started

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


@pytest.fixture
def uvi(ca: CertificateAuthority) -> Iterator[tuple[Uvicorn, App, StaticProvider]]:
    app = App()
    sp = StaticProvider(ca_bundle(ca, "default", "server"))
    server = Uvicorn(app, server_ssl_context(sp, alpn=("http/1.1",)))
    yield server, app, sp
    server.close()


def _server_serial(response: httpx.Response) -> int | None:
    ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
    return serial_of(ssl_object.getpeercert(True))


def test_sync_httpx_mtls_and_rotation(
    ca: CertificateAuthority, uvi: tuple[Uvicorn, App, StaticProvider]
) -> None:
    server, app, sp = uvi
    cp = StaticProvider(ca_bundle(ca, "default", "client"))
    ctx = client_ssl_context(cp, [StringMatcher.exact(SERVER)])
    url = f"https://127.0.0.1:{server.port}/"
    with httpx.Client(verify=ctx) as client:
        r1 = client.get(url)
        assert r1.status_code == 200 and r1.text == "ok"
        ssl_object = r1.extensions["network_stream"].get_extra_info("ssl_object")
        assert peer_identity(ssl_object) == SERVER
        first = _server_serial(r1)
        sp.update(ca_bundle(ca, "default", "server"))
        r2 = client.get(url)  # pooled connection: still the old certificate
        assert _server_serial(r2) == first
    with httpx.Client(verify=ctx) as client:
        r3 = client.get(url)  # new connection: the new certificate, no server restart
        assert r3.status_code == 200 and _server_serial(r3) != first
    assert app.calls == 3
    # a client expecting another identity is refused before sending the request
    wrong = client_ssl_context(cp, [StringMatcher.exact(spiffe("default", "ratings"))])
    with (
        httpx.Client(verify=wrong) as client,
        pytest.raises(httpx.ConnectError, match="expected subject"),
    ):
        client.get(url)
    assert app.calls == 3


def test_async_httpx_mtls(ca: CertificateAuthority) -> None:
    app = App()
    sp = StaticProvider(ca_bundle(ca, "default", "server"))
    cp = StaticProvider(ca_bundle(ca, "default", "client"))
    # The async path: anyio (client) and asyncio's sslproto (uvicorn) both use wrap_bio.
    # uvicorn speaks HTTP/1.1 only: its context must not offer h2 in ALPN.
    server = Uvicorn(app, server_ssl_context(sp, alpn=("http/1.1",)))
    try:
        url = f"https://127.0.0.1:{server.port}/"

        async def main() -> tuple[int, str | None, int]:
            ok = client_ssl_context(cp, [StringMatcher.exact(SERVER)])
            async with httpx.AsyncClient(verify=ok) as client:
                r = await client.get(url)
                alpn = (
                    r.extensions["network_stream"]
                    .get_extra_info("ssl_object")
                    .selected_alpn_protocol()
                )
            bad = client_ssl_context(cp, [StringMatcher.prefix("spiffe://other/")])
            refused = 0
            async with httpx.AsyncClient(verify=bad) as client:
                try:
                    await client.get(url)
                except httpx.ConnectError:
                    refused += 1
            return r.status_code, alpn, refused

        status, alpn, refused = asyncio.run(main())
        assert status == 200 and alpn == "http/1.1" and refused == 1
        assert app.calls == 1
    finally:
        server.close()


def test_stdlib_https_server_sees_client_identity(ca: CertificateAuthority) -> None:
    sp = StaticProvider(ca_bundle(ca, "default", "server"))
    cp = StaticProvider(ca_bundle(ca, "default", "client"))
    server = HttpsServer(server_ssl_context(sp))
    try:
        with httpx.Client(verify=client_ssl_context(cp, [StringMatcher.exact(SERVER)])) as c:
            r = c.get(f"https://127.0.0.1:{server.port}/")
        assert r.text == spiffe("default", "client")
        assert r.headers["x-client-serial"] != "None"
    finally:
        server.close()
