"""What the mesh clients trim from httpx's per-request work, invisibly: an absolute URL string
is parsed once (httpx would parse it on every request; relative URLs still follow
``base_url``, ``params`` still apply per request), and responses without a cookie skip the
stdlib cookie machinery (cookies are still stored, also after ``client.cookies = ...``); a
read response is freed when dropped, not left to the garbage collector (httpx ties a response
and its stream in a reference cycle; the engine's parser and its message were another)."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

import pymesh.httpx
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.httpx._h1 import _Message
from pymesh.xds.client import XdsClient
from tests.integration.httpx.conftest import HOST, PORT, Backend, Mesh, Upstream, service_yaml

URL = "http://web.default.svc.cluster.local:9080/x?y=1"


def _xds() -> XdsClient:
    data = generate_bootstrap(xds_address="127.0.0.1:1", namespace="default")
    return XdsClient(parse_bootstrap(json.dumps(data), source="test"))


def _check(client: httpx.Client | httpx.AsyncClient) -> None:
    merge = client._merge_url  # what build_request turns the URL argument into
    assert merge(URL) is merge(URL)  # parsed once
    first = client.build_request("GET", URL)
    assert str(first.url) == URL and first.url == httpx.URL(URL)
    with_params = client.build_request("GET", URL, params={"z": "2"})
    assert str(with_params.url) == "http://web.default.svc.cluster.local:9080/x?z=2"
    assert str(client.build_request("GET", URL).url) == URL  # the shared URL is untouched
    client.base_url = httpx.URL("http://a.example/api/")
    assert str(client.build_request("GET", "items").url) == "http://a.example/api/items"
    client.base_url = httpx.URL("http://b.example/v2/")
    assert str(client.build_request("GET", "items").url) == "http://b.example/v2/items"
    other = client.build_request("GET", URL.replace("/x", "/other"))
    assert other.url.path == "/other"
    _check_cookies(client)


def _response(client: httpx.Client | httpx.AsyncClient, *headers: tuple[str, str]) -> Any:
    return httpx.Response(200, headers=headers, request=client.build_request("GET", URL))


def _check_cookies(client: httpx.Client | httpx.AsyncClient) -> None:
    client.cookies.extract_cookies(_response(client, ("content-type", "text/plain")))
    assert dict(client.cookies) == {}
    client.cookies.extract_cookies(_response(client, ("Set-Cookie", "session=abc; Path=/")))
    assert dict(client.cookies) == {"session": "abc"}
    client.cookies = {"a": "1"}  # type: ignore[assignment]
    client.cookies.extract_cookies(_response(client, ("set-cookie", "b=2; Path=/")))
    assert dict(client.cookies) == {"a": "1", "b": "2"}
    sent = client.build_request("GET", URL)
    assert sent.headers["cookie"] in ("a=1; b=2", "b=2; a=1")


def test_sync_client_parses_an_absolute_url_once() -> None:
    xds = _xds()
    try:
        with pymesh.httpx.Client(xds_client=xds) as client:
            _check(client)
    finally:
        xds.close()


def test_async_client_parses_an_absolute_url_once() -> None:
    xds = _xds()

    async def main() -> None:
        async with pymesh.httpx.AsyncClient(xds_client=xds) as client:
            _check(client)

    try:
        asyncio.run(main())
    finally:
        xds.close()


@contextmanager
def _cyclic_garbage() -> Iterator[list[Any]]:
    """The requests' objects that only the garbage collector could free, made inside."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found: list[Any] = []
    try:
        yield found
        gc.collect()
        kinds = (httpx.Response, httpx.Request, _Message)
        found += [o for o in gc.garbage if isinstance(o, kinds)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_read_responses_are_freed_without_the_garbage_collector(
    mesh: Mesh, upstreams: Callable[..., tuple[Backend, Upstream]]
) -> None:
    _b, up = upstreams("v1")
    mesh.write(service_yaml({"v1": up.port}))
    mesh.start()
    url = f"http://{HOST}:{PORT}/"
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        assert client.get(url).status_code == 200
        with _cyclic_garbage() as garbage:
            for _ in range(20):
                assert client.get(url).json()["name"] == "v1"
        assert garbage == []
        with client.stream("GET", url) as streamed:  # streamed: httpx's own objects remain
            assert streamed.read()

    async def run() -> list[Any]:
        async with pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10) as client:
            assert (await client.get(url)).status_code == 200
            with _cyclic_garbage() as garbage:
                for _ in range(20):
                    assert (await client.get(url)).json()["name"] == "v1"
            return garbage

    assert asyncio.run(run()) == []
