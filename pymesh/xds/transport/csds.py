"""The CSDS service (``envoy.service.status.v3.ClientStatusDiscoveryService``) on grpcio.

``add_csds_servicer(server, client)`` adds ``FetchClientStatus`` (unary) and
``StreamClientStatus`` (bidi: one response per request) to any ``grpc.Server`` (or
``grpc.aio.Server``: the handlers are plain functions, which it runs too), answering with
the xDS client's per-resource status, so ``grpcdebug``/``istioctl``-style tools can inspect a
pymesh process as they inspect a gRPC one (gRFC A40). Messages are (de)serialized by
:mod:`pymesh.xds.codec.csds`; this module only wires grpcio.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import grpc

from pymesh.bootstrap import Bootstrap
from pymesh.errors import XdsError
from pymesh.xds.codec.csds import (
    CSDS_SERVICE,
    ResourceStatusLike,
    StatusRequest,
    decode_status_request,
    encode_status_response,
)

__all__ = ["CSDS_SERVICE", "add_csds_servicer", "csds_handler", "serve_csds"]


class _StatusClient(Protocol):
    @property
    def bootstrap(self) -> Bootstrap: ...

    def resource_statuses(self) -> Sequence[ResourceStatusLike]: ...


def _identity(data: bytes) -> bytes:
    return data


def _answer(client: _StatusClient, request: StatusRequest) -> bytes:
    return encode_status_response(
        client.bootstrap.node,
        client.resource_statuses(),
        exclude_resource_contents=request.exclude_resource_contents,
    )


def _decode(data: bytes) -> StatusRequest:
    return decode_status_request(data)


def csds_handler(client: _StatusClient) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """A generic handler serving CSDS for ``client``."""

    def fetch(request: StatusRequest, context: grpc.ServicerContext) -> bytes:
        try:
            return _answer(client, request)
        except XdsError as exc:
            context.abort(grpc.StatusCode.INTERNAL, str(exc))
            raise  # unreachable: abort raises

    def stream(requests: Iterable[StatusRequest], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield _answer(client, request)

    handlers: dict[str, Any] = {
        "FetchClientStatus": grpc.unary_unary_rpc_method_handler(
            fetch, request_deserializer=_decode, response_serializer=_identity
        ),
        "StreamClientStatus": grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=_decode, response_serializer=_identity
        ),
    }
    return grpc.method_handlers_generic_handler(CSDS_SERVICE, handlers)


def add_csds_servicer(server: grpc.Server | grpc.aio.Server, client: _StatusClient) -> None:
    """Serve CSDS for ``client`` on ``server`` (call before ``server.start()``)."""
    server.add_generic_rpc_handlers((csds_handler(client),))


def serve_csds(client: _StatusClient, host: str, port: int) -> tuple[grpc.Server, int]:
    """Start a small grpcio server serving only CSDS for ``client`` on ``host:port``
    (``port=0``: a free one). Returns the started server and its port; stop it with
    ``server.stop(None)``. Raises :class:`XdsError` if the address cannot be bound."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="pymesh-csds"))
    add_csds_servicer(server, client)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError as exc:  # grpcio raises when it cannot bind
        raise XdsError(f"CSDS: cannot listen on {target}: {exc}") from exc
    if not bound:
        raise XdsError(f"CSDS: cannot listen on {target}")
    server.start()
    return server, bound
