"""The per-call flow: one generator that decides, and runners that act (STYLE.md #2, #3).

:func:`call_flow` is the whole client-side life of one request under the mesh, written once.
It never does I/O: it *yields* what it needs (:class:`Sleep`, :class:`Send`, :class:`Mirror`,
:class:`Discard`) and is *sent* the answers (an :class:`AttemptResult` for a ``Send``). The
sync runner :func:`drive_sync` and the async runner :func:`drive_async` drive the same
generator; adapters (httpx now, grpc later) supply the actual sending. Tests drive it by hand
on a fake clock.

The layer order, and why each layer sits where it does (Finagle ``StackClient`` style; the
order is Envoy's HTTP connection manager: filters in order, then the router):

1. **Snapshot**, read once by the adapter: every decision of this call uses one consistent
   view of the config, even if an update lands mid-call (DESIGN.md #2).
2. **Route** (vhost already chosen for the target; routes in order). Nothing can be decided
   before the route: faults, timeouts, retries and clusters are all per route.
   No route -> 404 ``NR``. Direct responses and redirects end the call here.
3. **Cluster choice** (weighted, ``cluster_header``): once per request, *before* faults and
   retries, as Envoy resolves a weighted route entry once; retries stay on that cluster.
   Missing cluster -> ``cluster_not_found_response_code`` ``NC``; unusable -> 503 ``UH``.
4. **Fault filter** (delay, then abort): it runs before the router in Envoy, so an injected
   delay is *not* counted in the route timeout, and an abort never touches limits, the load
   balancer or outlier detection. ``max_active_faults`` counts faults in progress.
5. **Rewrite** (path/host rewrites, request header mutations): the router finalises the
   upstream request after the filters, so fault header matchers saw the original request.
6. **Deadlines** start here (when the router starts), covering all attempts and backoffs.
7. **Mirror**: shadow requests go out once, when the router starts, never per retry.
8. **Attempts**, each: overall deadline check -> host pick (previous-hosts predicate on
   retries; no host -> 503 ``UH``) -> circuit-breaker limits (requests; for HTTP/1.1 a
   connection slot, else it waits in the cluster's FIFO pending queue (``WaitConnection``,
   bounded by the overall deadline: 504 ``UT`` when it passes); pending overflow -> 503
   ``UO`` + ``x-envoy-overloaded``, never retried) -> ``Send`` with ``min(per-try,
   remaining overall)`` and the stream idle timeout -> outlier detection records the
   outcome (it must see every attempt, retried or not) -> retry decision, asked while the
   attempt still counts as active (the retry budget sees it); the previous retry's slot is
   given back first, as Envoy's ``resetRetry``; the backoff is a ``Sleep`` bounded by the
   overall deadline.

Host pick comes before the limits because Envoy checks ``max_requests`` / pending in the
cluster's connection pool, which is per host; a request that finds no host must not be
counted as overflow.

Theory of operation of one call (``call_flow``):

===============  ==========================  ============================================
state            event                       next
===============  ==========================  ============================================
ROUTING          no route / direct / redir.  DONE (local reply)
ROUTING          route action                FAULT
FAULT            delay drawn                 yield Sleep(delay), then abort check
FAULT            abort drawn                 DONE (fault abort, ``FI``)
FAULT            nothing                     ATTEMPT
ATTEMPT          overall deadline passed     DONE (504 ``UT``; ``DT`` when the stream
                                             duration limit is the deadline)
ATTEMPT          no host                     DONE (503 ``UH``)
ATTEMPT          limits overflow             DONE (503 ``UO``)
ATTEMPT          HTTP/1.1, no connection     yield WaitConnection -> granted: Send;
                 slot, queued                deadline passed: DONE (504 ``UT``)
ATTEMPT          Send -> outcome             DECIDE
DECIDE           stream idle timeout         DONE (504 ``stream timeout``, ``SI``)
DECIDE           final (no retry wanted)     DONE (upstream response, or local reply
                                             for a reset / per-try timeout)
DECIDE           overall deadline passed     DONE (504 ``UT`` / ``DT``)
DECIDE           Retry(delay)                yield Discard, Sleep(delay) -> ATTEMPT
===============  ==========================  ============================================

Every path through the loop ends: attempts are bounded by the retry policy and a hard cap of
:data:`MAX_ATTEMPTS`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pymesh.core.deadline import CONSUMED_REQUEST_HEADERS as TIMEOUT_HEADERS
from pymesh.core.deadline import Deadlines, call_deadlines
from pymesh.core.fault import decide_fault
from pymesh.core.hashing import request_hash
from pymesh.core.headers_ops import HeaderOps
from pymesh.core.retry import CONSUMED_REQUEST_HEADERS as RETRY_HEADERS
from pymesh.core.retry import GiveUp, Retry, RetryState, strip_consumed
from pymesh.core.routing import (
    ClusterChoice,
    pick_cluster,
    redirect_location,
    request_header_ops,
    response_header_ops,
    rewrite_request,
    route_request,
)
from pymesh.core.types import Headers, Host, Outcome, PickContext, RequestInfo, ResetKind
from pymesh.model.cluster import UpstreamProtocol
from pymesh.model.http_filters import FaultConfig
from pymesh.model.listener import HttpConnectionManager
from pymesh.model.route import (
    DirectResponseAction,
    FilterConfigOverride,
    RedirectAction,
    RequestMirrorPolicy,
    Route,
    RouteAction,
)
from pymesh.model.snapshot import ClusterConfig, ClusterError, TargetSnapshot

if TYPE_CHECKING:
    from pymesh.core.limits import ClusterLimits, PendingTicket
    from pymesh.core.runtime import ClusterRuntime, MeshRuntime

__all__ = [
    "MAX_ATTEMPTS",
    "OVERFLOWED",
    "Action",
    "AttemptResult",
    "CallResult",
    "Discard",
    "FastPlan",
    "Flow",
    "LocalReply",
    "Mirror",
    "ReplyKind",
    "RequestIdHeaders",
    "Resumed",
    "Send",
    "Sleep",
    "WaitConnection",
    "call_flow",
    "drive_async",
    "drive_sync",
    "fast_plan",
    "lowered_headers",
    "resume_flow",
    "wait_connection_async",
    "wait_connection_sync",
]

_CONSUMED = (*RETRY_HEADERS, *TIMEOUT_HEADERS)
_CONSUMED_SET = frozenset(_CONSUMED)

MAX_ATTEMPTS = 100
"""Hard cap on attempts of one call, whatever the retry policy says (bounded loops)."""

FAULT_FILTER_TYPE = "envoy.filters.http.fault"

# --------------------------------------------------------------------------- headers


class _Lowered(Headers):
    """A :class:`Headers` built from items whose names are already lower-case: no copy,
    no re-lowering (``Headers()`` lowers every name again)."""

    __slots__ = ()

    def __init__(self, items: tuple[tuple[str, str], ...]) -> None:
        self._items = items


def lowered_headers(items: tuple[tuple[str, str], ...]) -> Headers:
    """A :class:`Headers` of ``items``, whose names the caller guarantees lower-case (the
    hot path's way to build headers it has just decoded and lowered itself)."""
    return _Lowered(items)


# --------------------------------------------------------------------------- actions


@dataclass(slots=True)
class Sleep:
    """Wait ``seconds`` (fault delay, retry backoff), then resume the flow (sent ``None``)."""

    seconds: float


@dataclass(slots=True)
class Send:
    """Send ``request`` to ``host`` of ``cluster``; answer with an :class:`AttemptResult`.

    ``timeout`` (seconds, ``None`` = none) bounds the attempt until the response headers;
    when it elapses the runner answers ``Outcome(reset=ResetKind.PER_TRY_TIMEOUT)``.
    ``attempt`` counts from 1. ``idle`` bounds each wait for data from the upstream (the
    stream idle timeout: route ``idle_timeout``, else the listener's
    ``stream_idle_timeout``, else Envoy's 5 minutes); when it fires the runner answers a
    per-try timeout with ``stream_idle=True``. ``per_try_idle`` is the retry policy's
    per-try idle timeout (a plain, retriable per-try timeout when it fires).
    """

    cluster: ClusterRuntime
    host: Host
    request: RequestInfo
    timeout: float | None
    attempt: int
    idle: float | None = None
    per_try_idle: float | None = None


@dataclass(slots=True)
class WaitConnection:
    """Wait until ``ticket`` is granted an HTTP/1.1 connection of ``limits`` (Envoy's pending
    queue), at most ``timeout`` seconds (``None``: no bound), then resume the flow (sent
    ``None``; it reads the ticket). Register the wake-up with ``limits.arm(ticket, wake)``:
    the grant may come from any thread."""

    limits: ClusterLimits
    ticket: PendingTicket
    timeout: float | None


@dataclass(slots=True)
class Mirror:
    """Fire-and-forget a shadow copy of the request (``-shadow`` authority); the runner
    must not wait for it and ignores its result. Sent ``None``."""

    cluster: ClusterRuntime
    host: Host
    request: RequestInfo
    timeout: float | None


@dataclass(slots=True)
class Discard:
    """The flow drops the response of an attempt it will retry: close it. Sent ``None``."""

    response: object


Action = Sleep | Send | Mirror | Discard | WaitConnection


@dataclass(slots=True)
class AttemptResult:
    """What a runner sends back for a :class:`Send`: the outcome as the policies see it and
    the adapter's own response object (``None`` when the attempt failed without one)."""

    outcome: Outcome
    response: object | None = None
    stream_idle: bool = False
    """The stream idle timeout fired (not retried: 504 ``stream timeout``, flag ``SI``)."""


# --------------------------------------------------------------------------- results


class ReplyKind:
    """Why the mesh answered locally (the ``kind`` of a :class:`LocalReply`)."""

    NO_ROUTE = "no_route"
    DIRECT_RESPONSE = "direct_response"
    REDIRECT = "redirect"
    CLUSTER_NOT_FOUND = "cluster_not_found"
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
    OVERFLOW = "overflow"
    TIMEOUT = "timeout"
    UPSTREAM_RESET = "upstream_reset"
    FAULT_ABORT = "fault_abort"
    UNSUPPORTED_ROUTE = "unsupported_route"


# Failures the mesh produced (what ``raise_on_mesh_error`` turns into exceptions); direct
# responses and redirects are configured answers, not failures.
MESH_FAILURES = frozenset(
    {
        ReplyKind.NO_ROUTE,
        ReplyKind.CLUSTER_NOT_FOUND,
        ReplyKind.NO_HEALTHY_UPSTREAM,
        ReplyKind.OVERFLOW,
        ReplyKind.TIMEOUT,
        ReplyKind.UPSTREAM_RESET,
        ReplyKind.FAULT_ABORT,
        ReplyKind.UNSUPPORTED_ROUTE,
    }
)


@dataclass(frozen=True, slots=True)
class LocalReply:
    """An answer the mesh made itself, byte for byte what Envoy would send."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]
    kind: str
    grpc_status: int | None = None


def _release_nothing() -> None:
    return None


@dataclass(slots=True)
class CallResult:
    """The end of one call: an upstream ``response`` (the adapter's object) or a
    ``local_reply``, plus what telemetry and access logs need.

    ``release`` must be called once the upstream response is finished (body read or closed):
    the request stays counted as active on its host and cluster until then, as in Envoy.
    It is idempotent and a no-op for local replies.
    """

    response: object | None
    local_reply: LocalReply | None
    flags: tuple[str, ...] = ()
    """Envoy response flags (``UH``, ``UF``, ``UT``, ``UO``, ``FI``, ``DI``, ``NR``, ``URX``,
    ``NC``, ``UC``, ``UR``) in the order they happened."""
    attempts: int = 0
    route: Route | None = None
    cluster: str | None = None
    host: Host | None = None
    upstream_request: RequestInfo | None = None
    response_headers_to_add: tuple[tuple[str, str], ...] = ()
    """Extra response headers the router adds (``x-envoy-attempt-count``)."""
    response_ops: HeaderOps | None = None
    """The route's response header mutations (``ops.apply(headers, upstream_request)``), or
    ``None`` when there are none; local replies already carry theirs."""
    release: Callable[[], None] = field(default=_release_nothing)


# --------------------------------------------------------------------------- local replies

_TEXT = (("content-type", "text/plain"),)
_OVERLOADED = (("content-type", "text/plain"), ("x-envoy-overloaded", "true"))
_RESET_REASON = {
    ResetKind.CONNECT_FAILURE: "remote connection failure",  # as Envoy words it
    ResetKind.RESET: "connection termination",
    ResetKind.REFUSED_STREAM: "remote refused stream reset",
}
_RESET_FLAG = {
    ResetKind.CONNECT_FAILURE: "UF",
    ResetKind.RESET: "UC",
    ResetKind.REFUSED_STREAM: "UR",
}


class _Ctx:
    """What a local reply reports about the call so far (mutated as the call proceeds)."""

    __slots__ = ("attempts", "cluster", "extra", "host", "ops", "route", "sent")

    def __init__(self, route: Route | None = None, cluster: str | None = None) -> None:
        self.route = route
        self.cluster = cluster
        self.attempts = 0
        self.extra: tuple[tuple[str, str], ...] = ()
        self.host: Host | None = None
        self.sent: RequestInfo | None = None
        self.ops: HeaderOps | None = None


_NO_CTX = _Ctx()


def _local(
    status: int,
    body: bytes,
    kind: str,
    flags: list[str],
    headers: tuple[tuple[str, str], ...] = (),
    *,
    ctx: _Ctx = _NO_CTX,
) -> CallResult:
    if body and not headers:
        headers = _TEXT
    reply = LocalReply(status, body, headers, kind)
    return CallResult(
        None,
        reply,
        tuple(flags),
        ctx.attempts,
        ctx.route,
        ctx.cluster,
        ctx.host,
        ctx.sent,
        ctx.extra,
        ctx.ops,
    )


def _no_healthy_upstream(flags: list[str], ctx: _Ctx) -> CallResult:
    flags.append("UH")
    body = b"no healthy upstream"
    return _local(503, body, ReplyKind.NO_HEALTHY_UPSTREAM, flags, _TEXT, ctx=ctx)


def _timeout(flags: list[str], ctx: _Ctx, deadlines: Deadlines) -> CallResult:
    # The router's timeout is UT; the connection manager's stream duration limit is DT.
    flags.append("DT" if deadlines.stream_duration else "UT")
    body = deadlines.timeout_body.encode()
    return _local(504, body, ReplyKind.TIMEOUT, flags, _TEXT, ctx=ctx)


_OVERFLOW_BODY = (
    b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
)


def _overflow(flags: list[str], ctx: _Ctx) -> CallResult:
    flags.append("UO")
    return _local(503, _OVERFLOW_BODY, ReplyKind.OVERFLOW, flags, _OVERLOADED, ctx=ctx)


def _reset_reply(reset: ResetKind, flags: list[str], ctx: _Ctx) -> CallResult:
    reason = _RESET_REASON.get(reset, "connection termination")
    if ctx.attempts > 1:
        text = f"retried and the latest reset reason: {reason}"
    else:
        text = f"reset reason: {reason}"
    body = f"upstream connect error or disconnect/reset before headers. {text}".encode()
    return _local(503, body, ReplyKind.UPSTREAM_RESET, flags, _TEXT, ctx=ctx)


def _fault_abort(status: int | None, grpc_status: int | None) -> LocalReply:
    if grpc_status is not None:
        # A gRPC abort: a trailers-only response carrying the status, as Envoy sends it.
        headers = (
            ("content-type", "application/grpc"),
            ("grpc-status", str(grpc_status)),
            ("grpc-message", "fault filter abort"),
        )
        return LocalReply(status or 200, b"", headers, ReplyKind.FAULT_ABORT, grpc_status)
    assert status is not None
    return LocalReply(status, b"fault filter abort", _TEXT, ReplyKind.FAULT_ABORT, grpc_status)


# --------------------------------------------------------------------------- helpers


def _fault_config(snapshot: TargetSnapshot, route: Route) -> FaultConfig | None:
    """The fault filter config that applies to ``route``: the most specific
    ``typed_per_filter_config`` override (route > virtual host > route config) of a fault
    filter of the listener's HCM, else that filter's own config. ``None`` = no fault."""
    hcm = snapshot.listener.api_listener
    if hcm is None:
        return None
    for f in hcm.http_filters:
        base = f.config
        if not isinstance(base, FaultConfig) or f.disabled:
            continue
        override: FilterConfigOverride | None = (
            route.typed_per_filter_config.get(f.name)
            or snapshot.virtual_host.typed_per_filter_config.get(f.name)
            or snapshot.route_config.typed_per_filter_config.get(f.name)
        )
        if override is not None:
            if override.disabled:
                continue
            if isinstance(override.config, FaultConfig):
                base = override.config
        if base.delay is not None or base.abort is not None:
            return base
    return None


def _mirror_policies(
    snapshot: TargetSnapshot, action: RouteAction
) -> tuple[RequestMirrorPolicy, ...]:
    # Envoy: the most specific level that has mirror policies wins (route > vhost > config).
    return (
        action.request_mirror_policies
        or snapshot.virtual_host.request_mirror_policies
        or snapshot.route_config.request_mirror_policies
    )


def _shadow_authority(authority: str) -> str:
    """Envoy's shadow host: ``-shadow`` appended to the host, before any port."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] + "-shadow" + authority[end + 1 :]
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and host:
        return f"{host}-shadow:{port}"
    return authority + "-shadow"


_UUID_KEEP = ~((0xF000 << 64) | (0xC000 << 48))  # version and variant bits cleared...
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)  # ...then set: version 4, variant RFC 4122


def _request_id(bits: int) -> str:
    # A UUID4 of 128 bits drawn from the injected RNG (Envoy's UUID request id).
    h = f"{(bits & _UUID_KEEP) | _UUID_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_HEADER_ITEMS = Headers.__dict__["_items"]  # the slot of Headers (a member descriptor)


class RequestIdHeaders(Headers):
    """``base`` plus the ``x-request-id`` the flow adds (Envoy's UUID4): its random bits
    are drawn when the request is made (from the call's RNG, in the flow's order), and the
    UUID text (most of the cost) is formatted the first time the headers are read. A gRPC
    adapter, which sends the flow's id only when the caller gave one (never the case with
    these headers), reads ``base`` alone and the id is never formatted."""

    __slots__ = ("_bits", "base")

    def __init__(self, base: tuple[tuple[str, str], ...], bits: int) -> None:
        self.base = base
        """The request's headers (lower-case names) without the added id."""
        self._bits = bits

    # Shadows the base class's slot, where the result is cached.
    @property
    def _items(self) -> tuple[tuple[str, str], ...]:  # type: ignore[override]
        try:
            items: tuple[tuple[str, str], ...] = _HEADER_ITEMS.__get__(self)
        except AttributeError:
            items = (*self.base, ("x-request-id", _request_id(self._bits)))
            _HEADER_ITEMS.__set__(self, items)
        return items


class _RoutePlan:
    """What the flow derives from a route alone, once per route object (routes are
    immutable; a new snapshot's new route objects get new plans)."""

    __slots__ = (
        "choice",
        "deadlines",
        "fault",
        "idle",
        "listener",
        "max_stream_duration",
        "mirrors",
        "plain_rewrite",
        "response_ops",
        "route",
        "route_config",
        "vhost",
        "weighted_headers",
    )

    def __init__(self, snapshot: TargetSnapshot, route: Route, action: RouteAction) -> None:
        vhost, config = snapshot.virtual_host, snapshot.route_config
        self.route = route
        self.vhost = vhost
        self.route_config = config
        self.listener = snapshot.listener
        self.fault = _fault_config(snapshot, route)
        self.mirrors = _mirror_policies(snapshot, action)
        self.weighted_headers = any(
            wc.headers or wc.host_rewrite_literal for wc in action.weighted_clusters
        )
        self.plain_rewrite = not (
            self.weighted_headers
            or action.prefix_rewrite is not None
            or action.regex_rewrite is not None
            or action.path_template_rewrite is not None
            or action.host_rewrite_literal
            or action.host_rewrite_header is not None
            or request_header_ops(route, vhost, config)
        )
        self.response_ops = response_header_ops(route, vhost, config) or None
        # A route to one named cluster chooses the same (immutable) answer every time.
        self.choice = ClusterChoice(action.cluster) if action.cluster is not None else None
        hcm = snapshot.listener.api_listener
        self.max_stream_duration = hcm.max_stream_duration if hcm is not None else None
        self.idle = _stream_idle_timeout(action, hcm)
        # The deadlines of a call without timeout headers, relative to its start (index:
        # ``request.grpc``).
        self.deadlines = tuple(
            call_deadlines(
                action,
                action.retry_policy,
                RequestInfo("POST", "", "/", grpc=is_grpc),
                now=0.0,
                max_stream_duration=self.max_stream_duration,
            )
            for is_grpc in (False, True)
        )


_PLANS: dict[int, _RoutePlan] = {}
_MAX_PLANS = 4096


def _plan(snapshot: TargetSnapshot, route: Route, action: RouteAction) -> _RoutePlan:
    plan = _PLANS.get(id(route))
    if (
        plan is not None
        and plan.route is route
        and plan.vhost is snapshot.virtual_host
        and plan.route_config is snapshot.route_config
        and plan.listener is snapshot.listener
    ):
        return plan
    plan = _RoutePlan(snapshot, route, action)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[id(route)] = plan
    return plan


# --------------------------------------------------------------------------- the flow


def call_flow(
    runtime: MeshRuntime,
    snapshot: TargetSnapshot,
    request: RequestInfo,
    *,
    clock: Callable[[], float],
    resume: tuple[FastPlan, int, Deadlines, Resumed] | None = None,
) -> Generator[Action, AttemptResult | None, CallResult]:
    """The life of one request under ``snapshot`` (see the module docstring for the order).

    ``clock`` returns monotonic seconds (the runner's clock; a fake one in tests). The
    generator's return value is the :class:`CallResult`. ``resume``: see
    :func:`resume_flow`.
    """
    rng = runtime.rng
    flags: list[str] = []
    vhost = snapshot.virtual_host

    resumed: Resumed | None = None
    route: Route | None
    entry: ClusterConfig | ClusterError | None
    if resume is not None:  # a call a fast path started (see resume_flow)
        fast, bits, deadlines, resumed = resume
        route, entry, cluster_name = fast.route, fast.entry, fast.cluster_name
        action = route.action
        assert isinstance(action, RouteAction)
        retry_policy = action.retry_policy
        ctx = _Ctx(route, cluster_name)
        ctx.ops = fast.plan.response_ops
        upstream = RequestInfo(
            request.method,
            request.authority,
            request.path,
            RequestIdHeaders((), bits),
            request.scheme,
            request.source_ip,
            request.grpc,
        )
        idle = fast.plan.idle
        hash_key = None
    else:
        # 2. route
        route = route_request(vhost, request, rng=rng)
        if route is None:
            flags.append("NR")
            return _local(404, b"", ReplyKind.NO_ROUTE, flags)
        action = route.action
        ctx = _Ctx(route)
        if not isinstance(action, RouteAction):
            ctx.ops = response_header_ops(route, vhost, snapshot.route_config) or None
            if isinstance(action, DirectResponseAction):
                body = action.body or b""
                return _local(action.status, body, ReplyKind.DIRECT_RESPONSE, flags, ctx=ctx)
            if isinstance(action, RedirectAction):
                location = (("location", redirect_location(action, request)),)
                code = action.response_code
                return _local(code, b"", ReplyKind.REDIRECT, flags, location, ctx=ctx)
            flags.append("NR")
            return _local(404, b"", ReplyKind.UNSUPPORTED_ROUTE, flags, ctx=ctx)

        # 3. cluster choice, once per request
        plan = _plan(snapshot, route, action)
        choice = plan.choice or pick_cluster(action, request, rng=rng)
        cluster_name = choice.name
        ctx.cluster = cluster_name
        entry = snapshot.clusters.get(cluster_name) if cluster_name else None
        if entry is None:
            flags.append("NC")
            code = action.cluster_not_found_response_code
            return _local(code, b"", ReplyKind.CLUSTER_NOT_FOUND, flags, ctx=ctx)
        if isinstance(entry, ClusterError):
            return _no_healthy_upstream(flags, ctx)

        # 4. fault filter
        fault = plan.fault
        if fault is not None:
            faults = runtime.active_faults
            injected = decide_fault(
                fault, request, rng=rng, active_faults=faults.count, cluster=cluster_name
            )
            abort = injected.abort_status is not None
            if injected.active:
                faults.start()
                try:
                    if injected.delay is not None and injected.delay > 0:
                        flags.append("DI")
                        yield Sleep(injected.delay)
                finally:
                    faults.end()
                if abort:
                    flags.append("FI")
                    reply = _fault_abort(injected.abort_status, injected.abort_grpc_status)
                    return CallResult(None, reply, tuple(flags), 0, route, cluster_name)

        # 5. rewrite
        if plan.plain_rewrite:
            upstream = request  # nothing to rewrite on this route (checked once per route)
        else:
            upstream = rewrite_request(route, action, vhost, snapshot.route_config, request, choice)
        items = upstream.headers._items
        has_id = False
        if items:  # (a call without headers, e.g. gRPC without metadata, skips all this)
            names = {k for k, _ in items}
            if not names.isdisjoint(_CONSUMED_SET):
                upstream = _with_headers(upstream, strip_consumed(upstream.headers, _CONSUMED))
            has_id = "x-request-id" in names
        if plan.weighted_headers and choice.weighted is not None:
            ops = response_header_ops(route, vhost, snapshot.route_config, choice.weighted)
            ctx.ops = ops or None
        else:
            ctx.ops = plan.response_ops
        if not has_id:
            added = RequestIdHeaders(upstream.headers._items, rng.getrandbits(128))
            upstream = RequestInfo(  # (_with_headers inlined: one call less per request)
                upstream.method,
                upstream.authority,
                upstream.path,
                added,
                upstream.scheme,
                upstream.source_ip,
                upstream.grpc,
            )

        # 6. deadlines
        now = clock()
        retry_policy = action.retry_policy
        if request.headers._items:
            deadlines = call_deadlines(
                action, retry_policy, request, now=now, max_stream_duration=plan.max_stream_duration
            )
        else:  # no timeout header: the route's deadlines, computed once per plan
            deadlines = plan.deadlines[request.grpc]
            if deadlines.overall is not None:
                deadlines = deadlines.starting_at(now)
        overall = deadlines.overall
        idle = plan.idle

        # 7. mirrors
        for policy in plan.mirrors:
            mirror = _mirror(runtime, snapshot, policy, upstream, now=now, overall=overall)
            if mirror is not None:
                yield mirror

        hash_key = request_hash(action.hash_policies, request) if action.hash_policies else None

    # 8. attempts
    # The retry state is made once the first attempt's outcome is known (it draws nothing
    # from ``rng`` when made, and the first attempt excludes no host), and not at all for a
    # gRPC call whose first attempt ended OK: gRPC retries on status codes only (gRFC A44),
    # OK is never one of them, and request headers do not change that.
    overall = deadlines.overall
    per_try = deadlines.per_try
    per_try_idle = deadlines.per_try_idle
    retry: RetryState | None = None
    is_grpc = request.grpc
    count_header = vhost.include_request_attempt_count
    count_response = vhost.include_attempt_count_in_response
    attempt = 0
    inflight: _Attempt | None = None  # what the attempt in progress holds
    # Whose retry slot we hold: taken when a retry is decided, given back at the next
    # decision or when the call ends (Envoy's RetryStateImpl::resetRetry).
    retry_slot: ClusterRuntime | None = None
    try:
        while attempt < MAX_ATTEMPTS:
            attempt += 1
            ctx.attempts = attempt
            if count_response:
                ctx.extra = (("x-envoy-attempt-count", str(attempt)),)
            result: AttemptResult | None = None
            if resumed is not None:
                now, cluster, host, result = resumed
                resumed = None
            else:
                now = clock()
                if overall is not None and now >= overall:
                    return _timeout(flags, ctx, deadlines)
                cluster = runtime.leaf_for(snapshot, entry, now)
                host = None
                if cluster is not None:
                    if retry is not None and retry.previous_hosts:
                        excluded = retry.previous_hosts
                        pick = PickContext(now, hash_key, excluded, retry.host_selection_attempts)
                    else:
                        pick = PickContext(now, hash_key)
                    host = cluster.pick(pick)
            if result is OVERFLOWED:  # the fast path's request was refused by the limits
                return _overflow(flags, ctx)
            if result is not None:  # sent by the fast path: its request is admitted, counted
                assert cluster is not None and host is not None
                limits = cluster.limits
                inflight = _Attempt.adopt(cluster, host)
                ctx.host = host
                ctx.sent = sent = upstream
            elif cluster is None or host is None:
                return _no_healthy_upstream(flags, ctx)
            else:
                limits = cluster.limits
                if not limits.try_start_request():
                    return _overflow(flags, ctx)
                conn = False
                ticket: PendingTicket | None = None
                if cluster.protocol is UpstreamProtocol.HTTP1 and not request.grpc:
                    # HTTP/1.1: a request in flight holds a connection; past max_connections a
                    # request waits for one in the pending queue (Envoy's pool semantics).
                    # gRPC always runs over HTTP/2 (proxyless clusters carry no protocol
                    # options; gRFC A32 limits requests only).
                    conn = limits.try_open_connection()
                    if not conn:
                        ticket = limits.queue_pending()
                        if ticket is None:
                            limits.end_request()
                            return _overflow(flags, ctx)
                inflight = _Attempt(cluster, host, conn, ticket)
                if ticket is not None:
                    # Waits for the next connection given back, bounded by the overall deadline
                    # (Envoy's per-try timer starts once the request is on a connection).
                    yield WaitConnection(limits, ticket, None if overall is None else overall - now)
                    if not inflight.granted():
                        inflight.release()
                        inflight = None
                        return _timeout(flags, ctx, deadlines)
                    now = clock()
                    if overall is not None and now >= overall:
                        inflight.release()
                        inflight = None
                        return _timeout(flags, ctx, deadlines)
                if retry is not None:
                    retry.record_host(host.key)
                timeout = per_try
                if overall is not None:
                    remaining = overall - now
                    timeout = remaining if timeout is None else min(timeout, remaining)
                sent = upstream
                if count_header:
                    count = str(attempt)
                    sent = _with_headers(
                        upstream, upstream.headers.with_set("x-envoy-attempt-count", count)
                    )
                ctx.host = host
                ctx.sent = sent
                result = yield Send(cluster, host, sent, timeout, attempt, idle, per_try_idle)
                if not isinstance(result, AttemptResult):
                    raise TypeError(f"Send must be answered with an AttemptResult, got {result!r}")
            outcome = result.outcome
            now = clock()
            detector = cluster.outlier
            if detector is not None and detector.record(host, outcome, now):
                cluster.ejections_changed(now)

            if result.stream_idle:
                # The connection manager's idle timer: the whole stream ends, no retry.
                inflight.release()
                inflight = None
                flags.append("SI")
                return _local(504, b"stream timeout", ReplyKind.TIMEOUT, flags, _TEXT, ctx=ctx)

            if (
                outcome.reset is ResetKind.PER_TRY_TIMEOUT
                and overall is not None
                and now >= overall
            ):
                inflight.release()
                inflight = None
                return _timeout(flags, ctx, deadlines)

            if attempt == 1 and (
                not is_grpc or outcome.grpc_status != 0 or outcome.reset is not None
            ):
                retry = RetryState(retry_policy, request, rng=rng, is_grpc=is_grpc)
                if retry.enabled:
                    retry.record_host(host.key)
                else:
                    retry = None
            decision: Retry | GiveUp
            if retry is None:
                decision = _NO_RETRY
            else:
                if retry_slot is not None:  # the previous retry's slot ends at this decision
                    retry_slot.limits.end_retry()
                    retry_slot = None
                # Asked while this attempt still counts as active (the budget sees it).
                decision = retry.should_retry(outcome, budget_ok=limits.try_start_retry)
                if isinstance(decision, Retry):
                    retry_slot = cluster  # the slot try_start_retry took
                elif decision.overflow:
                    flags.append("UO")  # the retry breaker / budget said no
                elif decision.limit_exceeded:
                    flags.append("URX")

            if isinstance(decision, GiveUp):
                if outcome.reset is not None:
                    inflight.release()
                    inflight = None
                    if outcome.reset is ResetKind.PER_TRY_TIMEOUT:
                        return _timeout(flags, ctx, deadlines)
                    flags.append(_RESET_FLAG.get(outcome.reset, "UC"))
                    return _reset_reply(outcome.reset, flags, ctx)
                done, inflight = inflight, None
                return CallResult(
                    result.response,
                    None,
                    tuple(flags) if flags else (),
                    attempt,
                    route,
                    cluster_name,
                    host,
                    sent,
                    ctx.extra,
                    ctx.ops,
                    done.release,
                )

            # Retry: drop this attempt's response, back off (bounded by the deadline).
            inflight.release()
            inflight = None
            if result.response is not None:
                yield Discard(result.response)
            now = clock()
            delay = decision.delay
            if overall is not None and now + delay >= overall:
                if overall > now:
                    yield Sleep(overall - now)
                return _timeout(flags, ctx, deadlines)
            if delay > 0:
                yield Sleep(delay)
        return _overflow(flags, ctx)
    finally:
        # Also runs when the caller closes the generator mid-attempt (cancellation).
        if inflight is not None:
            inflight.release()
        if retry_slot is not None:
            retry_slot.limits.end_retry()


OVERFLOWED = AttemptResult(Outcome())
"""The ``result`` of a :data:`Resumed` whose first request the cluster's limits refused
(``try_start_request`` said no: the flow answers overflow, 503 ``UO``)."""

Resumed = tuple[float, "ClusterRuntime | None", Host | None, AttemptResult | None]
"""Where an adapter's fast path hands a call to the flow (see :func:`resume_flow`):
``(now, cluster, host, None)`` after the first pick (no limit taken yet), or
``(now, cluster, host, result)`` after the first attempt was sent (its request admitted by
the cluster's limits and counted on ``host``) and answered ``result``."""


class _NoDraw:
    """An ``rng`` for routing that refuses to draw: a route choice that needs a draw
    (``runtime_fraction``) is not the same for every call."""

    def getrandbits(self, k: int) -> int:
        raise _DrawNeeded


class _DrawNeeded(Exception):
    """Raised by :class:`_NoDraw`: the route needs a random draw, so no fast plan."""


class FastPlan:
    """What the flow decides the same way for every call of one method without metadata
    under one snapshot, when no decision needs per-call state: the route (no random
    match), one named cluster, no fault, no mirror, no hash policy, no rewrite, no attempt
    count headers. A gRPC adapter caches it per (snapshot, method) and makes the common
    call itself, as the flow would make it: draw the ``x-request-id`` bits, start the
    deadlines, pick a host of :attr:`entry`'s runtime, admit the request (``limits``),
    count it on the host, send, let outlier detection record the outcome and release. Any
    other turn (no host, overflow, a failed attempt) hands the call to
    :func:`resume_flow`, which continues exactly where the fast path stopped."""

    __slots__ = ("cluster_name", "deadlines", "entry", "plan", "request", "route")

    def __init__(
        self, request: RequestInfo, route: Route, plan: _RoutePlan, entry: ClusterConfig
    ) -> None:
        self.request = request
        self.route = route
        self.plan = plan
        self.entry = entry
        self.cluster_name = entry.cluster.name
        self.deadlines: Deadlines = plan.deadlines[True]
        """The call's deadlines relative to its start (``starting_at(now)``)."""


def fast_plan(
    runtime: MeshRuntime, snapshot: TargetSnapshot, request: RequestInfo
) -> FastPlan | None:
    """The :class:`FastPlan` of gRPC ``request`` (no headers) under ``snapshot``, or
    ``None`` when such a call needs the whole :func:`call_flow`."""
    del runtime
    if request.headers._items or not request.grpc:
        return None
    vhost = snapshot.virtual_host
    if vhost.include_request_attempt_count or vhost.include_attempt_count_in_response:
        return None
    try:
        route = route_request(vhost, request, rng=_NoDraw())  # type: ignore[arg-type]
    except _DrawNeeded:
        return None
    if route is None:
        return None
    action = route.action
    if not isinstance(action, RouteAction) or action.hash_policies:
        return None
    plan = _plan(snapshot, route, action)
    if plan.choice is None or plan.fault is not None or plan.mirrors or not plan.plain_rewrite:
        return None
    entry = snapshot.clusters.get(plan.choice.name)
    if not isinstance(entry, ClusterConfig) or entry.is_aggregate:
        return None
    return FastPlan(request, route, plan, entry)


def resume_flow(
    runtime: MeshRuntime,
    snapshot: TargetSnapshot,
    fast: FastPlan,
    *,
    bits: int,
    deadlines: Deadlines,
    resumed: Resumed,
    clock: Callable[[], float],
) -> Generator[Action, AttemptResult | None, CallResult]:
    """The rest of a call a fast path started under ``fast`` (same snapshot): ``bits``, its
    ``x-request-id`` draw; ``deadlines``, started; ``resumed``, where it stopped. Driven
    like :func:`call_flow` (its first ``next`` continues from there)."""
    return call_flow(
        runtime, snapshot, fast.request, clock=clock, resume=(fast, bits, deadlines, resumed)
    )


def _mirror(
    runtime: MeshRuntime,
    snapshot: TargetSnapshot,
    policy: RequestMirrorPolicy,
    upstream: RequestInfo,
    *,
    now: float,
    overall: float | None,
) -> Mirror | None:
    fraction = policy.runtime_fraction
    if fraction is not None and not fraction.hits(runtime.rng.getrandbits(32)):
        return None
    entry = snapshot.clusters.get(policy.cluster)
    if not isinstance(entry, ClusterConfig):
        return None
    cluster = runtime.leaf_for(snapshot, entry, now)
    host = cluster.pick(PickContext(now)) if cluster is not None else None
    if cluster is None or host is None:
        return None
    shadow = RequestInfo(
        upstream.method,
        _shadow_authority(upstream.authority),
        upstream.path,
        upstream.headers,
        upstream.scheme,
        upstream.source_ip,
        upstream.grpc,
    )
    return Mirror(cluster, host, shadow, None if overall is None else max(overall - now, 0.0))


_NO_RETRY = GiveUp("no retry policy")


class _Attempt:
    """What one attempt holds until its response is finished: a request on the cluster
    (and the host's active count), and for HTTP/1.1 a connection or a place in the pending
    queue (``ticket``). ``release`` is idempotent."""

    __slots__ = ("cluster", "conn", "done", "host", "ticket")

    def __init__(
        self, cluster: ClusterRuntime, host: Host, conn: bool, ticket: PendingTicket | None
    ) -> None:
        self.cluster = cluster
        self.host = host
        self.conn = conn
        self.ticket = ticket
        self.done = False
        host.active_requests += 1

    @classmethod
    def adopt(cls, cluster: ClusterRuntime, host: Host) -> _Attempt:
        """The attempt a fast path started itself (its request admitted by the cluster's
        limits, ``host.active_requests`` already counted)."""
        held = cls.__new__(cls)
        held.cluster = cluster
        held.host = host
        held.conn = False
        held.ticket = None
        held.done = False
        return held

    def granted(self) -> bool:
        """Leave the pending queue: True if a connection was handed over (now held)."""
        ticket = self.ticket
        if ticket is None:
            return self.conn
        self.ticket = None
        self.conn = self.cluster.limits.leave_queue(ticket)
        return self.conn

    def release(self) -> None:
        if self.done:
            return
        self.done = True
        self.host.active_requests -= 1
        limits = self.cluster.limits
        limits.end_request()
        ticket = self.ticket
        if ticket is not None:  # still queued (a cancelled call): leave, unless granted
            self.ticket = None
            self.conn = limits.leave_queue(ticket)
        if self.conn:
            limits.close_connection()  # to the next queued request, if any


_DEFAULT_STREAM_IDLE_TIMEOUT = 300.0
"""Envoy's ``stream_idle_timeout`` when the listener sets none (5 minutes)."""


def _stream_idle_timeout(action: RouteAction, hcm: HttpConnectionManager | None) -> float | None:
    """The route's ``idle_timeout``, else the listener's ``stream_idle_timeout``, else
    Envoy's default; ``0`` disables it (``None``)."""
    idle = action.idle_timeout
    if idle is None:
        idle = hcm.stream_idle_timeout if hcm is not None else None
    if idle is None:
        idle = _DEFAULT_STREAM_IDLE_TIMEOUT
    return idle if idle > 0 else None


def _with_headers(request: RequestInfo, headers: Headers) -> RequestInfo:
    return RequestInfo(
        request.method,
        request.authority,
        request.path,
        headers,
        request.scheme,
        request.source_ip,
        request.grpc,
    )


# --------------------------------------------------------------------------- runners

Flow = Generator[Action, AttemptResult | None, CallResult]


def drive_sync(
    flow: Flow,
    *,
    send: Callable[[Send], AttemptResult],
    sleep: Callable[[float], None],
    mirror: Callable[[Mirror], None],
    discard: Callable[[object], None],
) -> CallResult:
    """Run ``flow`` to its end with blocking I/O callbacks; returns the :class:`CallResult`.

    If a callback raises (or the thread is interrupted), the flow is closed first so that
    whatever the attempt in progress holds (limits, active counts) is given back.
    """
    reply: AttemptResult | None = None
    try:
        action = next(flow)
        while True:
            if type(action) is Send:
                reply = send(action)
            else:
                reply = None
                if type(action) is Sleep:
                    sleep(action.seconds)
                elif type(action) is Discard:
                    discard(action.response)
                elif type(action) is Mirror:
                    mirror(action)
                elif type(action) is WaitConnection:
                    wait_connection_sync(action)
            action = flow.send(reply)
    except StopIteration as stop:
        result: CallResult = stop.value
        return result
    except BaseException:
        flow.close()
        raise


def wait_connection_sync(action: WaitConnection) -> None:
    """Block until the ticket is granted or ``action.timeout`` passes (the flow then reads
    the ticket)."""
    event = threading.Event()
    if action.limits.arm(action.ticket, event.set):
        return
    timeout = action.timeout
    event.wait(None if timeout is None else max(timeout, 0.0))


async def wait_connection_async(action: WaitConnection) -> None:
    """:func:`wait_connection_sync` on the running event loop (the grant may come from
    another thread)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:
            pass  # its loop is closed: nobody waits any more

    if action.limits.arm(action.ticket, wake):
        return
    timeout = action.timeout
    try:
        if timeout is None:
            await future
        else:
            await asyncio.wait_for(future, max(timeout, 0.0))
    except TimeoutError:
        pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def drive_async(
    flow: Flow,
    *,
    send: Callable[[Send], Awaitable[AttemptResult]],
    sleep: Callable[[float], Awaitable[object]],
    mirror: Callable[[Mirror], None],
    discard: Callable[[object], Awaitable[object]],
) -> CallResult:
    """:func:`drive_sync` for an event loop: same flow, awaited callbacks. ``mirror`` must
    only schedule the shadow request (fire-and-forget), never await it."""
    reply: AttemptResult | None = None
    try:
        action = next(flow)
        while True:
            if type(action) is Send:
                reply = await send(action)
            else:
                reply = None
                if type(action) is Sleep:
                    await sleep(action.seconds)
                elif type(action) is Discard:
                    await discard(action.response)
                elif type(action) is Mirror:
                    mirror(action)
                elif type(action) is WaitConnection:
                    await wait_connection_async(action)
            action = flow.send(reply)
    except StopIteration as stop:
        result: CallResult = stop.value
        return result
    except BaseException:
        flow.close()
        raise
