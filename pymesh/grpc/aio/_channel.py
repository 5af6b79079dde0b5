"""Mesh-managed ``grpc.aio`` channels: ``pymesh.grpc.aio.insecure_channel("xds:///HOST:PORT")``.

The asyncio twin of :mod:`pymesh.grpc._channel`: the same flow (driven by
:func:`~pymesh.core.flow.drive_async`), the same translation of grpcio results into outcomes
and of mesh replies into statuses, the same subchannel pool. A call object is returned at
once (as grpc.aio does) and runs the flow in a task; awaiting it (or iterating it, for
streaming responses) gives the winning attempt's answer. Errors are raised as
``grpc.aio.AioRpcError`` (a ``grpc.RpcError``) with the status a proxyless client produces.
Interceptors given to the channel run on every attempt (they wrap the endpoint channels).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from typing import Any

import grpc
import grpc.aio

from pymesh.core.flow import (
    OVERFLOWED,
    AttemptResult,
    CallResult,
    Discard,
    Flow,
    Send,
    Sleep,
    call_flow,
    resume_flow,
)
from pymesh.core.runtime import MeshRuntime
from pymesh.core.types import Outcome, PickContext
from pymesh.errors import XdsError
from pymesh.grpc._channel import (
    _CANCELLED,
    _COMMITTED,
    _END,
    CONFIG_WAIT,
    MAX_READY_WAITS,
    OK,
    MeshTarget,
    _CallError,
    _deadline_error,
    _opts,
    _Spec,
    attempt_metadata,
    classify,
    connectivity_of,
    is_xds_target,
    not_ready,
    ready_pause,
    ready_until,
    subchannel_options,
)
from pymesh.grpc._errors import MeshRpcError, error_of_reply
from pymesh.grpc._subchannels import Reachability, SubchannelPool
from pymesh.model.snapshot import TargetSnapshot
from pymesh.telemetry import _telemetry
from pymesh.telemetry import current as telemetry_current
from pymesh.telemetry._grpc import grpc_attempt_exchange, grpc_client_telemetry
from pymesh.xds.client import XdsClient

__all__ = ["AioMeshChannel", "insecure_channel", "secure_channel"]

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - missing from the type stubs


def _aio_error(error: Any) -> grpc.aio.AioRpcError:
    """grpc.aio's error type for a mesh error (application code may catch AioRpcError)."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error
    trailing = grpc.aio.Metadata(*error.trailing_metadata())
    return grpc.aio.AioRpcError(
        error.code(), grpc.aio.Metadata(), trailing, error.details(), error.debug_error_string()
    )


class _AsyncReplay:
    """A request stream (sync or async iterable) that later attempts can replay: each item
    is read from the application's stream once, by a shared fetch that a cancelled attempt
    does not cancel (a retry replays the buffer while the fetch still waits)."""

    __slots__ = ("_buf", "_done", "_fetch", "_src")

    def __init__(self, source: Any) -> None:
        if hasattr(source, "__aiter__"):
            self._src: Any = source.__aiter__()
        else:
            self._src = _aiter_sync(source)
        self._buf: list[Any] = []
        self._done = False
        self._fetch: asyncio.Future[None] | None = None

    async def _next(self) -> None:
        try:
            self._buf.append(await self._src.__anext__())
        except StopAsyncIteration:
            self._done = True
        finally:
            self._fetch = None

    async def attempt(self) -> AsyncIterator[Any]:
        i = 0
        buf = self._buf
        while True:
            while i >= len(buf):
                if self._done:
                    return
                fetch = self._fetch
                if fetch is None:
                    fetch = self._fetch = asyncio.ensure_future(self._next())
                await asyncio.shield(fetch)
            yield buf[i]
            i += 1


