"""Mesh-managed grpcio channels (sync): ``pymesh.grpc.insecure_channel("xds:///HOST:PORT")``.

A :class:`MeshChannel` is a ``grpc.Channel``: generated stubs work on it unchanged. Each call
reads the target's snapshot once, builds the policy core's ``RequestInfo`` (``POST``,
``:path`` = ``/package.Service/Method``, metadata as headers, ``:authority`` = the target's
``HOST:PORT``, ``grpc=True``) and drives the same :func:`~pymesh.core.flow.call_flow` as the
httpx adapter (routing, weighted clusters, faults, retries, deadlines, limits, outlier
detection). This module only does what the flow asks: a ``Send`` becomes a real grpcio call
on the endpoint's pooled channel (:mod:`pymesh.grpc._subchannels`) with the attempt's timeout
as its deadline.

The edge translation (STYLE.md #10), attempt by attempt:

=================================================  ==========================================
grpcio result of an attempt                        the flow's ``Outcome``
=================================================  ==========================================
response (unary) / first message (streaming)       ``status=200`` (committed: the call is
                                                   never retried after the first message)
``DEADLINE_EXCEEDED`` of the mesh's attempt        ``reset=PER_TRY_TIMEOUT``
``DEADLINE_EXCEEDED`` of the caller's ``timeout``  raised to the caller at once
``UNAVAILABLE`` "failed to connect to all          ``reset=CONNECT_FAILURE`` (nothing was
addresses" (no connection to the endpoint)         sent)
any other status (also a stream ending empty)      ``status=200, grpc_status=N``, with the
                                                   ``grpc-retry-pushback-ms`` trailing
                                                   metadata in ``headers`` when present
=================================================  ==========================================

An attempt that could not connect is a connect failure for the policies: retried under
``connect-failure`` / ``reset-before-request`` (as for HTTP) and under ``unavailable`` (how
a proxyless client's retry policy sees it: the core's ``RetryState(is_grpc=True)`` counts a
connect failure as ``UNAVAILABLE``), counted by outlier detection as Envoy counts one; a call
that ends on it fails ``UNAVAILABLE`` (Envoy's "upstream connect error" text, flag ``UF``),
and a ``wait_for_ready`` call waits instead. Other resets are grpcio statuses and stay so.
Subchannel connectivity also reaches the balancer (:mod:`pymesh.grpc._subchannels`): an
endpoint in ``TRANSIENT_FAILURE`` is not picked until it is usable again.

Deadlines: the caller's ``timeout`` is the call's deadline (as in grpcio); it is also shown to
the route as a ``grpc-timeout`` header, so ``grpc_timeout_header_max`` / ``max_grpc_timeout``
apply as in Envoy. Each attempt's grpcio deadline is ``min(flow timeout, caller deadline)``;
backoffs and fault delays stop at the caller's deadline. Streaming request iterators are
buffered so a retry can replay what was sent (gRPC's retry buffer; unbounded here).
"""

from __future__ import annotations

import base64
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from pymesh.core.deadline import format_grpc_timeout
from pymesh.core.flow import (
    AttemptResult,
    CallResult,
    Discard,
    FastPlan,
    ReplyKind,
    RequestIdHeaders,
    Send,
    Sleep,
    call_flow,
    fast_plan,
)
from pymesh.core.retry import PUSHBACK_HEADER
from pymesh.core.runtime import MeshRuntime
from pymesh.core.types import Headers, Outcome, RequestInfo, ResetKind
from pymesh.errors import XdsError
from pymesh.grpc._errors import MeshRpcError, error_of_reply
from pymesh.grpc._subchannels import Reachability, SubchannelPool
from pymesh.model.route import RouteAction
from pymesh.model.snapshot import TargetError, TargetSnapshot
from pymesh.telemetry import current as telemetry_current
from pymesh.telemetry._grpc import grpc_attempt_exchange, grpc_client_telemetry
from pymesh.xds.client import XdsClient
from pymesh.xds.watch import TargetHandle, parse_target

__all__ = [
    "CONFIG_WAIT",
    "MeshChannel",
    "insecure_channel",
    "is_xds_target",
    "secure_channel",
]

CONFIG_WAIT = 20.0
"""How long a call without a deadline waits for the target's first xDS config (C-core
queues such calls until the resolver answers; we bound it)."""

Metadata = tuple[tuple[str, str | bytes], ...]

OK = Outcome(status=200, grpc_status=0)
_COMMITTED = Outcome(status=200)
_END = object()  # a stream that ended before its first message


def is_xds_target(target: str) -> bool:
    """``xds:///HOST:PORT`` or ``xds://AUTHORITY/HOST:PORT`` (anything else is grpcio's)."""
    return target.startswith("xds:")


