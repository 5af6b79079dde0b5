"""The asyncio xDS-managed server: ``pymesh.grpc.aio.server(...)``, ``grpc.aio``'s API.

grpcio has no asyncio xDS server; this one shares everything but the I/O with the sync one
(:class:`pymesh.grpc._server.ServingCore`: listener watch, serving state, inbound verdict). The
interceptor awaits the fault delay instead of sleeping a thread; health status changes made on
the xDS thread are handed to the server's event loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent import futures
from typing import Any, TypeAlias

import grpc
import grpc.aio

from pymesh.grpc import _inbound
from pymesh.grpc._server import (
    HEALTH_SERVICE,
    ServingCore,
    ServingStatus,
    bind_front,
    close_owned_provider,
    service_names_of,
    status_code,
)
from pymesh.telemetry._grpc import grpc_server_details, grpc_server_handler
from pymesh.xds.client import XdsClient

__all__ = ["AioXdsServer", "server"]


_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class _AioInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Applies the inbound filter chain before the application's handler runs."""

    def __init__(self, core: ServingCore) -> None:
        self._core = core

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # the application's interceptors see the call without the metadata exchange
        handler: Any = await continuation(grpc_server_details(handler_call_details))
        if handler is None:
            return None  # type: ignore[return-value]  # grpc.aio: None = unknown method
        core = self._core
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]

        async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> _inbound.InboundDecision:
            # grpc.aio exposes no :authority to handlers: the listening address stands in.
            request = core.request_info(method, metadata, None)
            peer = core.peer_info(context.peer(), context.auth_context() if core.secure else None)
            decision = core.decide(method, request, peer)
            if decision.delay:
                remaining = context.time_remaining()
                await asyncio.sleep(
                    decision.delay if remaining is None else min(decision.delay, remaining)
                )
            if decision.code is not None:
                if decision.fault is not None:
                    decision.fault.end()
                await context.abort(status_code(decision.code), decision.message)
            return decision

        def wrap_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                decision = await admit(context)
                try:
                    result = fn(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                finally:
                    if decision.fault is not None:
                        decision.fault.end()

            return behavior

        def wrap_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def behavior(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                decision = await admit(context)
                try:
                    result = fn(request, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    elif inspect.isawaitable(result):
                        await result  # a handler writing with context.write()
                    else:
                        for item in result:
                            yield item
                finally:
                    if decision.fault is not None:
                        decision.fault.end()

            return behavior

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        tel = functools.partial(  # telemetry: reports every RPC (the outermost layer)
            grpc_server_handler, method=method, metadata=metadata,
            default_authority=core.address, secure=core.secure, aio=True,
        )  # fmt: skip
        if handler.unary_unary is not None:
            return tel(
                grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **kwargs)
            )
        if handler.unary_stream is not None:
            return tel(
                grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **kwargs)
            )
        if handler.stream_unary is not None:
            return tel(
                grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **kwargs)
            )
        return tel(
            grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **kwargs)
        )


class AioXdsServer(grpc.aio.Server):
    """A ``grpc.aio.Server`` whose RPCs pass the xDS inbound filter chain."""

    def __init__(
        self,
        inner: grpc.aio.Server,
        core: ServingCore,
        health: Any,
        *,
        reflection: bool,
        services: list[str] | None = None,
    ) -> None:
        self._inner = inner
        self._core = core
        self._health = health
        self._reflection = reflection
        self._services: list[str] = services if services is not None else []

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[Any]) -> None:
        generic_rpc_handlers = list(generic_rpc_handlers)
        self._services.extend(service_names_of(generic_rpc_handlers))
        self._inner.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self._services.append(service_name)
        self._inner.add_registered_method_handlers(service_name, method_handlers)  # type: ignore[attr-defined]

    def add_insecure_port(self, address: str) -> int:
        self._core.check_no_port()
        port = self._inner.add_insecure_port(address)
        self._core.add_port(address, port, secure=False)
        return port

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        self._core.check_no_port()
        port = self._inner.add_secure_port(address, server_credentials)
        self._core.add_port(address, port, secure=True)
        self._core.own(close_owned_provider(server_credentials))
        return port

    def add_permissive_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        """One port for mTLS and plaintext clients (PERMISSIVE): see
        :meth:`pymesh.grpc.XdsServer.add_permissive_port`."""
        self._core.check_no_port()
        self._core.add_front(
            address, bind_front(self._inner, address, server_credentials, self._core)
        )
        self._core.own(close_owned_provider(server_credentials))
        return self._core.front_port

    async def start(self) -> None:
        if self._reflection:
            from grpc_reflection.v1alpha import reflection

            names = list(dict.fromkeys([*self._services, HEALTH_SERVICE, reflection.SERVICE_NAME]))
            reflection.enable_server_reflection(names, self._inner)
        _LOOPS[id(self._core)] = asyncio.get_running_loop()
        self._core.start()
        await self._inner.start()

    async def stop(self, grace: float | None = None) -> None:
        self._core.close()
        await self._health.enter_graceful_shutdown()
        await self._inner.stop(grace)
        self._core.close_front()  # a PERMISSIVE port's connections, after the grace
        _LOOPS.pop(id(self._core), None)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._inner.wait_for_termination(timeout)

    @property
    def serving(self) -> bool:
        return self._core.serving

    @property
    def serving_status(self) -> ServingStatus:
        return self._core.status

    @property
    def listener_name(self) -> str | None:
        return self._core.listener_name

    async def wait_for_serving(self, timeout: float) -> bool:
        """Wait until SERVING (True) or ``timeout`` seconds pass (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._core.serving:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True


_LOOPS: dict[int, asyncio.AbstractEventLoop] = {}


def server(  # noqa: PLR0917 - grpcio's positional signature
    migration_thread_pool: futures.Executor | None = None,
    handlers: Sequence[grpc.GenericRpcHandler[Any, Any]] | None = None,
    interceptors: Sequence[Any] | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
    *,
    xds_serving_callback: Callable[[ServingStatus], None] | None = None,
    xds_client: XdsClient | None = None,
    health: bool = True,
    reflection: bool = True,
    rng: random.Random | None = None,
) -> AioXdsServer:
    """An xDS-managed ``grpc.aio.Server`` (``grpc.aio.server``'s signature plus the keywords
    of :func:`pymesh.grpc.server`). ``xds_serving_callback`` runs on the xDS thread."""
    from grpc_health.v1 import _async as health_aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    servicer = health_aio.HealthServicer()
    holder: list[ServingCore] = []
    services: list[str] = []

    def set_health(serving: bool) -> None:
        if not health or not holder:
            return
        loop = _LOOPS.get(id(holder[0]))
        if loop is None or loop.is_closed():
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in dict.fromkeys(["", *services]):
            asyncio.run_coroutine_threadsafe(servicer.set(name, status), loop)

    core = ServingCore(
        xds_client=xds_client,
        xds_serving_callback=xds_serving_callback,
        set_health=set_health,
        rng=rng,
    )
    holder.append(core)
    inner = grpc.aio.server(
        migration_thread_pool,
        handlers=None,
        interceptors=[_AioInterceptor(core), *(interceptors or ())],
        options=options,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        compression=compression,
    )
    wrapper = AioXdsServer(inner, core, servicer, reflection=reflection, services=services)
    if health:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, wrapper)
    if handlers:
        wrapper.add_generic_rpc_handlers(handlers)
    return wrapper
