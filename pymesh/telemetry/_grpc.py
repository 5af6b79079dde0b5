"""gRPC telemetry hooks for the mesh's servers and channels (duck-typed: no grpcio import
here; the adapters hand their handlers and calls in).

Server: :func:`grpc_server_handler` wraps an ``RpcMethodHandler`` so every RPC is
reported. The wrapper is the outermost layer of the server's stack, so the server span is
current while the inbound policy and the application run, and an RPC refused by policy (an
abort) is reported with its status like any other. ``response_code`` is 200 (gRPC over
HTTP/2), ``grpc_response_status`` the numeric status, as Istio reports gRPC. The caller's
metadata exchange is read into ``source_*`` and hidden from the handler and the
application's interceptors (:func:`grpc_server_details`); a caller that sent
``x-envoy-peer-metadata-id`` is answered with ours in the initial metadata.

Client: :func:`grpc_client_telemetry` decorates a channel's call; each attempt appends
:func:`grpc_attempt_exchange` (the trace context, then the exchange: only inside the mesh,
and asking an endpoint for its metadata only until it answered). The server's answer is
read into ``destination_*`` and hidden from the application's ``initial_metadata()``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

from pymesh.core.flow import CallResult
from pymesh.telemetry import _telemetry
from pymesh.telemetry._peer import METADATA_ID, hide_exchange, is_exchange_baggage

__all__ = ["grpc_attempt_exchange", "grpc_server_details", "grpc_server_handler"]

H = TypeVar("H")

_OK = 0
_UNKNOWN = 2


def _size(message: Any) -> int:
    if isinstance(message, (bytes, bytearray)):
        return len(message)
    byte_size = getattr(message, "ByteSize", None)
    if byte_size is None:
        return 0
    try:
        return int(byte_size())
    except Exception:
        return 0


def _code_of(context: Any, error: BaseException | None) -> int:
    code: Any = None
    try:
        code = context.code()
    except Exception:
        code = None
    if code is None:
        return _UNKNOWN if error is not None else _OK
    value = getattr(code, "value", code)
    if isinstance(value, tuple):
        value = value[0]
    return int(value) if isinstance(value, int) else _UNKNOWN


def _peer(context: Any, secure: bool) -> tuple[list[str], bool]:
    if not secure:
        return [], False
    try:
        auth = context.auth_context() or {}
    except Exception:
        return [], False
    sans = [
        v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        for v in auth.get("x509_subject_alternative_name", ())
    ]
    return sans, bool(auth.get("x509_pem_cert") or sans)


class _Context:
    """The application's view of a ``ServicerContext`` whose caller took part in the
    metadata exchange: ``invocation_metadata()`` without it (as behind Istio's sidecar,
    whose filter consumes the exchange headers on the way in); everything else is the
    context itself."""

    __slots__ = ("_context", "_metadata")

    def __init__(self, context: Any, metadata: tuple[Any, ...]) -> None:
        self._context = context
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[Any, ...]:
        return self._metadata

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def grpc_server_details(details: H) -> H:
    """``details`` (a ``grpc.HandlerCallDetails``) as the application's interceptors see
    it: without the caller's metadata exchange (``details`` itself when there is none or
    telemetry is off)."""
    tel = _telemetry.current()
    if tel is None or not tel.peer_exchange:
        return details
    d: Any = details
    visible = hide_exchange(d.invocation_metadata)
    if visible is None:
        return details
    replace = getattr(d, "_replace", None)  # the sync server's: a namedtuple
    if replace is not None:
        return replace(invocation_metadata=visible)  # type: ignore[no-any-return]
    try:  # grpc.aio's: a Cython class built from (method, invocation_metadata)
        return type(d)(d.method, visible)  # type: ignore[no-any-return]
    except Exception:
        return details


class _Rpc:
    """Counts of one RPC while it runs."""

    __slots__ = ("call", "req_bytes", "req_msgs", "resp_bytes", "resp_msgs")

    def __init__(self, call: _telemetry.ServerCall) -> None:
        self.call = call
        self.req_msgs = 0
        self.req_bytes = 0
        self.resp_msgs = 0
        self.resp_bytes = 0

    def requests(self, it: Any) -> Iterator[Any]:
        for m in it:
            self.req_msgs += 1
            self.req_bytes += _size(m)
            yield m

    async def arequests(self, it: Any) -> AsyncIterator[Any]:
        async for m in it:
            self.req_msgs += 1
            self.req_bytes += _size(m)
            yield m

    def answer(self, context: Any) -> None:
        """Send this workload's metadata exchange in the initial metadata (sync server) to
        a caller that sent its own, unless the application already sent initial metadata."""
        exchange = self.call.tel.exchange_metadata
        if exchange and self.exchanged():
            try:
                context.send_initial_metadata(exchange)
            except Exception:  # already sent by the application, or the RPC is over
                pass

    async def aanswer(self, context: Any) -> None:
        """:meth:`answer` for grpc.aio."""
        exchange = self.call.tel.exchange_metadata
        if exchange and self.exchanged():
            try:
                await context.send_initial_metadata(exchange)
            except Exception:  # already sent by the application, or the RPC is over
                pass

    def exchanged(self) -> bool:
        """The caller asks for our metadata: it sent ``x-envoy-peer-metadata-id`` (Envoy
        answers with its id only to a request that carried one; a grpcio server cannot see
        whether ``x-envoy-peer-metadata`` came, grpcio's core keeps it)."""
        return self.call.get_header(METADATA_ID) is not None

    def finish(self, context: Any, error: BaseException | None, secure: bool) -> None:
        sans, mtls = _peer(context, secure)
        try:
            self.call.finish(
                status=200,
                grpc_status=_code_of(context, error),
                peer_uri_sans=sans,
                mtls=mtls,
                request_bytes=self.req_bytes,
                response_bytes=self.resp_bytes,
                request_messages=self.req_msgs,
                response_messages=self.resp_msgs,
            )
        except Exception:
            _telemetry._log.exception("telemetry: recording an RPC failed")


def grpc_server_handler(
    handler: H,
    method: str,
    metadata: Sequence[tuple[str, Any]] | None,
    *,
    authority: Callable[[Any], str | None] | None = None,
    default_authority: str = "",
    secure: bool = False,
    aio: bool = False,
) -> H:
    """``handler`` with every RPC reported to the installed telemetry (``handler`` itself
    when telemetry is off). ``authority(context)`` reads the ``:authority`` when the server
    can; else ``default_authority`` (the listening address) stands in."""
    tel = _telemetry.current()
    if tel is None or handler is None:
        return handler
    headers: dict[str, str] = {}
    for k, v in metadata or ():
        if isinstance(v, str):
            if k == "baggage" and is_exchange_baggage(headers.get(k)):
                continue  # the exchange's form over the application's own baggage
            headers[k] = v
    # The caller's exchange is read here, then hidden from the application.
    visible = hide_exchange(metadata) if tel.peer_exchange else None

    def start(context: Any) -> _Rpc:
        host = (authority(context) if authority is not None else None) or default_authority
        return _Rpc(
            tel.server_call(
                protocol="grpc", method="POST", authority=host, path=method, get_header=headers.get
            )
        )

    streaming_in = bool(getattr(handler, "request_streaming", False))

    def sync_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        def behavior(request: Any, context: Any) -> Any:
            rpc = start(context)
            error: BaseException | None = None
            if streaming_in:
                request = rpc.requests(request)
            else:
                rpc.req_msgs, rpc.req_bytes = 1, _size(request)
            try:
                response = fn(request, context if visible is None else _Context(context, visible))
                rpc.resp_msgs, rpc.resp_bytes = 1, _size(response)
                rpc.answer(context)
                return response
            except BaseException as exc:
                error = exc
                raise
            finally:
                rpc.finish(context, error, secure)

        return behavior

    def sync_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
        def behavior(request: Any, context: Any) -> Iterator[Any]:
            rpc = start(context)
            error: BaseException | None = None
            if streaming_in:
                request = rpc.requests(request)
            else:
                rpc.req_msgs, rpc.req_bytes = 1, _size(request)
            try:
                for m in fn(request, context if visible is None else _Context(context, visible)):
                    if not rpc.resp_msgs:
                        rpc.answer(context)
                    rpc.resp_msgs += 1
                    rpc.resp_bytes += _size(m)
                    yield m
            except BaseException as exc:
                error = exc
                raise
            finally:
                rpc.finish(context, error, secure)

        return behavior

    def aio_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def behavior(request: Any, context: Any) -> Any:
            rpc = start(context)
            error: BaseException | None = None
            if streaming_in:
                request = rpc.arequests(request)
            else:
                rpc.req_msgs, rpc.req_bytes = 1, _size(request)
            try:
                response = fn(request, context if visible is None else _Context(context, visible))
                if inspect.isawaitable(response):
                    response = await response
                if response is not None:
                    rpc.resp_msgs, rpc.resp_bytes = 1, _size(response)
                await rpc.aanswer(context)
                return response
            except BaseException as exc:
                error = exc
                raise
            finally:
                rpc.finish(context, error, secure)

        return behavior

    def aio_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
            rpc = start(context)
            error: BaseException | None = None
            if streaming_in:
                request = rpc.arequests(request)
            else:
                rpc.req_msgs, rpc.req_bytes = 1, _size(request)
            try:
                result = fn(request, context if visible is None else _Context(context, visible))
                if inspect.isasyncgen(result):
                    async for m in result:
                        if not rpc.resp_msgs:
                            await rpc.aanswer(context)
                        rpc.resp_msgs += 1
                        rpc.resp_bytes += _size(m)
                        yield m
                elif inspect.isawaitable(result):
                    await result
                else:
                    for m in result:
                        if not rpc.resp_msgs:
                            await rpc.aanswer(context)
                        rpc.resp_msgs += 1
                        rpc.resp_bytes += _size(m)
                        yield m
            except BaseException as exc:
                error = exc
                raise
            finally:
                rpc.finish(context, error, secure)

        return behavior

    unary, stream = (aio_unary, aio_stream) if aio else (sync_unary, sync_stream)
    h: Any = handler
    if h.unary_unary is not None:
        return h._replace(unary_unary=unary(h.unary_unary))  # type: ignore[no-any-return]
    if h.unary_stream is not None:
        return h._replace(unary_stream=stream(h.unary_stream))  # type: ignore[no-any-return]
    if h.stream_unary is not None:
        return h._replace(stream_unary=unary(h.stream_unary))  # type: ignore[no-any-return]
    if h.stream_stream is not None:
        return h._replace(stream_stream=stream(h.stream_stream))  # type: ignore[no-any-return]
    return handler


# --------------------------------------------------------------------------- client


class _Outbound:
    """What the attempts of one traced call share with the channel (through
    :data:`_OUTBOUND`): the trace context headers (bytes, as grpcio takes them too) and
    whether an attempt asked the server for its metadata."""

    __slots__ = ("asked", "call", "trace")

    def __init__(self, call: Any, trace: tuple[tuple[bytes, bytes], ...]) -> None:
        self.call = call
        self.trace = trace
        self.asked = False


_OUTBOUND: ContextVar[_Outbound | None] = ContextVar("pymesh_grpc_outbound", default=None)
"""The traced call running in this context (set by :func:`grpc_client_telemetry` around
the channel's call: same thread for sync calls, same task for grpc.aio)."""


def _client_start(spec: Any, channel: Any, args: list[Any], metadata_index: int) -> Any:
    """The telemetry of an outbound RPC, or ``None`` (telemetry off). Its trace context
    and the metadata exchange go per attempt, not into the call's metadata (argument
    ``metadata_index``): as Envoy's router injects them into each upstream request, and
    so the flow sees the application's request as it is (a call without metadata keeps
    its fast path). Exchange metadata the application set itself is dropped (ours, or
    none outside the mesh, replaces it), as the httpx side does."""
    tel = _telemetry._current
    if tel is None:
        return None
    metadata = args[metadata_index]
    if metadata and tel.exchange_metadata:
        own = hide_exchange(metadata)
        if own is not None:
            args[metadata_index] = own
    mesh = getattr(channel, "_mesh", None)
    authority = getattr(mesh, "authority", "") or ""
    call = _telemetry.ClientCall(tel, "grpc", "POST", authority, spec.method, None)
    return _Outbound(call, tel._trace_headers(call) if tel.tracing else ())


_EXTERNAL: dict[int, tuple[object, bool]] = {}
"""``id(cluster config)`` -> (the config, whether it leads outside the mesh)."""
_MAX_EXTERNAL = 4096


_LEARNED: dict[int, tuple[Any, Any, float]] = {}
"""``id(host)`` -> (the host, the workload its server answered with, until when that is
trusted without asking again)."""
_MAX_LEARNED = 4096
_clock: Callable[[], float] = time.monotonic
LEARNED_FOR = 10.0
"""Seconds an endpoint's answered workload is reused before the exchange asks again."""
_QUIET: tuple[Any, tuple[tuple[str, str], ...]] = (None, ())
"""(telemetry, its exchange metadata without ``x-envoy-peer-metadata-id``)."""


def grpc_attempt_exchange(cluster: Any, host: Any = None) -> tuple[tuple[Any, Any], ...]:
    """For the gRPC adapters: telemetry's metadata for one attempt on ``host`` of
    ``cluster`` (a ``ClusterRuntime``), to append to the attempt's: the traced call's
    trace context, then the installed telemetry's metadata exchange, unless the exchange
    is off or the cluster leads outside the mesh
    (:func:`~pymesh.telemetry._telemetry.mesh_external`, the predicate the httpx side
    uses; memoized per cluster config). ``()`` when telemetry is off.

    While the workload ``host``'s server answered with is known (:data:`LEARNED_FOR`
    seconds), the exchange goes without ``x-envoy-peer-metadata-id``: the server still
    learns the caller, but does not answer (it answers a request carrying the id, as
    Envoy does), and the call is labelled with the known workload. A grpcio server's
    answer is initial metadata sent on its own, ahead of the response: a frame more per
    call each way, the largest part of gRPC telemetry's cost before."""
    tel = _telemetry._current
    if tel is None:
        return ()
    out = _OUTBOUND.get()
    trace = out.trace if out is not None else ()
    exchange = tel.exchange_metadata
    if not exchange:
        return trace
    config = cluster.config
    found = _EXTERNAL.get(id(config))
    if found is None or found[0] is not config:
        model = getattr(config, "cluster", None)
        external = _telemetry.mesh_external(cluster.name, getattr(model, "metadata", None))
        found = (config, external)
        if len(_EXTERNAL) >= _MAX_EXTERNAL:
            _EXTERNAL.clear()
        _EXTERNAL[id(config)] = found
    if found[1]:
        return trace
    learned = _LEARNED.get(id(host))
    if learned is not None and learned[0] is host and _clock() < learned[2]:
        exchange = _quiet(tel, exchange)
    elif out is not None:
        out.asked = True  # its answer is read (and hidden from the application)
    return (*trace, *exchange) if trace else exchange


def _quiet(tel: Any, exchange: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``exchange`` without ``x-envoy-peer-metadata-id`` (memoized for ``tel``)."""
    global _QUIET
    quiet = _QUIET
    if quiet[0] is not tel:
        quiet = _QUIET = (tel, tuple(kv for kv in exchange if kv[0] != METADATA_ID))
    return quiet[1]


def _known(host: Any) -> Any:
    """The workload ``host``'s server answered with, while it is trusted (else ``None``)."""
    learned = _LEARNED.get(id(host))
    if learned is not None and learned[0] is host and _clock() < learned[2]:
        return learned[1]
    return None


def _learn(host: Any, peer: Any) -> Any:
    """``peer``, what ``host``'s server answered now: remembered for :data:`LEARNED_FOR`
    seconds (``None``: no answer; what was learned before, if still trusted)."""
    if host is None:
        return peer
    if peer is None:
        return _known(host)
    if len(_LEARNED) >= _MAX_LEARNED:  # (an answer comes only when asked: rarely)
        _LEARNED.clear()
    _LEARNED[id(host)] = (host, peer, _clock() + LEARNED_FOR)
    return peer


def _exchange_sources(result: Any, error: Any) -> list[Any]:
    """The grpc call objects of a finished call whose ``initial_metadata()`` may carry the
    server's metadata exchange: ``(value, call)`` / ``(iterator, first)`` responses, or
    the error (a ``grpc.RpcError`` is a call too)."""
    out = []
    response = getattr(result, "response", None) if result is not None else None
    if isinstance(response, tuple) and len(response) == 2:
        for candidate in response:
            if callable(getattr(candidate, "initial_metadata", None)):
                out.append(candidate)
                break
    if error is not None and callable(getattr(error, "initial_metadata", None)):
        out.append(error)
    return out


def _peer_of_metadata(tel: Any, metadata: Any) -> Any:
    """The peer named by gRPC metadata: ``x-envoy-peer-metadata`` when the application
    sees it (grpcio's core keeps that key for itself), else the ambient ``baggage``."""
    if not metadata:
        return None
    found = None
    for item in metadata:
        key, value = item[0], item[1]
        if not isinstance(value, str):
            continue
        if key == "x-envoy-peer-metadata":
            peer = tel.peer_of_headers({key: value}.get)
            if peer is not None:
                return peer
        elif key == "baggage" and found is None:
            found = tel.peer_of_headers({key: value}.get)
    return found


def _visible(metadata: Any) -> Any:
    """``metadata`` without the metadata exchange, of the same type (``None``: nothing to
    hide)."""
    visible = hide_exchange(metadata)
    if visible is None:
        return None
    from_tuple = getattr(type(metadata), "from_tuple", None)  # grpc.aio.Metadata
    return from_tuple(visible) if from_tuple is not None else visible


def _hide_answer(source: Any, metadata: Any) -> None:
    """Hide the server's metadata exchange in ``source``'s initial metadata from the
    application, as Istio's client sidecar removes it from the response (it was read
    first). grpcio keeps a received call's initial metadata in its state (sync calls and
    their errors: ``_state.initial_metadata``; a ``grpc.aio`` error:
    ``_initial_metadata``); a ``grpc.aio`` call answers ``initial_metadata()`` from its
    core each time, so the method is shadowed on that call object."""
    value = _visible(metadata)
    if value is None:
        return
    try:
        state = getattr(source, "_state", None)
        if state is not None and getattr(state, "initial_metadata", None) is not None:
            state.initial_metadata = value
        elif hasattr(source, "_initial_metadata"):
            source._initial_metadata = value
        elif callable(getattr(source, "initial_metadata", None)):

            async def initial_metadata() -> Any:
                return value

            source.initial_metadata = initial_metadata
    except (AttributeError, TypeError):  # an object that keeps it elsewhere: left as is
        pass


_ASYNC_TYPES: dict[type, bool] = {}


def _async_initial_metadata(kind: type) -> bool:
    """Whether objects of ``kind`` have an ``async def initial_metadata`` (memoized)."""
    found = _ASYNC_TYPES.get(kind)
    if found is None:
        found = _ASYNC_TYPES[kind] = inspect.iscoroutinefunction(
            getattr(kind, "initial_metadata", None)
        )
    return found


def _hide_later(result: Any) -> None:
    """For a grpc.aio call that did not ask for the server's metadata (not read, to save
    an await per call): its ``initial_metadata()`` hides an exchange all the same, should
    the server send one unasked, when the application reads it."""
    response = result.response if result is not None else None
    if not isinstance(response, tuple) or len(response) != 2:
        return
    source = next((s for s in response if _async_initial_metadata(type(s))), None)
    if source is None:
        return
    original = source.initial_metadata

    async def initial_metadata() -> Any:
        metadata = await original()
        value = _visible(metadata)
        return metadata if value is None else value

    try:
        source.initial_metadata = initial_metadata
    except (AttributeError, TypeError):
        pass


def _server_peer(tel: Any, result: Any, error: Any) -> Any:
    """The workload a sync call's server answered with, hidden from the application."""
    if not tel.peer_exchange:
        return None
    for source in _exchange_sources(result, error):
        try:
            metadata = source.initial_metadata()
        except Exception:
            continue
        if inspect.isawaitable(metadata):  # grpc.aio: read by _aserver_peer instead
            close = getattr(metadata, "close", None)
            if close is not None:
                close()
            continue
        if not metadata:
            continue
        peer = _peer_of_metadata(tel, metadata)
        _hide_answer(source, metadata)
        if peer is not None:
            return peer
    return None


async def _aserver_peer(tel: Any, result: Any, error: Any) -> Any:
    """:func:`_server_peer` for grpc.aio calls."""
    if not tel.peer_exchange:
        return None
    for source in _exchange_sources(result, error):
        try:
            metadata = source.initial_metadata()
            if inspect.isawaitable(metadata):
                metadata = await metadata
        except Exception:
            continue
        if not metadata:
            continue
        peer = _peer_of_metadata(tel, metadata)
        _hide_answer(source, metadata)
        if peer is not None:
            return peer
    return None


def _host_of(result: Any) -> Any:
    return result.host if result is not None else None


def _client_finish(  # noqa: PLR0917 - internal
    call: Any, spec: Any, request: Any, result: Any, error: Any, peer: Any
) -> None:
    grpc_status = _OK
    if error is not None:
        code = getattr(error, "code", None)
        value: Any = code() if callable(code) else None
        value = getattr(value, "value", value)
        grpc_status = value[0] if isinstance(value, tuple) else _UNKNOWN
        if result is None:
            for candidate in (error, error.__cause__, error.__context__):
                found = getattr(candidate, "result", None)
                if isinstance(found, CallResult):  # a mesh error carries the flow's result
                    result = found
                    break
    streaming_in = bool(getattr(spec, "streaming_request", False))
    try:
        status = 200
        if result is not None and result.local_reply is not None:
            status = result.local_reply.status
        call.finish(
            result,
            status=status,
            grpc_status=grpc_status,
            request_bytes=0 if streaming_in else _size(request),
            request_messages=0 if streaming_in else 1,
            response_messages=1 if error is None else 0,
            service=None if result is not None else _host(call.authority),
            peer=peer,
        )
    except Exception:
        _telemetry._log.exception("telemetry: recording an RPC failed")


def _host(authority: str) -> str | None:
    if not authority:
        return None
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


def grpc_client_telemetry(metadata_index: int) -> Callable[[Any], Any]:
    """Decorates a mesh channel's ``_call(self, spec, request, ...)`` (sync or async;
    ``metadata_index``: the position of its metadata argument, ``self`` being 0): the call
    is traced (its attempts get telemetry's metadata from :func:`grpc_attempt_exchange`)
    and recorded when it returns or raises. For a streaming response the call is recorded
    when its first message (or its end) arrives."""

    def decorate(fn: Any) -> Any:
        if inspect.iscoroutinefunction(fn):

            async def acall(*args: Any) -> Any:
                largs = list(args)
                out = _client_start(largs[1], largs[0], largs, metadata_index)
                if out is None:
                    return await fn(*args)
                token = _OUTBOUND.set(out)
                try:
                    response, result = await fn(*largs)
                except BaseException as exc:
                    _OUTBOUND.reset(token)
                    tel = out.call.tel
                    peer = await _aserver_peer(tel, None, exc)
                    _client_finish(out.call, largs[1], largs[2], None, exc, peer)
                    raise
                _OUTBOUND.reset(token)
                host = _host_of(result)
                if out.asked:
                    peer = _learn(host, await _aserver_peer(out.call.tel, result, None))
                else:
                    peer = _known(host)
                    if out.call.tel.peer_exchange:
                        _hide_later(result)
                _client_finish(out.call, largs[1], largs[2], result, None, peer)
                return response, result

            return acall

        def scall(*args: Any) -> Any:
            largs = list(args)
            out = _client_start(largs[1], largs[0], largs, metadata_index)
            if out is None:
                return fn(*args)
            token = _OUTBOUND.set(out)
            try:
                response, result = fn(*largs)
            except BaseException as exc:
                _OUTBOUND.reset(token)
                peer = _server_peer(out.call.tel, None, exc)
                _client_finish(out.call, largs[1], largs[2], None, exc, peer)
                raise
            _OUTBOUND.reset(token)
            # (read even when not asked: a sync call keeps it, reading is cheap, and an
            # exchange sent unasked is hidden all the same)
            peer = _server_peer(out.call.tel, result, None)
            host = _host_of(result)
            if out.asked:
                peer = _learn(host, peer)
            elif peer is None:
                peer = _known(host)
            _client_finish(out.call, largs[1], largs[2], result, None, peer)
            return response, result

        return scall

    return decorate