# --------------------------------------------------------------------------- shared core


class _CallError(Exception):
    """Ends a call from inside a runner callback with ``error`` (the flow is closed)."""

    def __init__(self, error: grpc.RpcError) -> None:
        super().__init__()
        self.error = error


def classify(error: Any, caller_bound: bool) -> AttemptResult:
    """The flow's outcome of an attempt that ended with grpcio error ``error``.

    ``caller_bound``: the attempt's deadline was the caller's own (its expiry is raised,
    not retried). Raises :class:`_CallError` for errors that end the call as they are.
    """
    code = error.code()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        if caller_bound:
            raise _CallError(error)
        return AttemptResult(Outcome(reset=ResetKind.PER_TRY_TIMEOUT))
    if code is grpc.StatusCode.UNAVAILABLE and is_connect_failure(error):
        return AttemptResult(_CONNECT_FAILURE, error)
    pushback = _pushback(error)
    if pushback is not None:
        return AttemptResult(
            Outcome(status=200, grpc_status=code.value[0], headers=pushback), error
        )
    return AttemptResult(Outcome(status=200, grpc_status=code.value[0]), error)


_CONNECT_FAILURE = Outcome(reset=ResetKind.CONNECT_FAILURE)


def is_connect_failure(error: Any) -> bool:
    """grpcio's ``UNAVAILABLE`` of a call that found no connection to its endpoint (the
    channel could not connect, or is in TRANSIENT_FAILURE): "failed to connect to all
    addresses; last error: ...". Nothing was sent: a connect failure for the policies."""
    details = error.details() or ""
    return details.startswith("failed to connect")


def _pushback(error: Any) -> Headers | None:
    """The ``grpc-retry-pushback-ms`` trailing metadata of a failed attempt, as the
    outcome's headers (the core's gRPC retry policy reads it, gRFC A6), or ``None``."""
    try:
        trailing = error.trailing_metadata()
    except Exception:
        return None
    for k, v in trailing or ():
        if k == PUSHBACK_HEADER:
            value = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
            return Headers(((PUSHBACK_HEADER, value),))
    return None


def attempt_metadata(headers: Headers, original: RequestInfo) -> Metadata | None:
    """The metadata grpcio sends for an attempt: the flow's headers without the reserved
    ones (grpcio sets ``grpc-timeout``, ``content-type``, ``te`` itself), ``-bin`` values back
    to bytes. The ``x-request-id`` the flow generates (Envoy's) is not sent unless the caller
    gave one: a proxyless gRPC client does not add it, and metadata costs grpcio time per
    call. ``None`` when there is nothing to send."""
    items: Iterable[tuple[str, str]]
    if type(headers) is RequestIdHeaders:  # the caller's headers and the flow's own id
        items = headers.base  # (the id is never formatted)
        if not items:
            return None  # the common case: no metadata
        keep_id = True  # (none in ``base``)
    else:
        items = headers
        keep_id = "x-request-id" in original.headers
    out: list[tuple[str, str | bytes]] = []
    for k, v in items:
        if k.startswith(("grpc-", ":")) or k in _RESERVED:
            continue
        if k == "x-request-id" and not keep_id:
            continue
        if k.endswith("-bin"):
            out.append((k, base64.b64decode(v + "=" * (-len(v) % 4))))
        else:
            out.append((k, v))
    return tuple(out) if out else None


_RESERVED = frozenset({"te", "content-type", "user-agent", "host"})