async def _aiter_sync(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


class _Writer:
    """The request stream of a call without a request iterator (``write``/``done_writing``)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            item = await self.queue.get()
            if item is _EOF:
                return
            yield item


class AioMeshChannel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` whose calls go through the mesh."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] | None = None,
        compression: grpc.Compression | None = None,
        interceptors: Any = None,
        *,
        xds_client: XdsClient | None = None,
        runtime: MeshRuntime | None = None,
    ) -> None:
        self._mesh = MeshTarget(
            target, runtime=runtime, xds_client=xds_client, secure=credentials is not None
        )
        opts = subchannel_options(options, self._mesh.authority)
        self._loop: asyncio.AbstractEventLoop | None = None

        # pymesh.security.MeshChannelCredentials open endpoint channels themselves (CDS TLS)
        mesh_open = getattr(credentials, "open_aio_subchannel", None)

        def open_channel(key: str) -> grpc.aio.Channel:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            if credentials is None:
                return grpc.aio.insecure_channel(key, opts, compression, interceptors)
            if mesh_open is not None:
                return mesh_open(key, opts, compression, interceptors, self._mesh)  # type: ignore[no-any-return]
            return grpc.aio.secure_channel(key, credentials, opts, compression, interceptors)

        def close_channel(channel: grpc.aio.Channel) -> None:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(lambda: loop.create_task(channel.close(None)))

        watching: set[asyncio.Task[None]] = set()
        self._watching = watching  # this channel's connectivity watches (awaited at close)

        def watch(
            key: str, channel: grpc.aio.Channel, report: Callable[[Any], None]
        ) -> Callable[[], None]:
            return _watch_connectivity(key, channel, report, watching)

        self._pool: SubchannelPool[grpc.aio.Channel] = SubchannelPool(
            open_channel,
            close_channel,
            watch=watch,
            reachability=Reachability.of(self._mesh.runtime),
        )
        self._remove_listener = self._mesh.runtime.add_hosts_removed_listener(
            self._pool.hosts_removed
        )
        self._closed = False

    @property
    def runtime(self) -> MeshRuntime:
        return self._mesh.runtime

    # -- grpc.aio.Channel -----------------------------------------------------------------

    def unary_unary(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = False,
    ) -> _Multi:
        return _Multi(
            self,
            _Spec(
                method, False, False, request_serializer, response_deserializer, _registered_method
            ),
        )

    def unary_stream(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = False,
    ) -> _Multi:
        return _Multi(
            self,
            _Spec(
                method, False, True, request_serializer, response_deserializer, _registered_method
            ),
        )

    def stream_unary(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = False,
    ) -> _Multi:
        return _Multi(
            self,
            _Spec(
                method, True, False, request_serializer, response_deserializer, _registered_method
            ),
        )

    def stream_stream(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = False,
    ) -> _Multi:
        return _Multi(
            self,
            _Spec(
                method, True, True, request_serializer, response_deserializer, _registered_method
            ),
        )

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY once the target's config is usable, TRANSIENT_FAILURE while it is in
        error, CONNECTING before the first answer."""
        del try_to_connect
        return connectivity_of(self._mesh.handle.state())

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while self.get_state() is last_observed_state and not self._closed:
            await asyncio.sleep(0.01)

    async def channel_ready(self) -> None:
        while self.get_state() is not grpc.ChannelConnectivity.READY:
            await self.wait_for_state_change(self.get_state())

    async def close(self, grace: float | None = None) -> None:
        """Close every endpoint channel (``grace`` as grpc.aio) and release the watch."""
        if self._closed:
            return
        self._closed = True
        self._remove_listener()
        channels = self._pool.close(close_channels=False)
        for channel in channels:
            await channel.close(grace)
        # The watches were cancelled: let them end on this loop (a loop closed right after
        # would otherwise destroy them pending, with a warning).
        loop = asyncio.get_running_loop()
        ending = [t for t in self._watching if not t.done() and t.get_loop() is loop]
        for task in ending:
            task.cancel()
        if ending:
            await asyncio.wait(ending, timeout=1.0)
        self._mesh.close()

    async def __aenter__(self) -> AioMeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)

    # -- the call -------------------------------------------------------------------------

    async def _call_plain(  # noqa: PLR0917 - one inline hot path
        self,
        spec: _Spec,
        request: Any,
        kwargs: dict[str, Any],
        timeout: float | None,
        metadata: Any,
        on_attempt: Callable[[Any], None],
        wait_for_ready: bool = False,
        resumed: tuple[Flow, float, TargetSnapshot] | None = None,
    ) -> tuple[Any, CallResult]:
        """Run one call through the flow (telemetry off; :meth:`_call` adds it).

        The flow is driven inline, as :func:`~pymesh.core.flow.drive_async` drives it (same
        protocol: a raising action closes the flow first), with the ``Send`` done in the loop
        itself: no coroutine per attempt and none for the runner. ``resumed``: the flow of
        a call the fast path (``MeshAioCall.__await__``) started at ``start`` under
        ``snapshot``, driven from where it stopped.
        """
        if self._closed:
            raise grpc.aio.UsageError("Channel is closed.")
        mesh = self._mesh
        clock = mesh.clock
        if resumed is not None:
            flow, start, snapshot = resumed
        else:
            start = clock()
            snapshot = mesh.handle.current()  # type: ignore[assignment]
        deadline = None if timeout is None else start + timeout
        if snapshot is None:
            wait = CONFIG_WAIT if timeout is None else timeout
            loop = asyncio.get_running_loop()
            try:
                snapshot = await loop.run_in_executor(None, mesh.handle.wait_ready, wait)
            except XdsError as exc:
                raise _aio_error(MeshRpcError(grpc.StatusCode.UNAVAILABLE, str(exc))) from None
        info = mesh.request_info_of(spec, metadata, timeout, snapshot)
        replay = _AsyncReplay(request) if spec.streaming_request else None
        streaming_response = spec.streaming_response
        pool = self._pool
        mcs = spec.mcs if spec.epoch == pool.epoch else spec.multicallables(pool)
        runtime = mesh.runtime
        waits = 0
        while True:
            if resumed is None:
                flow = call_flow(runtime, snapshot, info, clock=clock)
            resumed = None
            reply: AttemptResult | None = None
            try:
                action = next(flow)
                while True:
                    if type(action) is Send:
                        # -- the attempt: a real grpc.aio call on the endpoint's channel
                        t = action.timeout
                        caller_bound = False
                        if deadline is not None:
                            remaining = deadline - clock()
                            if remaining <= 0:
                                raise _CallError(_deadline_error())
                            if t is None or remaining <= t:
                                t, caller_bound = remaining, True
                        key = action.host.key
                        mc = mcs.get(key)
                        if mc is None:
                            mc = spec.multicallable(pool, key)
                        md = attempt_metadata(action.request.headers, info)
                        # telemetry: the metadata exchange, to mesh peers only
                        mx = grpc_attempt_exchange(action.cluster, action.host)
                        if mx:
                            md = (*md, *mx) if md else mx
                        if replay is None:
                            if kwargs is _NO_KWARGS:  # (no empty ** dict per call)
                                call = mc(request, timeout=t, metadata=md)
                            else:
                                call = mc(request, timeout=t, metadata=md, **kwargs)
                        else:
                            # Pump the buffered stream ourselves (grpc.aio's own consumer
                            # turns a write racing the end of a failed attempt into INTERNAL,
                            # hiding its real status).
                            call = mc(None, timeout=t, metadata=md, **kwargs)
                            _pump(call, replay)
                        on_attempt(call)
                        try:
                            if streaming_response:
                                first = await call.read()
                                if first is _EOF:
                                    reply = AttemptResult(OK, (call, _END))
                                else:
                                    reply = AttemptResult(_COMMITTED, (call, first))
                            else:
                                reply = AttemptResult(OK, (await call, call))
                        except grpc.RpcError as error:
                            if replay is not None and _lost_status(call, error):
                                # The server's real status is lost; the stream ended before
                                # it took all our messages: a reset before any response,
                                # which a proxyless client sees as UNAVAILABLE.
                                reply = AttemptResult(_LOST, error)
                            else:
                                reply = classify(error, caller_bound)
                        except asyncio.CancelledError:
                            call.cancel()
                            raise
                    else:
                        reply = None
                        if type(action) is Sleep:
                            await _sleep(action.seconds, deadline, clock)
                        elif type(action) is Discard:
                            _discard(action.response)
                        # Mirror: shadow requests are not sent for gRPC (nor by C-core)
                    action = flow.send(reply)
            except StopIteration as stop:
                result: CallResult = stop.value
            except _CallError as error:
                flow.close()
                raise _aio_error(error.error) from None
            except BaseException:
                flow.close()
                raise
            if not wait_for_ready or not not_ready(result):
                break
            pause = ready_pause(waits)
            waits += 1
            if waits >= MAX_READY_WAITS or clock() + pause >= ready_until(deadline, start):
                break
            result.release()
            await asyncio.sleep(pause)  # queued, as grpc queues a wait-for-ready call
            snapshot = mesh.handle.current() or snapshot
        if result.local_reply is not None:
            raise _aio_error(error_of_reply(result, mesh.target))
        response = result.response
        if isinstance(response, grpc.RpcError):
            result.release()
            raise response
        return response, result

    _call = grpc_client_telemetry(metadata_index=5)(_call_plain)
    """:meth:`_call_plain` with telemetry (trace metadata out, the call recorded)."""


