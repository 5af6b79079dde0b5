"""``Client`` / ``AsyncClient``: real httpx clients with the mesh transport mounted."""

from __future__ import annotations

from typing import Any

import httpx

from pymesh.core.runtime import MeshRuntime
from pymesh.httpx._transport import AsyncMeshTransport, MeshTransport, OutboundTrafficPolicy
from pymesh.xds.client import XdsClient

__all__ = ["AsyncClient", "Client"]

_MAX_URLS = 256


class _Cookies(httpx.Cookies):
    """httpx's cookie jar, skipping the stdlib cookie machinery for responses that set no
    cookie (httpx builds a ``urllib`` request and an ``email`` message for every response:
    ~20 us; the jar would find nothing in them)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            super().extract_cookies(response)


class _Lean:
    """What the mesh clients change in httpx's per-request work, nothing visible:

    - absolute URLs given as strings are parsed once: httpx parses the string of every
      request again (~20 us for a 40-character URL, most of it a per-character check);
      ``httpx.URL`` is an immutable value, so requests can share one. Relative URLs (joined
      with ``base_url``, which may change) are not kept;
    - the cookie jar is :class:`_Cookies` (also after ``client.cookies = ...``).
    """

    _urls: dict[str, httpx.URL]
    _cookies: httpx.Cookies

    @property
    def cookies(self) -> httpx.Cookies:
        """Cookie values to include when sending requests (httpx's)."""
        return self._cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:  # httpx's CookieTypes
        self._cookies = _Cookies(cookies)

    def _merge_url(self, url: httpx.URL | str) -> httpx.URL:
        if not isinstance(url, str):
            return super()._merge_url(url)  # type: ignore[misc,no-any-return]
        urls = self._urls
        found = urls.get(url)
        if found is not None:
            return found
        parsed = httpx.URL(url)
        if parsed.is_relative_url:
            return super()._merge_url(parsed)  # type: ignore[misc,no-any-return]
        if len(urls) >= _MAX_URLS:
            urls.clear()
        urls[url] = parsed
        return parsed


_CONSUMED = httpx.ByteStream(b"")


def _unbind(response: httpx.Response) -> None:
    """httpx binds a response and its stream to each other, a reference cycle: the response,
    its request and everything they hold would wait for the garbage collector (measured ~20 us
    of collections per request). Once the body is read and the response closed the stream is
    spent: the response gets an empty one instead, and is freed as soon as it is dropped."""
    if response.is_closed and response.is_stream_consumed:
        response.stream = _CONSUMED


class Client(_Lean, httpx.Client):
    """An ``httpx.Client`` whose requests to mesh hosts go through the mesh.

    Every httpx argument works as usual; ``transport=`` (if given) becomes the pass-through
    transport for non-mesh hosts. The mesh arguments are :class:`MeshTransport`'s.
    """

    def __init__(
        self,
        *,
        xds_client: XdsClient | None = None,
        runtime: MeshRuntime | None = None,
        outbound_traffic_policy: OutboundTrafficPolicy = "ALLOW_ANY",
        raise_on_mesh_error: bool = False,
        namespace: str | None = None,
        cluster_domain: str = "cluster.local",
        mesh_wait: float = 5.0,
        external_wait: float = 0.5,
        **kwargs: Any,
    ) -> None:
        passthrough = kwargs.pop("transport", None)
        if passthrough is None:
            passthrough = httpx.HTTPTransport(
                verify=kwargs.get("verify", True),
                cert=kwargs.get("cert"),
                trust_env=kwargs.get("trust_env", True),
                http1=kwargs.get("http1", True),
                http2=kwargs.get("http2", False),
                limits=kwargs.get("limits", httpx.Limits()),
            )
        self.mesh_transport = MeshTransport(
            xds_client,
            runtime=runtime,
            outbound_traffic_policy=outbound_traffic_policy,
            raise_on_mesh_error=raise_on_mesh_error,
            namespace=namespace,
            cluster_domain=cluster_domain,
            mesh_wait=mesh_wait,
            external_wait=external_wait,
            passthrough=passthrough,
        )
        self._urls = {}
        super().__init__(transport=self.mesh_transport, **kwargs)
        self._cookies = _Cookies(self._cookies)

    def send(
        self, request: httpx.Request, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """httpx's ``send`` (a read response does not keep its spent stream: see ``_unbind``)."""
        response = super().send(request, stream=stream, **kwargs)
        if not stream:
            _unbind(response)
        return response


class AsyncClient(_Lean, httpx.AsyncClient):
    """The ``httpx.AsyncClient`` counterpart of :class:`Client`."""

    def __init__(
        self,
        *,
        xds_client: XdsClient | None = None,
        runtime: MeshRuntime | None = None,
        outbound_traffic_policy: OutboundTrafficPolicy = "ALLOW_ANY",
        raise_on_mesh_error: bool = False,
        namespace: str | None = None,
        cluster_domain: str = "cluster.local",
        mesh_wait: float = 5.0,
        external_wait: float = 0.5,
        **kwargs: Any,
    ) -> None:
        passthrough = kwargs.pop("transport", None)
        if passthrough is None:
            passthrough = httpx.AsyncHTTPTransport(
                verify=kwargs.get("verify", True),
                cert=kwargs.get("cert"),
                trust_env=kwargs.get("trust_env", True),
                http1=kwargs.get("http1", True),
                http2=kwargs.get("http2", False),
                limits=kwargs.get("limits", httpx.Limits()),
            )
        self.mesh_transport = AsyncMeshTransport(
            xds_client,
            runtime=runtime,
            outbound_traffic_policy=outbound_traffic_policy,
            raise_on_mesh_error=raise_on_mesh_error,
            namespace=namespace,
            cluster_domain=cluster_domain,
            mesh_wait=mesh_wait,
            external_wait=external_wait,
            passthrough=passthrough,
        )
        self._urls = {}
        super().__init__(transport=self.mesh_transport, **kwargs)
        self._cookies = _Cookies(self._cookies)

    async def send(
        self, request: httpx.Request, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """httpx's ``send`` (a read response does not keep its spent stream: see ``_unbind``)."""
        response = await super().send(request, stream=stream, **kwargs)
        if not stream:
            _unbind(response)
        return response