class MeshTarget:
    """What every call of a mesh channel shares: the target, its handle and runtime, the
    subchannel pool and the options of the grpcio channels it opens. No I/O of its own."""

    def __init__(
        self,
        target: str,
        *,
        runtime: MeshRuntime | None,
        xds_client: XdsClient | None,
        secure: bool,
    ) -> None:
        _, host_port = parse_target(target)
        if runtime is None:
            runtime = MeshRuntime.for_client(xds_client or XdsClient.shared())
        self.runtime = runtime
        self.target = target
        self.authority = host_port
        self.scheme = "https" if secure else "http"
        self.handle: TargetHandle = runtime.watch(target)
        self.clock: Callable[[], float] = time.monotonic
        self._closed = False
        self._timeout_snapshot: TargetSnapshot | None = None
        self._timeout_used = False

    def request_info(
        self,
        method: str,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        timeout: float | None,
        snapshot: TargetSnapshot,
    ) -> RequestInfo:
        items: list[tuple[str, str]] = []
        if metadata:
            for k, v in metadata:
                if isinstance(v, bytes):
                    items.append((k, base64.b64encode(v).decode("ascii").rstrip("=")))
                else:
                    items.append((k, v))
        if timeout is not None and self._reads_grpc_timeout(snapshot):
            items.append(("grpc-timeout", format_grpc_timeout(math.ceil(timeout * 1000))))
        return RequestInfo("POST", self.authority, method, Headers(items), self.scheme, None, True)

    def request_info_of(
        self, spec: _Spec, metadata: Any, timeout: float | None, snapshot: TargetSnapshot
    ) -> RequestInfo:
        """:meth:`request_info` for a call of ``spec``; a call without metadata whose
        timeout no route reads shares one immutable ``RequestInfo`` per method."""
        if not metadata and (
            timeout is None
            or (
                not self._timeout_used
                if snapshot is self._timeout_snapshot
                else not self._reads_grpc_timeout(snapshot)
            )
        ):
            info = spec.bare_info
            if info is None:
                info = spec.bare_info = self.request_info(spec.method, None, None, snapshot)
            return info
        return self.request_info(spec.method, metadata, timeout, snapshot)

    def fast_plan_of(
        self, spec: _Spec, snapshot: TargetSnapshot
    ) -> tuple[TargetSnapshot | None, FastPlan | None, bool]:
        """``spec.fast`` for ``snapshot`` (computed once per snapshot and method): a unary
        call without metadata whose timeout no route reads (the third item) may take the
        plan (``None`` for streaming methods)."""
        plan = None
        if not (spec.streaming_request or spec.streaming_response):
            info = self.request_info_of(spec, None, None, snapshot)
            plan = fast_plan(self.runtime, snapshot, info)
        fast = (snapshot, plan, self._reads_grpc_timeout(snapshot))
        spec.fast = fast
        return fast

    def _reads_grpc_timeout(self, snapshot: TargetSnapshot) -> bool:
        """Whether a route of ``snapshot`` looks at the ``grpc-timeout`` header
        (``grpc_timeout_header_max`` / ``max_grpc_timeout``); cached per snapshot, so calls
        on other routes skip formatting and parsing it."""
        if snapshot is self._timeout_snapshot:
            return self._timeout_used
        used = False
        for route in snapshot.virtual_host.routes:
            action = route.action
            if isinstance(action, RouteAction) and (
                action.grpc_timeout_header_max is not None or action.max_grpc_timeout is not None
            ):
                used = True
                break
        self._timeout_snapshot, self._timeout_used = snapshot, used
        return used

    def unusable(self) -> MeshRpcError:
        """The error of a call that found no usable config."""
        state = self.handle.state()
        why = str(state) if isinstance(state, TargetError) else "no xDS configuration yet"
        return MeshRpcError(grpc.StatusCode.UNAVAILABLE, f"{self.target}: {why}")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.runtime.unwatch(self.target)


def subchannel_options(
    options: Iterable[tuple[str, Any]] | None, authority: str
) -> list[tuple[str, Any]]:
    opts = [(k, v) for k, v in (options or ()) if k != "grpc.default_authority"]
    opts.append(("grpc.default_authority", authority))
    return opts


def watch_connectivity(
    key: str, channel: grpc.Channel, report: Callable[[Any], None]
) -> Callable[[], None]:
    """Report a sync endpoint channel's connectivity (grpcio calls ``report`` on its own
    thread, with the state now and at each change); returns the cancel function."""
    del key
    channel.subscribe(report, try_to_connect=False)
    return lambda: channel.unsubscribe(report)


def connectivity_of(state: object) -> grpc.ChannelConnectivity:
    if isinstance(state, TargetSnapshot):
        return grpc.ChannelConnectivity.READY
    if isinstance(state, TargetError) and not state.ambient:
        return grpc.ChannelConnectivity.TRANSIENT_FAILURE
    return grpc.ChannelConnectivity.CONNECTING


# --------------------------------------------------------------------------- sync calls


class _Replay:
    """A request iterator that later attempts can replay (gRPC's retry buffer).

    Items are read from the application's iterator once, by whichever attempt needs the next
    one first; the others wait for that read (never holding a lock while the application's
    iterator blocks, so a retry can replay what is buffered while an abandoned attempt's
    reader still waits for the next item).
    """

    __slots__ = ("_buf", "_cond", "_done", "_fetching", "_src")

    def __init__(self, source: Iterable[Any]) -> None:
        self._src = iter(source)
        self._buf: list[Any] = []
        self._cond = threading.Condition()
        self._done = False
        self._fetching = False

    def attempt(self) -> Iterator[Any]:
        i = 0
        buf = self._buf
        while True:
            fetch = False
            with self._cond:
                while i >= len(buf):
                    if self._done:
                        return
                    if not self._fetching:
                        self._fetching = fetch = True
                        break
                    self._cond.wait()
            if fetch:
                try:
                    item = next(self._src)
                except BaseException:  # StopIteration or the iterator's own error
                    with self._cond:
                        self._done = True
                        self._fetching = False
                        self._cond.notify_all()
                    return
                with self._cond:
                    buf.append(item)
                    self._fetching = False
                    self._cond.notify_all()
            yield buf[i]
            i += 1