_LOST = Outcome(status=200, grpc_status=UNAVAILABLE)

MAX_STATE_CHANGES = 1_000_000
"""Bound on the connectivity changes one watch follows (a channel's life has far fewer)."""


def _watch_connectivity(
    key: str,
    channel: grpc.aio.Channel,
    report: Callable[[Any], None],
    tasks: set[asyncio.Task[None]],
) -> Callable[[], None]:
    """Report an aio endpoint channel's connectivity now and at each change, from a task
    on the channel's loop (opened in a call, so a loop runs), held in ``tasks`` while it
    runs; returns the cancel function (callable from any thread)."""
    del key
    loop = asyncio.get_running_loop()
    shutdown = grpc.ChannelConnectivity.SHUTDOWN

    async def run() -> None:
        try:
            state = channel.get_state(False)
            for _ in range(MAX_STATE_CHANGES):
                report(state)
                if state is shutdown:
                    return
                await channel.wait_for_state_change(state)
                state = channel.get_state(False)
        except Exception:  # a closed channel: nothing more to report
            return

    task = loop.create_task(run())
    tasks.add(task)
    task.add_done_callback(tasks.discard)

    def cancel() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    return cancel


async def _sleep(seconds: float, deadline: float | None, clock: Callable[[], float]) -> None:
    """A flow's ``Sleep`` (fault delay, backoff), cut at the caller's deadline."""
    if deadline is not None and clock() + seconds >= deadline:
        await asyncio.sleep(max(0.0, deadline - clock()))
        raise _CallError(_deadline_error())
    await asyncio.sleep(seconds)


