"""The mesh clients parse an absolute URL string once (httpx would parse it on every
request); relative URLs still follow ``base_url``, and ``params`` still apply per request."""

from __future__ import annotations

import asyncio
import json

import httpx

import pymesh.httpx
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.xds.client import XdsClient

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