class _State:
    """One call's cancellation state (shared with its ``Future`` / response iterator)."""

    __slots__ = ("cancellable", "cancelled", "current", "event")

    def __init__(self, cancellable: bool = True) -> None:
        self.cancellable = cancellable
        """False for blocking calls nobody can cancel: attempts use grpcio's blocking call
        (``future()`` would start a channel-spin thread per call)."""
        self.cancelled = False
        self.current: Any = None
        self.event = threading.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self.event.set()
        current = self.current
        if current is not None:
            current.cancel()


_CANCELLED = "Locally cancelled by application!"
# Shared states of blocking calls (never cancelled, never waited on): ``_VALUE_ONLY`` for
# ``__call__`` (grpcio's plain blocking call), ``_NOT_CANCELLABLE`` for ``with_call``.
_NOT_CANCELLABLE = _State(cancellable=False)
_VALUE_ONLY = _State(cancellable=False)


class _Spec:
    """One mesh multicallable: the method and how to build grpcio's multicallable for it."""

    __slots__ = (
        "bare_info",
        "epoch",
        "fast",
        "key",
        "make",
        "mcs",
        "method",
        "streaming_request",
        "streaming_response",
    )

    def __init__(  # noqa: PLR0917
        self,
        method: str,
        streaming_request: bool,
        streaming_response: bool,
        request_serializer: Any,
        response_deserializer: Any,
        registered: Any,
    ) -> None:
        self.method = method
        self.streaming_request = streaming_request
        self.streaming_response = streaming_response
        self.key = (method, streaming_request, streaming_response, id(self))
        kwargs: dict[str, Any] = {
            "request_serializer": request_serializer,
            "response_deserializer": response_deserializer,
        }
        if registered is not None:
            kwargs["_registered_method"] = registered
        name = ("stream_" if streaming_request else "unary_") + (
            "stream" if streaming_response else "unary"
        )

        def make(channel: Any) -> Any:
            return getattr(channel, name)(method, **kwargs)

        self.make = make
        self.bare_info: RequestInfo | None = None
        """The request of a call without metadata (see ``MeshTarget.request_info_of``)."""
        self.mcs: dict[str, Any] = {}
        """Endpoint key -> grpcio multicallable, valid for the pool's ``epoch``."""
        self.epoch = -1
        self.fast: tuple[TargetSnapshot | None, FastPlan | None, bool] = (None, None, False)
        """(snapshot, its :class:`~pymesh.core.flow.FastPlan` for a call of this method
        without metadata, whether a route of it reads ``grpc-timeout``): see
        :meth:`MeshTarget.fast_plan_of`."""

    def multicallables(self, pool: SubchannelPool[Any]) -> dict[str, Any]:
        """This method's grpcio multicallables by endpoint key (emptied whenever the pool
        drops a subchannel): a call looks its endpoint up in one dict."""
        if self.epoch != pool.epoch:
            self.mcs = {}
            self.epoch = pool.epoch
        return self.mcs

    def multicallable(self, pool: SubchannelPool[Any], key: str) -> Any:
        """The multicallable of endpoint ``key`` (its subchannel opened on first use)."""
        epoch = pool.epoch
        mc = pool.get(key).multicallable(self.key, self.make)
        if epoch == pool.epoch:  # not dropped meanwhile
            self.multicallables(pool)[key] = mc
        return mc