def _discard(response: object) -> None:
    if isinstance(response, tuple):
        cancel = getattr(response[0], "cancel", None)
        if cancel is not None:
            cancel()


_PUMPS: set[asyncio.Task[None]] = set()
_LOST_STATUS: weakref.WeakSet[Any] = weakref.WeakSet()
"""Attempts whose server ended the call while we were still writing: grpc.aio then reports
``INTERNAL`` ("Internal error from Core", its failed send) instead of the server's status."""


def _lost_status(call: Any, error: Any) -> bool:
    return call in _LOST_STATUS and error.code() is grpc.StatusCode.INTERNAL


def _pump(call: Any, replay: _AsyncReplay) -> None:
    """Write ``replay``'s items to ``call`` in a task; a failed write ends it quietly (the
    call's status says why)."""

    async def run() -> None:
        try:
            async for item in replay.attempt():
                if call.done():
                    return
                await call.write(item)
            if not call.done():
                await call.done_writing()
        except Exception:  # the attempt ended (failed or cancelled): its status tells
            _LOST_STATUS.add(call)

    task = asyncio.get_running_loop().create_task(run())
    _PUMPS.add(task)
    task.add_done_callback(_PUMPS.discard)


_NO_KWARGS: dict[str, Any] = {}


class _Multi:
    """A grpc.aio multicallable of any shape (the shape is in the spec)."""

    __slots__ = ("_channel", "_spec")

    def __init__(self, channel: AioMeshChannel, spec: _Spec) -> None:
        self._channel = channel
        self._spec = spec

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> MeshAioCall:
        if credentials is None and compression is None:
            kwargs = _NO_KWARGS  # grpc.aio's defaults; never mutated
        else:
            kwargs = {"credentials": credentials, "compression": compression}
        writer = None
        if self._spec.streaming_request and request is None:
            writer = _Writer()
            request = writer
        return MeshAioCall(
            self._channel, self._spec, request, kwargs, timeout, metadata, writer, wait_for_ready
        )


