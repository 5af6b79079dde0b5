"""The gRPC driver of the ADS service (grpc.aio): sockets in, :class:`Hub` calls, sockets out.

Each stream gets a reader task (requests -> ``Hub.handle``) and the handler coroutine writes
what the connection's queue holds. Anything wrong with one stream (garbage bytes that fail to
deserialize, a protocol error, a generator failure for its node, a client vanishing) ends
that stream alone; the hub and the other streams carry on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from pymesh.controlplane.server._hub import Close, Connection, Hub, ProtocolError
from pymesh.controlplane.server._wire import from_delta, from_sotw

__all__ = ["AdsServicer"]

log = logging.getLogger("pymesh.controlplane")
_Context = grpc.aio.ServicerContext[Any, Any]
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 (missing from the stubs)


_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def _as_is(data: bytes) -> bytes:
    """The response serializer: the hub hands over responses already encoded."""
    return data


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """``envoy.service.discovery.v3.AggregatedDiscoveryService`` over a :class:`Hub`."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve on ``server`` (as the generated ``add_..._to_server`` does, except that
        responses are written as the wire bytes the hub encoded)."""
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_as_is,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_as_is,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
        register = getattr(server, "add_registered_method_handlers", None)
        if register is not None:
            register(_SERVICE, handlers)

    async def StreamAggregatedResources(self, request_iterator: object, context: _Context) -> None:
        await self._serve(context, delta=False)

    async def DeltaAggregatedResources(self, request_iterator: object, context: _Context) -> None:
        await self._serve(context, delta=True)

    async def _serve(self, context: _Context, *, delta: bool) -> None:
        conn = self._hub.open(context.peer(), delta=delta)
        reader = asyncio.create_task(self._read(conn, context))
        try:
            while True:  # until the reader or a Close ends the stream
                item = await conn.queue.get()
                if item is None:
                    return
                if isinstance(item, Close):
                    await context.abort(item.code, item.message)
                    return
                await context.write(item)
        finally:
            reader.cancel()
            self._hub.close(conn)

    async def _read(self, conn: Connection, context: _Context) -> None:
        try:
            while True:  # until the client half-closes or the stream breaks
                msg = await context.read()
                if msg is _EOF:
                    return
                if conn.delta:
                    assert isinstance(msg, discovery_pb2.DeltaDiscoveryRequest)
                    req = from_delta(msg)
                else:
                    assert isinstance(msg, discovery_pb2.DiscoveryRequest)
                    req = from_sotw(msg)
                node = msg.node if msg.HasField("node") else None
                try:
                    out = self._hub.handle(conn, req, node)
                except ProtocolError as exc:
                    conn.queue.put_nowait(Close(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
                    return
                except Exception as exc:
                    log.exception("request from %s failed", conn.node_id or conn.peer)
                    self._hub.metrics.inc("pilot_xds_push_errors")
                    conn.queue.put_nowait(Close(grpc.StatusCode.INTERNAL, f"request failed: {exc}"))
                    return
                for item in out:
                    conn.queue.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke (client gone, undecodable bytes)
            log.info("ADS stream %s ended: %s", conn.node_id or conn.peer, exc)
            conn.queue.put_nowait(Close(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {exc}"))
        finally:
            conn.queue.put_nowait(None)