class MeshChannel(grpc.Channel):
    """A ``grpc.Channel`` whose calls go through the mesh (see the module docstring)."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] | None = None,
        compression: grpc.Compression | None = None,
        *,
        xds_client: XdsClient | None = None,
        runtime: MeshRuntime | None = None,
    ) -> None:
        self._mesh = MeshTarget(
            target, runtime=runtime, xds_client=xds_client, secure=credentials is not None
        )
        opts = subchannel_options(options, self._mesh.authority)

        # pymesh.security.MeshChannelCredentials open endpoint channels themselves (CDS TLS)
        mesh_open = getattr(credentials, "open_subchannel", None)

        def open_channel(key: str) -> grpc.Channel:
            if credentials is None:
                return grpc.insecure_channel(key, opts, compression)
            if mesh_open is not None:
                return mesh_open(key, opts, compression, self._mesh)  # type: ignore[no-any-return]
            return grpc.secure_channel(key, credentials, opts, compression)

        self._pool: SubchannelPool[grpc.Channel] = SubchannelPool(
            open_channel,
            lambda c: c.close(),
            watch=watch_connectivity,
            reachability=Reachability.of(self._mesh.runtime),
        )
        self._remove_listener = self._mesh.runtime.add_hosts_removed_listener(
            self._pool.hosts_removed
        )
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._subscriptions: dict[Callable[[grpc.ChannelConnectivity], None], Any] = {}
        self._closed = False

    @property
    def runtime(self) -> MeshRuntime:
        return self._mesh.runtime

    # -- grpc.Channel ---------------------------------------------------------------------

    def unary_unary(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = None,
    ) -> _UnaryUnary:
        spec = _Spec(
            method, False, False, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryUnary(self, spec)

    def unary_stream(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = None,
    ) -> _UnaryStream:
        spec = _Spec(
            method, False, True, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryStream(self, spec)

    def stream_unary(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = None,
    ) -> _StreamUnary:
        spec = _Spec(
            method, True, False, request_serializer, response_deserializer, _registered_method
        )
        return _StreamUnary(self, spec)

    def stream_stream(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: Any = None,
    ) -> _StreamStream:
        spec = _Spec(
            method, True, True, request_serializer, response_deserializer, _registered_method
        )
        return _StreamStream(self, spec)

    def subscribe(
        self,
        callback: Callable[[grpc.ChannelConnectivity], None],
        try_to_connect: bool = False,
    ) -> None:
        """Call ``callback`` with the channel's connectivity now and at every change: READY
        once the target's config is usable, TRANSIENT_FAILURE while it is in error."""
        del try_to_connect
        last: list[grpc.ChannelConnectivity | None] = [None]

        def on_state(state: object) -> None:
            conn = connectivity_of(state)
            if conn is not last[0]:
                last[0] = conn
                callback(conn)

        if self._mesh.handle.state() is None:
            last[0] = grpc.ChannelConnectivity.CONNECTING
            callback(grpc.ChannelConnectivity.CONNECTING)
        self._subscriptions[callback] = self._mesh.handle.subscribe(on_state)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        cancel = self._subscriptions.pop(callback, None)
        if cancel is not None:
            cancel()

    def close(self) -> None:
        """Close every endpoint channel and release the target's watch."""
        if self._closed:
            return
        self._closed = True
        for cancel in self._subscriptions.values():
            cancel()
        self._subscriptions.clear()
        self._remove_listener()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.close()
        self._mesh.close()

    def __enter__(self) -> MeshChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # -- the call -------------------------------------------------------------------------

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        if self._executor is None:
            with self._executor_lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=64, thread_name_prefix="pymesh-grpc-future"
                    )
        return self._executor.submit(fn)

    def _call(  # noqa: PLR0917 - grpcio's signature
        self,
        spec: _Spec,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        state: _State,
    ) -> tuple[Any, CallResult]:
        """:meth:`_call_plain`, with telemetry when it is on."""
        call = self._call_plain if telemetry_current() is None else self._call_traced
        return call(
            spec, request, timeout, metadata, credentials, wait_for_ready, compression, state
        )

    def _call_plain(  # noqa: PLR0917 - grpcio's signature
        self,
        spec: _Spec,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        state: _State,
    ) -> tuple[Any, CallResult]:
        """Run one call through the flow; returns (response, result) where response is
        ``(value, grpc_call)`` (unary response) or ``(iterator, first)`` (streaming).
        Raises ``grpc.RpcError``."""
        if self._closed:
            raise ValueError("Cannot invoke RPC: Channel closed!")
        mesh = self._mesh
        clock = mesh.clock
        start = clock()
        deadline = None if timeout is None else start + timeout
        snapshot = mesh.handle.current()
        if snapshot is None:
            wait = CONFIG_WAIT if timeout is None else timeout
            try:
                snapshot = mesh.handle.wait_ready(wait)
            except XdsError as exc:
                raise MeshRpcError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        info = mesh.request_info_of(spec, metadata, timeout, snapshot)
        replay = _Replay(request) if spec.streaming_request else None
        pool = self._pool
        mcs = spec.mcs if spec.epoch == pool.epoch else spec.multicallables(pool)

        runtime = mesh.runtime
        streaming_response = spec.streaming_response
        waits = 0
        while True:
            # The flow driven inline, as drive_sync drives it (a raising action closes it),
            # with the Send done in the loop itself (no closure per call).
            flow = call_flow(runtime, snapshot, info, clock=clock)
            reply: AttemptResult | None = None
            try:
                action = next(flow)
                while True:
                    if type(action) is not Send:
                        reply = None
                        if type(action) is Sleep:
                            _sleep(action.seconds, deadline, clock, state)
                        elif type(action) is Discard:
                            _discard(action.response)
                        # Mirror: shadow requests are not sent for gRPC (nor by C-core)
                        action = flow.send(reply)
                        continue
                    # -- the attempt: a real grpcio call on the endpoint's channel
                    if state.cancelled:
                        raise _CallError(MeshRpcError(grpc.StatusCode.CANCELLED, _CANCELLED))
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
                    payload = replay.attempt() if replay is not None else request
                    try:
                        if streaming_response:
                            it = mc(
                                payload,
                                timeout=t,
                                metadata=md,
                                credentials=credentials,
                                compression=compression,
                            )
                            state.current = it
                            try:
                                reply = AttemptResult(_COMMITTED, (it, next(it)))
                            except StopIteration:
                                reply = AttemptResult(OK, (it, _END))
                        elif state is _VALUE_ONLY:
                            value = mc(
                                payload,
                                timeout=t,
                                metadata=md,
                                credentials=credentials,
                                compression=compression,
                            )
                            reply = AttemptResult(OK, (value, None))
                        elif not state.cancellable:
                            value, call = mc.with_call(
                                payload,
                                timeout=t,
                                metadata=md,
                                credentials=credentials,
                                compression=compression,
                            )
                            reply = AttemptResult(OK, (value, call))
                        else:
                            fut = mc.future(
                                payload,
                                timeout=t,
                                metadata=md,
                                credentials=credentials,
                                compression=compression,
                            )
                            state.current = fut
                            reply = AttemptResult(OK, (fut.result(), fut))
                    except grpc.FutureCancelledError:
                        raise _CallError(
                            MeshRpcError(grpc.StatusCode.CANCELLED, _CANCELLED)
                        ) from None
                    except grpc.RpcError as error:
                        if state.cancelled:
                            raise _CallError(error) from None
                        reply = classify(error, caller_bound)
                    action = flow.send(reply)
            except StopIteration as stop:
                result: CallResult = stop.value
            except _CallError as error:
                flow.close()
                raise error.error from None
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
            state.event.wait(pause)  # queued, as grpc queues a wait-for-ready call
            if state.cancelled:
                raise MeshRpcError(grpc.StatusCode.CANCELLED, _CANCELLED)
            snapshot = mesh.handle.current() or snapshot
        if result.local_reply is not None:
            raise error_of_reply(result, mesh.target)
        response = result.response
        if isinstance(response, grpc.RpcError):
            result.release()
            raise response
        return response, result

    _call_traced = grpc_client_telemetry(metadata_index=4)(_call_plain)
    """:meth:`_call_plain` with telemetry (trace metadata out, the call recorded)."""