_UNSET: Any = object()
_FAST_RESULT = CallResult(None, None)
"""The result of a fast-path call (nothing to release: the attempt was released)."""
_NOT_PICKED = AttemptResult(Outcome())  # (a marker: the fast path found no host)


class MeshAioCall:
    """The call object of every shape: awaitable (unary response), async-iterable and
    ``read()`` (streaming response), ``write()`` / ``done_writing()`` (streaming request
    without an iterator), and grpc.aio's ``Call`` methods.

    A unary-response call awaited at once (``await stub.Method(request)``, the common case)
    runs its flow inline in the awaiting task: no task of its own, which saves about a sixth
    of the client CPU per call. Any other use (``add_done_callback``, ``code()`` before the
    await, streaming responses) runs the flow in a task, as grpc.aio does. One difference
    from grpc.aio: a unary call object that is never awaited nor used never starts.
    """

    def __init__(  # noqa: PLR0917
        self,
        channel: AioMeshChannel,
        spec: _Spec,
        request: Any,
        kwargs: dict[str, Any],
        timeout: float | None,
        metadata: Any,
        writer: _Writer | None,
        wait_for_ready: bool | None = None,
    ) -> None:
        self._spec = spec
        if writer is not None:
            self._writer = writer
        self._channel = channel
        # No bound method of ``self`` in here: a reference cycle per call would leave every
        # call's objects to the cyclic garbage collector.
        self._args = (spec, request, kwargs, timeout, metadata)
        self._wait_for_ready = bool(wait_for_ready)
        self._loop = asyncio.get_running_loop()
        if spec.streaming_response or writer is not None:
            self._start()

    # Defaults (class attributes: a call stores only what differs from them).
    _writer: _Writer | None = None
    _attempt: Any = None
    _first: Any = _END
    _result: CallResult | None = None
    _released = False
    _fut: asyncio.Future[Any] | None = None
    """The call's outcome as a future: the task running the flow, or (for an inline run)
    created only when something asks for it."""
    _inline: asyncio.Task[Any] | None = None
    """The awaiting task while the flow runs inline in it."""
    _out: Any = _UNSET
    """The inline run's result when no future was asked for."""

    def _start(self) -> asyncio.Future[Any]:
        fut = self._fut
        if fut is None:
            if self._inline is not None or self._out is not _UNSET:
                # An inline run: a future that mirrors it (resolved when it ends).
                fut = self._fut = self._loop.create_future()
                if self._out is not _UNSET:
                    fut.set_result(self._out)
            else:
                fut = self._fut = self._loop.create_task(self._run())
        return fut

    def _end_future(self) -> asyncio.Future[Any]:
        fut = self._fut
        if fut is None:
            fut = self._fut = self._loop.create_future()
        return fut

    def _set_attempt(self, call: Any) -> None:
        self._attempt = call

    def _run(self) -> Any:
        channel = self._channel
        call = channel._call_plain if telemetry_current() is None else channel._call
        return call(*self._args, self._set_attempt, self._wait_for_ready)

    def _release(self) -> None:
        if not self._released and self._result is not None:
            self._released = True
            self._result.release()

    def _settled(self, out: Any) -> Any:
        (value, call), result = out
        if self._result is None:
            self._result = result
            if self._spec.streaming_response:
                self._first = call
                self._attempt = value
            elif not self._released:  # (_release inlined)
                self._released = True
                result.release()
        return value

    async def _settle(self) -> Any:
        """Wait for the flow; returns the response (unary) or the winning grpcio call
        (streaming); raises the call's error."""
        fut = self._start()
        try:
            out = await fut
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the awaiting task itself is being cancelled
            raise _aio_error(MeshRpcError(grpc.StatusCode.CANCELLED, _CANCELLED)) from None
        return self._settled(out)

    # unary response
    def __await__(self) -> Generator[Any, None, Any]:
        """The call's answer. Awaited at once (the common case), the call runs in the
        awaiting task, in this generator itself (no coroutine of its own): the fast path
        (below) when it may take its method's :class:`~pymesh.core.flow.FastPlan`, else
        the flow; otherwise it waits for the task running it."""
        if self._fut is not None or self._inline is not None or self._out is not _UNSET:
            return (yield from self._settle().__await__())
        self._inline = asyncio.current_task(self._loop)
        channel = self._channel  # (_run inlined: one call less per call)
        try:
            if _telemetry._current is not None:
                out = yield from channel._call(
                    *self._args, self._set_attempt, self._wait_for_ready
                ).__await__()
            else:
                spec, request, kwargs, timeout, metadata = self._args
                mesh = channel._mesh
                snapshot = mesh.handle.current()
                fast = spec.fast
                if snapshot is not None and fast[0] is not snapshot:
                    fast = mesh.fast_plan_of(spec, snapshot)
                plan = fast[1]
                if (
                    plan is None
                    or snapshot is None
                    or metadata
                    or kwargs is not _NO_KWARGS
                    or channel._closed
                    or (timeout is not None and (fast[2] or timeout <= 0))
                ):
                    out = yield from channel._call_plain(
                        *self._args, self._set_attempt, self._wait_for_ready
                    ).__await__()
                else:
                    # The fast path: the flow's decisions for this call, made as the flow
                    # makes them (same order of clock reads, draws, counts; see FastPlan).
                    clock = mesh.clock
                    now = clock()
                    runtime = mesh.runtime
                    bits = runtime.rng.getrandbits(128)  # the flow's x-request-id draw
                    deadlines = plan.deadlines
                    t = deadlines.per_try
                    if deadlines.overall is not None:
                        deadlines = deadlines.starting_at(now)
                        remaining = deadlines.overall - now  # type: ignore[operator]
                        t = remaining if t is None else min(t, remaining)
                    caller_bound = False
                    if timeout is not None and (t is None or timeout <= t):
                        t, caller_bound = timeout, True
                    rt = runtime.leaf_for(snapshot, plan.entry, now)
                    host = rt.pick(PickContext(now)) if rt is not None else None
                    reply: AttemptResult | None = None
                    if host is None:
                        reply = _NOT_PICKED
                    elif not rt.limits.try_start_request():  # type: ignore[union-attr]
                        reply = OVERFLOWED
                    else:
                        host.active_requests += 1
                        try:
                            pool = channel._pool
                            mcs = (
                                spec.mcs if spec.epoch == pool.epoch else spec.multicallables(pool)
                            )
                            mc = mcs.get(host.key)
                            if mc is None:
                                mc = spec.multicallable(pool, host.key)
                            call = self._attempt = mc(request, timeout=t, metadata=None)
                            try:
                                value = yield from call.__await__()
                            except grpc.RpcError as error:
                                reply = classify(error, caller_bound)
                            except asyncio.CancelledError:
                                call.cancel()
                                raise
                        except BaseException as exc:
                            host.active_requests -= 1
                            rt.limits.end_request()  # type: ignore[union-attr]
                            if isinstance(exc, _CallError):
                                raise _aio_error(exc.error) from None
                            raise
                    if reply is None:  # the answer (rt, host: the attempt's)
                        detector = rt.outlier  # type: ignore[union-attr]
                        if detector is not None:
                            now = clock()
                            if detector.record(host, OK, now):  # type: ignore[arg-type]
                                rt.ejections_changed(now)  # type: ignore[union-attr]
                        host.active_requests -= 1  # type: ignore[union-attr]
                        rt.limits.end_request()  # type: ignore[union-attr]
                        out = ((value, call), _FAST_RESULT)
                    else:  # anything else: the flow goes on from here
                        flow = resume_flow(
                            runtime,
                            snapshot,
                            plan,
                            bits=bits,
                            deadlines=deadlines,
                            resumed=(now, rt, host, None if reply is _NOT_PICKED else reply),
                            clock=clock,
                        )
                        out = yield from channel._call_plain(
                            *self._args,
                            self._set_attempt,
                            self._wait_for_ready,
                            (flow, now, snapshot),
                        ).__await__()
        except asyncio.CancelledError:
            self._inline = None
            self._end_future().cancel()
            raise
        except BaseException as exc:
            self._inline = None
            failed = self._end_future()
            failed.set_exception(exc)
            failed.exception()  # retrieved: the awaiting caller gets it raised
            raise
        self._inline = None
        asked = self._fut
        if asked is None:
            self._out = out  # nobody asked for a future: none is made
        else:
            asked.set_result(out)
        if out[1] is _FAST_RESULT:  # (_settled inlined: the attempt is already released)
            self._result = _FAST_RESULT
            self._released = True
            return out[0][0]
        return self._settled(out)

    # streaming response
    async def read(self) -> Any:
        attempt = await self._settle()
        first = self._first
        if first is not _END:
            self._first = _END
            return first
        try:
            item = await attempt.read()
        except BaseException:
            self._release()
            raise
        if item is _EOF:
            self._release()
        return item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            item = await self.read()
            if item is _EOF:
                return
            yield item

    # streaming request without an iterator
    async def write(self, request: Any) -> None:
        if self._writer is None:
            raise grpc.aio.UsageError("write() needs a call made without a request iterator")
        await self._writer.queue.put(request)

    async def done_writing(self) -> None:
        if self._writer is None:
            raise grpc.aio.UsageError("done_writing() needs a call without a request iterator")
        await self._writer.queue.put(_EOF)

    # grpc.aio.Call
    def cancel(self) -> bool:
        inline = self._inline
        if inline is not None:
            inline.cancel()  # the awaiting task: its await raises CancelledError, as grpc.aio
            return True
        fut = self._start()
        if fut.done():
            attempt = self._attempt
            if self._spec.streaming_response and attempt is not None and not attempt.done():
                self._release()
                return bool(attempt.cancel())
            return False
        fut.cancel()
        return True

    def cancelled(self) -> bool:
        fut = self._fut
        return (fut is not None and fut.cancelled()) or (
            self._attempt is not None and bool(self._attempt.cancelled())
        )

    def done(self) -> bool:
        fut = self._fut
        if fut is None:
            if self._out is _UNSET:
                return False
        elif not fut.done():
            return False
        attempt = self._attempt
        return attempt is None or bool(attempt.done())

    def time_remaining(self) -> float | None:
        attempt = self._attempt
        return attempt.time_remaining() if attempt is not None else None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._start().add_done_callback(lambda _: callback(self))

    async def _winner(self) -> Any:
        try:
            await self._settle()
        except grpc.RpcError as error:
            return error
        return self._attempt

    async def initial_metadata(self) -> Any:
        w = await self._winner()
        return (
            await w.initial_metadata()
            if not isinstance(w, grpc.aio.AioRpcError)
            else (w.initial_metadata())
        )

    async def trailing_metadata(self) -> Any:
        w = await self._winner()
        if isinstance(w, grpc.aio.AioRpcError):
            return w.trailing_metadata()
        return await w.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        w = await self._winner()
        if isinstance(w, grpc.aio.AioRpcError):
            return w.code()
        code: grpc.StatusCode = await w.code()
        return code

    async def details(self) -> str:
        w = await self._winner()
        if isinstance(w, grpc.aio.AioRpcError):
            return w.details() or ""
        details: str = await w.details()
        return details

    async def wait_for_connection(self) -> None:
        await asyncio.wait({self._start()})


def insecure_channel(
    target: str,
    options: Iterable[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Any = None,
    *,
    xds_client: XdsClient | None = None,
    runtime: MeshRuntime | None = None,
) -> grpc.aio.Channel:
    """``grpc.aio.insecure_channel`` that routes ``xds:`` targets through the mesh (other
    targets go to grpc.aio unchanged)."""
    if not is_xds_target(target):
        return grpc.aio.insecure_channel(target, _opts(options), compression, interceptors)
    return AioMeshChannel(
        target, None, options, compression, interceptors, xds_client=xds_client, runtime=runtime
    )


def secure_channel(
    target: str,
    credentials: grpc.ChannelCredentials,
    options: Iterable[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Any = None,
    *,
    xds_client: XdsClient | None = None,
    runtime: MeshRuntime | None = None,
) -> grpc.aio.Channel:
    """``grpc.aio.secure_channel`` that routes ``xds:`` targets through the mesh, each
    endpoint connection with ``credentials``."""
    if not is_xds_target(target):
        return grpc.aio.secure_channel(
            target, credentials, _opts(options), compression, interceptors
        )
    return AioMeshChannel(
        target,
        credentials,
        options,
        compression,
        interceptors,
        xds_client=xds_client,
        runtime=runtime,
    )