def _sleep(
    seconds: float, deadline: float | None, clock: Callable[[], float], state: _State
) -> None:
    """A flow's ``Sleep`` (fault delay, backoff), cut at the caller's deadline and woken by
    a cancellation."""
    if deadline is not None and clock() + seconds >= deadline:
        state.event.wait(max(0.0, deadline - clock()))
        if not state.cancelled:
            raise _CallError(_deadline_error())
    else:
        state.event.wait(seconds)
    if state.cancelled:
        raise _CallError(MeshRpcError(grpc.StatusCode.CANCELLED, _CANCELLED))


MAX_READY_WAITS = 1000
"""Bound on the re-runs of a ``wait_for_ready`` call (its deadline bounds it first)."""


def not_ready(result: CallResult) -> bool:
    """The call found no ready endpoint: no healthy upstream, or its last attempt could not
    connect. A ``wait_for_ready`` call waits and runs again instead of failing."""
    reply = result.local_reply
    if reply is not None:
        if reply.kind == ReplyKind.UPSTREAM_RESET:
            return "UF" in result.flags  # its endpoint could not be connected
        return reply.kind == ReplyKind.NO_HEALTHY_UPSTREAM
    response = result.response
    if isinstance(response, grpc.RpcError):
        code = response.code()  # type: ignore[attr-defined]
        details = response.details() or ""  # type: ignore[attr-defined]
        return code is grpc.StatusCode.UNAVAILABLE and "failed to connect" in details
    return False


def ready_until(deadline: float | None, start: float) -> float:
    """Until when a ``wait_for_ready`` call may wait (its deadline, else ``CONFIG_WAIT``)."""
    return (deadline if deadline is not None else start + CONFIG_WAIT) - 0.001


def ready_pause(waits: int) -> float:
    """Back-off between re-runs of a waiting ``wait_for_ready`` call (20 ms doubling to 1 s)."""
    return min(0.02 * float(1 << min(waits, 6)), 1.0)


def _deadline_error() -> MeshRpcError:
    return MeshRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def _discard(response: object) -> None:
    if isinstance(response, tuple):
        call = response[0]
        cancel = getattr(call, "cancel", None)
        if cancel is not None:
            cancel()


# --------------------------------------------------------------------------- multicallables


class _Multi:
    __slots__ = ("_channel", "_spec")

    def __init__(self, channel: MeshChannel, spec: _Spec) -> None:
        self._channel = channel
        self._spec = spec


class _UnaryUnary(_Multi, grpc.UnaryUnaryMultiCallable):  # type: ignore[misc,type-arg]
    def __call__(  # noqa: PLR0917 - grpcio's signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        channel = self._channel  # (MeshChannel._call inlined: one frame less per call)
        if telemetry_current() is None:
            call, state = channel._call_plain, _VALUE_ONLY
        else:  # with the grpcio call: telemetry reads the server's exchange answer
            call, state = channel._call_traced, _NOT_CANCELLABLE
        (value, _), result = call(
            self._spec,
            request,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
            state,
        )
        result.release()
        return value

    def with_call(  # noqa: PLR0917 - grpcio's signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        (value, call), result = self._channel._call(
            self._spec,
            request,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
            _NOT_CANCELLABLE,
        )
        result.release()
        return value, call

    def future(  # type: ignore[override]  # noqa: PLR0917
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> MeshFuture:  # type: ignore[override]
        state = _State()
        channel = self._channel
        spec = self._spec

        def run() -> tuple[Any, grpc.Call | None]:
            (value, call), result = channel._call(
                spec, request, timeout, metadata, credentials, wait_for_ready, compression, state
            )
            result.release()
            return value, call

        return MeshFuture(channel._submit(run), state)


class _StreamUnary(_UnaryUnary, grpc.StreamUnaryMultiCallable):  # type: ignore[misc,type-arg]
    """Same as unary-unary with a request iterator (buffered for retries)."""


class _UnaryStream(_Multi, grpc.UnaryStreamMultiCallable):  # type: ignore[misc,type-arg]
    def __call__(  # type: ignore[override]  # noqa: PLR0917
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> MeshResponseIterator:  # type: ignore[override]
        state = _State()
        try:
            (it, first), result = self._channel._call(
                self._spec,
                request,
                timeout,
                metadata,
                credentials,
                wait_for_ready,
                compression,
                state,
            )
        except grpc.RpcError as error:
            return MeshResponseIterator(None, _END, None, state, error)
        return MeshResponseIterator(it, first, result, state, None)


class _StreamStream(_UnaryStream, grpc.StreamStreamMultiCallable):  # type: ignore[misc,type-arg]
    """Same as unary-stream with a request iterator (buffered until the first response)."""


# --------------------------------------------------------------------------- call objects


class MeshFuture(grpc.Future, grpc.Call):  # type: ignore[misc,type-arg]
    """The ``grpc.Future`` (and ``grpc.Call``) of a unary-response call run by the mesh."""

    def __init__(self, future: concurrent.futures.Future[Any], state: _State) -> None:
        self._future = future
        self._state = state

    def _call(self) -> Any:
        try:
            return self._future.result()[1]
        except grpc.RpcError as error:
            return error
        except concurrent.futures.CancelledError:
            return None

    def cancel(self) -> bool:
        if self._future.done():
            return False
        self._state.cancel()
        self._future.cancel()
        return True

    def cancelled(self) -> bool:
        return self._state.cancelled or self._future.cancelled()

    def running(self) -> bool:
        return not self._future.done()

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._future.result(timeout)[0]
        except concurrent.futures.TimeoutError:
            raise grpc.FutureTimeoutError() from None
        except concurrent.futures.CancelledError:
            raise grpc.FutureCancelledError() from None
        except grpc.RpcError as error:
            if self._state.cancelled:
                raise grpc.FutureCancelledError() from None
            raise error from None

    def exception(self, timeout: float | None = None) -> Any:
        try:
            self.result(timeout)
        except grpc.RpcError as error:
            return error
        return None

    def traceback(self, timeout: float | None = None) -> Any:
        try:
            self.result(timeout)
        except grpc.RpcError as error:
            return error.__traceback__
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    # grpc.Call
    def _delegate(self, name: str, default: Any) -> Any:
        self._future.exception()  # wait for the end
        call = self._call()
        return getattr(call, name)() if call is not None else default

    def initial_metadata(self) -> Any:
        return self._delegate("initial_metadata", ())

    def trailing_metadata(self) -> Any:
        return self._delegate("trailing_metadata", ())

    def code(self) -> grpc.StatusCode:
        if self.cancelled():
            return grpc.StatusCode.CANCELLED
        code: grpc.StatusCode = self._delegate("code", grpc.StatusCode.CANCELLED)
        return code

    def details(self) -> str:
        details: str = self._delegate("details", _CANCELLED)
        return details

    def is_active(self) -> bool:
        return not self._future.done()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._future.done():
            return False
        self._future.add_done_callback(lambda _: callback())
        return True

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None


class MeshResponseIterator(grpc.Call, grpc.Future):  # type: ignore[misc,type-arg]
    """The response iterator (and ``grpc.Call``) of a streaming-response call: the first
    message the attempt committed on, then the rest of the winning attempt's stream."""

    def __init__(
        self,
        it: Any,
        first: Any,
        result: CallResult | None,
        state: _State,
        error: grpc.RpcError | None,
    ) -> None:
        self._it = it
        self._first = first
        self._result = result
        self._state = state
        self._error = error
        self._done = error is not None or first is _END
        if self._done:
            self._release()

    def _release(self) -> None:
        if self._result is not None:
            self._result.release()

    def __iter__(self) -> MeshResponseIterator:
        return self

    def __next__(self) -> Any:
        if self._error is not None:
            raise self._error
        first = self._first
        if first is not _END:
            self._first = _END
            return first
        if self._done:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self._done = True
            self._release()
            raise
        except grpc.RpcError:
            self._done = True
            self._release()
            raise

    next = __next__

    def cancel(self) -> bool:
        if self._done and self._first is _END:
            return False
        self._state.cancel()
        self._first = _END
        self._release()
        if self._it is not None:
            self._it.cancel()
        else:
            self._error = MeshRpcError(grpc.StatusCode.CANCELLED, _CANCELLED)
        return True

    def _target(self) -> Any:
        return self._it if self._it is not None else self._error

    def initial_metadata(self) -> Any:
        return self._target().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._target().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self._target().code()
        return code

    def details(self) -> str:
        details: str = self._target().details()
        return details

    def is_active(self) -> bool:
        return not self._done

    def time_remaining(self) -> float | None:  # type: ignore[override]
        it = self._it
        return it.time_remaining() if it is not None else None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        it = self._it
        return bool(it.add_callback(callback)) if it is not None else False

    # grpc.Future (as grpcio's _MultiThreadedRendezvous)
    def cancelled(self) -> bool:
        return self._state.cancelled

    def running(self) -> bool:
        return not self._done

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> Any:
        del timeout
        if self._error is not None:
            raise self._error
        return self._it.result() if self._it is not None else None

    def exception(self, timeout: float | None = None) -> Any:
        del timeout
        if self._error is not None:
            return self._error
        return self._it.exception() if self._it is not None else None

    def traceback(self, timeout: float | None = None) -> Any:
        del timeout
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        if self._it is not None:
            self._it.add_done_callback(lambda _: fn(self))
        else:
            fn(self)


# --------------------------------------------------------------------------- constructors


def _opts(options: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]] | None:
    return None if options is None else list(options)


def insecure_channel(
    target: str,
    options: Iterable[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    *,
    xds_client: XdsClient | None = None,
    runtime: MeshRuntime | None = None,
) -> grpc.Channel:
    """``grpc.insecure_channel`` that routes ``xds:///HOST:PORT`` targets through the mesh.

    Other targets are passed to grpcio unchanged. ``xds_client`` (default: the process-wide
    client from the bootstrap) or ``runtime`` (a :class:`~pymesh.core.runtime.MeshRuntime`,
    shared with the httpx adapter) choose the mesh.
    """
    if not is_xds_target(target):
        return grpc.insecure_channel(target, _opts(options), compression)
    return MeshChannel(target, None, options, compression, xds_client=xds_client, runtime=runtime)


def secure_channel(
    target: str,
    credentials: grpc.ChannelCredentials,
    options: Iterable[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    *,
    xds_client: XdsClient | None = None,
    runtime: MeshRuntime | None = None,
) -> grpc.Channel:
    """``grpc.secure_channel`` that routes ``xds:///HOST:PORT`` targets through the mesh: each
    endpoint connection uses ``credentials`` (other targets go to grpcio unchanged)."""
    if not is_xds_target(target):
        return grpc.secure_channel(target, credentials, _opts(options), compression)
    return MeshChannel(
        target, credentials, options, compression, xds_client=xds_client, runtime=runtime
    )
