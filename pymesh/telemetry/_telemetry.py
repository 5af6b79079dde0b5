"""The process's :class:`Telemetry`: metrics, traces and access logs of every mesh request.

Adapters call it at two points per request (a start and a finish), through the
:class:`ClientCall` / :class:`ServerCall` objects it returns; nothing else in pymesh imports
OpenTelemetry. One ``Telemetry`` per process (:func:`install` / :func:`current`); when none
is installed, adapters skip telemetry entirely (one global read per request).

Cost on the hot path (see ``bench/telemetry_bench.py`` and ``docs/metrics.md``): the label
set is built once per ``(protocol, status, flags, cluster, endpoint metadata or exchanged
peer, mTLS)`` and memoized with its pre-bound metric series (see
:mod:`pymesh.telemetry._metrics`); an unsampled request makes no OpenTelemetry span at all:
the sampling decision (parent's flag, else ``trace_sampling`` percent) is taken here, and
the trace context is still propagated with the sampled flag off, so downstream services
agree; an access log line is built only when it is written; the httpx request's URL is
read only when a span or a line needs it, and telemetry's request headers go onto the
upstream request (:meth:`ClientCall.outbound`), not into the application's request object.
Peer metadata exchange (Istio's ``x-envoy-peer-metadata``): :mod:`pymesh.telemetry._peer`.
"""

from __future__ import annotations

import atexit
import contextvars
import ipaddress
import logging
import os
import random
import re
import threading
import time
import weakref
from binascii import hexlify
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation import _SPAN_KEY

from pymesh.core.flow import lowered_headers
from pymesh.core.types import Headers, RequestInfo
from pymesh.telemetry import _propagation
from pymesh.telemetry._accesslog import (
    AccessLogWriter,
    AccessRecord,
    LogFile,
    agent_and_id,
    format_json,
    text_item,
    text_line,
)
from pymesh.telemetry._labels import (
    UNKNOWN,
    PeerWorkload,
    Workload,
    principal_of,
    service_name_namespace,
    service_of_cluster,
)
from pymesh.telemetry._metrics import RequestMetrics, _Series, render_prometheus
from pymesh.telemetry._peer import PeerDecoder, exchange_baggage, exchange_headers

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported when a Telemetry is built
    from opentelemetry.sdk.metrics.export import Metric, MetricExporter, MetricsData

    from pymesh.bootstrap import Node
    from pymesh.core.flow import CallResult
    from pymesh.core.runtime import MeshRuntime
    from pymesh.security import CertificateProvider
    from pymesh.xds.client import XdsClient

__all__ = [
    "AccessLogMode",
    "ClientCall",
    "ServerCall",
    "Telemetry",
    "current",
    "install",
    "uninstall",
]

_log = logging.getLogger("pymesh.telemetry")

AccessLogMode = Literal["off", "sampled", "full"]

_MAX_LABEL_CACHE = 4096
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_ZERO_SPAN_B = b"0" * 16
_DRAWS = 64
"""New traces decided per batch (:meth:`Telemetry._draw`)."""
_ZERO_IDS = re.compile(rb"^0{32}-|-0{16}$")
"""An all-zero trace or span id in a drawn ``trace-span`` entry."""

_current: Telemetry | None = None
_instances: weakref.WeakSet[Telemetry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child (a pre-fork server's worker) must not repeat its parent's trace
    ids: drop the parent's decided traces and reseed the default random source."""
    for tel in list(_instances):
        tel._draws = []
        tel._quick = False  # the child has no writer thread yet (see Telemetry._queue)
        if tel._own_rng:
            tel._rng.seed()


os.register_at_fork(after_in_child=_after_fork_in_child)
_install_lock = threading.Lock()


def _context_var() -> contextvars.ContextVar[Any] | None:
    """The variable holding the current OpenTelemetry context: the API's contextvars
    runtime context's, when it is the one in use (the default); ``None`` otherwise (then
    the public ``get_current`` / ``attach`` / ``detach`` are used)."""
    var = getattr(getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None)
    if isinstance(var, contextvars.ContextVar) and var.get() is otel_context.get_current():
        return var
    return None


_CONTEXT_VAR = _context_var()
_current_context: Callable[[], Mapping[str, Any]] = (
    _CONTEXT_VAR.get if _CONTEXT_VAR is not None else otel_context.get_current
)
"""The current OpenTelemetry context in one call."""


def current() -> Telemetry | None:
    """The installed process-wide :class:`Telemetry`, or ``None`` (telemetry off)."""
    return _current


def install(telemetry: Telemetry) -> Telemetry:
    """Make ``telemetry`` the process's telemetry (replaces any previous one)."""
    global _current
    with _install_lock:
        _current = telemetry
    return telemetry


def uninstall(telemetry: Telemetry | None = None) -> None:
    """Turn telemetry off (only if ``telemetry`` is the installed one, when given)."""
    global _current
    with _install_lock:
        if telemetry is None or _current is telemetry:
            _current = None


def _flags_text(flags: tuple[str, ...]) -> str:
    return ",".join(flags) if flags else "-"


class Telemetry:
    """Metrics, traces and access logs for every mesh request of this process.

    ``node``: the bootstrap node (its metadata names this workload: ``WORKLOAD_NAME``,
    ``NAMESPACE``, ``LABELS``, ``CLUSTER_ID``, ``SERVICE_ACCOUNT``, ``TRUST_DOMAIN``).
    ``metrics``: record Istio's request metrics. ``access_log``: ``"off"``, ``"sampled"``
    (a random ``access_log_sample`` fraction, plus every request with a response flag or a
    5xx) or ``"full"``; ``access_log_format``: ``"text"`` (Envoy's default) or ``"json"``;
    lines go to ``access_log_file`` (Istio's ``accessLogFile``: a path, ``/dev/stdout`` or
    ``/dev/stderr``; written a batch at a time) or to ``access_log_sink``, one call per line
    (default: the ``pymesh.access`` logger at INFO).
    ``trace_sampling``: percent of new traces sampled (Istio's ``sampling``, default 1.0);
    an inbound parent's decision always wins. ``tracer_provider``: where sampled spans go
    (default: a fresh SDK provider; add a span processor to export). ``propagation``:
    outbound formats among ``tracecontext``, ``b3multi``, ``b3`` (default W3C and the
    single ``b3`` header: two headers per request; inbound, all three are read).
    ``peer_exchange``: Istio's metadata exchange (``x-envoy-peer-metadata`` headers out on
    requests and responses, read into the peer's workload labels; see
    :mod:`pymesh.telemetry._peer`). ``rng``: the sampling randomness (seed it in tests).
    """

    def __init__(
        self,
        *,
        node: Node | None = None,
        metrics: bool = True,
        access_log: AccessLogMode = "off",
        access_log_format: Literal["text", "json"] = "text",
        access_log_sample: float = 0.01,
        access_log_sink: Callable[[str], None] | None = None,
        access_log_file: str | os.PathLike[str] | None = None,
        tracing: bool = True,
        trace_sampling: float = 1.0,
        tracer_provider: trace.TracerProvider | None = None,
        propagation: Iterable[str] = ("tracecontext", "b3"),
        peer_exchange: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if access_log not in ("off", "sampled", "full"):
            raise ValueError(f"access_log must be off, sampled or full, not {access_log!r}")
        if access_log_format not in ("text", "json"):
            raise ValueError(f"access_log_format must be text or json, not {access_log_format!r}")
        if not 0.0 <= trace_sampling <= 100.0:
            raise ValueError(f"trace_sampling is a percentage (0-100), not {trace_sampling!r}")
        formats = frozenset(propagation)
        if not formats <= _propagation.FORMATS:
            raise ValueError(
                f"unknown propagation format(s): {sorted(formats - _propagation.FORMATS)}"
            )
        self.metrics_enabled = metrics
        self.access_log = access_log
        self._text = access_log_format == "text"  # lines straight from fields, no record
        self._quick_wanted = (self._text or access_log == "off") and (
            metrics or access_log != "off"
        )
        """Whether HTTP responses are recorded as :meth:`ClientCall.response`'s quick
        record (a JSON line needs the full record, built on the request path)."""
        self._quick = False
        """:attr:`_quick_wanted`, once the writer thread runs (:meth:`_put` starts it)."""
        self._log_all = access_log == "full"
        self._sample_logs = access_log_sample
        if access_log_file is not None and access_log_sink is not None:
            raise ValueError("give access_log_file or access_log_sink, not both")
        self._log_file = LogFile(access_log_file) if access_log_file is not None else None
        if self._log_file is not None:
            self._writer = AccessLogWriter(self._render, write_lines=self._log_file.write_lines)
        else:
            access_logger = logging.getLogger("pymesh.access")
            self._writer = AccessLogWriter(
                self._render,
                access_log_sink or (lambda line: access_logger.info("%s", line)),
            )
        self.tracing = tracing
        self._trace_ratio = trace_sampling / 100.0
        self.propagation = formats
        self._formats = (
            "tracecontext" in formats,
            "b3multi" in formats,
            "b3" in formats,
        )
        self._rng = rng or random.Random()
        self._own_rng = rng is None
        self._draws: list[tuple[tuple[bytes, bytes], ...] | None] = []
        """Decided new traces, popped one per outbound request (:meth:`_draw`)."""
        _instances.add(self)
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        if tracer_provider is None:
            # Spans reach this provider only once *we* sampled them: the SDK must not re-sample.
            tracer_provider = TracerProvider(sampler=ALWAYS_ON)
        self.tracer_provider = tracer_provider
        self._tracer = tracer_provider.get_tracer("pymesh")
        self._span_out: Any = _span_output(tracer_provider)
        """An SDK provider's span processor, resource and pymesh's scope: client spans are
        then made whole at their end, on the writer (:class:`_PendingSpan`); ``None`` for
        any other provider (spans through its tracer, as they start and end)."""
        if self._span_out is not None:
            # At exit, hand the last pending spans over before the provider shuts down: its
            # own exit hook was registered when it was made, before this one, so it runs
            # after (atexit runs hooks last-registered first).
            atexit.register(_flush_at_exit, weakref.ref(self))
        self.peer_exchange = peer_exchange
        self._peers = PeerDecoder()
        self.requests = RequestMetrics(drain=self._writer.flush)
        self._pending = self._writer._pending
        self._max_pending = self._writer._max
        self._label_cache: dict[tuple[Any, ...], tuple[object, _Series]] = {}
        self._peer_cache: dict[int, tuple[object, Workload]] = {}
        self._counters_lock = threading.Lock()
        self.retries: dict[str, int] = {}
        self.overflows: dict[str, int] = {}
        self._runtimes: list[MeshRuntime] = []
        self._xds_clients: list[XdsClient] = []
        self._certificates: dict[str, Callable[[], float | None]] = {}
        self._reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self._reader])
        self._register_internals()
        self._servers: list[Any] = []
        self._exporters: list[tuple[MetricExporter, threading.Event, threading.Thread]] = []
        self._resource = Resource.create({"service.name": "pymesh"})
        self._closed = False
        self.set_node(node)

    # -- identity ------------------------------------------------------------------------

    def set_node(self, node: Node | None) -> None:
        """Name this workload from a bootstrap node (``None``: every local label unknown)."""
        if node is None:
            self.workload = Workload()
            self.identity = UNKNOWN
        else:
            self.workload = Workload.from_node(
                workload=node.workload_name,
                namespace=node.namespace,
                labels=node.labels,
                cluster_id=node.cluster_id,
            )
            sa = node.service_account
            ns = node.namespace
            self.identity = (
                f"spiffe://{node.trust_domain}/ns/{ns}/sa/{sa}" if sa and ns else UNKNOWN
            )
        self.node = node
        self.exchange_headers = exchange_headers(node) if self.peer_exchange else ()
        """``x-envoy-peer-metadata-id`` / ``x-envoy-peer-metadata`` of this workload (what
        outbound requests carry and servers answer with; empty without a node)."""
        self.exchange_headers_raw = tuple(
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in self.exchange_headers
        )
        self._mx_clusters: dict[int, tuple[object, tuple[tuple[bytes, bytes], ...]]] = {}
        self._written = frozenset(
            [k for k, _ in self.exchange_headers]
            + (
                [n for f in self.propagation for n in _propagation.HEADERS[f]]
                if self.tracing
                else []
            )
        )
        """The request header names telemetry writes on HTTP (the application's are dropped)."""
        self._strip_memo: dict[int, tuple[Headers, Headers | None]] = {}
        baggage = exchange_baggage(node) if self.peer_exchange else ""
        self.exchange_metadata = (
            (*self.exchange_headers, ("baggage", baggage)) if baggage else self.exchange_headers
        )
        """gRPC's exchange: the headers plus the ambient ``baggage`` form, because grpcio's
        core consumes ``x-envoy-peer-metadata`` itself (sent on the wire for Envoy peers,
        never shown to the application on receipt)."""
        self._label_cache = {}

    # -- client side ---------------------------------------------------------------------

    def client_call(
        self,
        *,
        protocol: str,
        method: str,
        authority: str | None,
        path: str | None,
        set_header: Callable[[str, str], None],
        request: Any = None,
    ) -> ClientCall:
        """Start an outbound request: opens its client span (when sampled) and writes the
        trace and peer metadata headers with ``set_header``. Call :meth:`ClientCall.finish`
        once it ends. ``authority`` / ``path`` may be ``None`` with an httpx ``request``
        given instead: they are then read from its URL only if a span or a log line needs
        them."""
        call = ClientCall(self, protocol, method, authority, path, request)
        if self.tracing:
            for raw_name, raw_value in self._trace_headers(call):
                set_header(raw_name.decode("latin-1"), raw_value.decode("latin-1"))
        for name, value in self.exchange_metadata if protocol == "grpc" else self.exchange_headers:
            set_header(name, value)
        return call

    def _trace_headers(self, call: ClientCall) -> tuple[tuple[bytes, bytes], ...]:
        """The trace context headers of a new outbound request, as bytes for the wire.
        Sampled (the current span's decision, else ``trace_sampling``): a client span
        (``call.span``) and its context.
        Not sampled (the usual case at 1%): no span object at all, the ids random (or the
        current trace's id) and the flag off, so downstream agrees. With no current span,
        the decision and the headers are one pop from :meth:`_draw`'s batch."""
        span = _current_context().get(_SPAN_KEY)
        if span is None:  # the usual case: a new trace
            try:
                drawn = self._draws.pop()
            except IndexError:
                drawn = self._draw()
            if drawn is not None:
                return drawn
            return self._sampled_headers(call)
        parent = span.get_span_context()
        if not parent.is_valid:
            return (
                self._sampled_headers(call)
                if self._rng.random() < self._trace_ratio
                else (_propagation.unsampled_headers(self._new_ids(), self._formats))
            )
        if parent.trace_flags.sampled:
            return self._sampled_headers(call)
        ids = f"{parent.trace_id:032x}{self._rng.getrandbits(64) or 1:016x}"
        return _propagation.unsampled_headers(ids, self._formats)

    def _sampled_headers(self, call: ClientCall) -> tuple[tuple[bytes, bytes], ...]:
        """A sampled request: its client span (``call.span``, a child of the current span
        if any) and that span's context as headers."""
        out: list[tuple[str, str]] = []
        name = f"{call.authority}{call.path.split('?', 1)[0]}"
        if self._span_out is not None:  # ids and start now, the SDK span at the end
            current = _current_context().get(_SPAN_KEY)
            parent = current.get_span_context() if current is not None else None
            if parent is not None and not parent.is_valid:
                parent = None
            rng = self._rng
            trace_id = parent.trace_id if parent is not None else rng.getrandbits(128) or 1
            pending = call.span = _PendingSpan(
                trace_id, rng.getrandbits(64) or 1, parent, name, time.time_ns()
            )
            _propagation.inject_ids(
                trace_id, pending.span_id, True, _append_to(out), self.propagation
            )
        else:
            span = call.span = self._tracer.start_span(name, kind=SpanKind.CLIENT)
            _propagation.inject(span.get_span_context(), _append_to(out), self.propagation)
        return tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in out)

    def _queue_span(self, entry: tuple[Any, ...]) -> None:
        """A finished :class:`_PendingSpan` (``(_SPAN, span, attributes, error, end ns)``)
        to the writer's queue; with the queue full, exported here and now (never lost)."""
        if not self._put(entry):
            self._export_span(entry)

    def _export_span(self, entry: tuple[Any, ...]) -> None:
        """A finished pending span, as the SDK's ``ReadableSpan``, to the provider's span
        processors (``on_end``: an exporter's batch, or its export)."""
        from opentelemetry.sdk.trace import ReadableSpan

        _, span, attributes, error, end_ns = entry
        processor, resource, scope = self._span_out
        processor.on_end(
            ReadableSpan(
                name=span.name,
                context=span.get_span_context(),
                parent=span.parent,
                resource=resource,
                attributes=attributes,
                kind=SpanKind.CLIENT,
                status=Status(StatusCode.ERROR) if error else Status(StatusCode.UNSET),
                start_time=span.start_ns,
                end_time=end_ns,
                instrumentation_scope=scope,
            )
        )

    def _new_ids(self) -> str:
        """A new trace id (32 hex digits) then span id (16), neither all zero."""
        ids = self._rng.getrandbits(192).to_bytes(24, "little").hex()
        if ids.startswith(_ZERO_TRACE) or ids.endswith(_ZERO_SPAN):  # all-zero: invalid
            ids = f"{int(ids[:32], 16) or 1:032x}{int(ids[32:], 16) or 1:016x}"
        return ids

    def _new_ids_b(self) -> bytes:
        """:meth:`_new_ids` as a drawn entry: ``trace-span`` bytes."""
        ids = self._new_ids()
        return f"{ids[:32]}-{ids[32:]}".encode()

    def _draw(self) -> tuple[tuple[bytes, bytes], ...] | None:
        """Decide :data:`_DRAWS` new traces at once and return the first: ``None`` when
        sampled, else the unsampled headers, ready for the wire. The random ids of the
        whole batch come from one draw and are cut and formatted by C loops (the request
        path then pops one entry)."""
        rng = self._rng
        ratio = self._trace_ratio
        formats = self._formats
        raw = rng.getrandbits(192 * _DRAWS).to_bytes(24 * _DRAWS, "little")
        sampled = [i for i in range(_DRAWS) if rng.random() < ratio] if ratio else ()
        # "trace-span" per entry: the hex cut by hexlify's separators, joined by C loops
        traces = hexlify(raw[: 16 * _DRAWS], b" ", 16)
        spans = hexlify(raw[16 * _DRAWS :], b" ", 8)
        ids = list(map(b"-".join, zip(traces.split(), spans.split(), strict=True)))
        out: list[tuple[tuple[bytes, bytes], ...] | None]
        if _ZERO_SPAN_B in traces or _ZERO_SPAN_B in spans:  # maybe an all-zero id (invalid)
            ids = [self._new_ids_b() if _ZERO_IDS.search(i) else i for i in ids]
        if formats == (True, False, True):  # the default: W3C and B3 single
            out = [((b"traceparent", b"00-%s-00" % i), (b"b3", b"%s-0" % i)) for i in ids]
        else:
            out = [
                _propagation.unsampled_headers(i.decode().replace("-", ""), formats) for i in ids
            ]
        for i in sampled:
            out[i] = None
        self._draws = out
        return out.pop()

    def _client_series(  # noqa: PLR0917 - hot path, internal
        self,
        protocol: str,
        status: int,
        grpc_status: int | None,
        flags: tuple[str, ...],
        cluster: str | None,
        host: Any,
        mtls: bool,
        peer: Workload | None,
    ) -> _Series | None:
        """The pre-bound metric series of a finished outbound request (``None``: the table
        is full). ``peer``: the workload the server named in its answer (metadata
        exchange); without it, the picked endpoint's metadata names it."""
        # One lookup on the usual path, keyed by the identity of what names the peer: the
        # exchanged workload (memoized by the decoder) or the endpoint's metadata object.
        # The entry holds that object, so its id cannot be reused meanwhile.
        anchor = peer if peer is not None else getattr(host, "metadata", None)
        key = (protocol, status, grpc_status, flags, cluster, id(anchor), peer is None, mtls)
        found = self._label_cache.get(key)
        if found is not None and found[0] is anchor:
            return found[1]
        if peer is None:  # endpoint metadata -> peer workload, memoized by identity too
            entry = self._peer_cache.get(id(anchor))
            if entry is None or entry[0] is not anchor:
                entry = (anchor, PeerWorkload.from_metadata(anchor))
                if len(self._peer_cache) > _MAX_LABEL_CACHE:
                    self._peer_cache = {}
                self._peer_cache[id(anchor)] = entry
            peer = entry[1]
        service, name, namespace = service_of_cluster(cluster)
        src = self.workload
        labels = (
            "source",
            src.workload,
            src.canonical_service,
            src.canonical_revision,
            src.namespace,
            self.identity if mtls else UNKNOWN,
            src.app,
            src.version,
            src.cluster,
            peer.workload,
            peer.namespace,
            UNKNOWN,
            peer.app,
            peer.version,
            service,
            peer.canonical_service,
            peer.canonical_revision,
            name,
            namespace,
            peer.cluster,
            protocol,
            str(status),
            "" if grpc_status is None else str(grpc_status),
            _flags_text(flags),
            UNKNOWN,  # Istio's client reporter does not know the policy
        )
        series = self.requests.bind(labels)
        if series is not None:
            if len(self._label_cache) > _MAX_LABEL_CACHE:
                self._label_cache = {}
            self._label_cache[key] = (anchor, series)
        return series

    # -- server side ---------------------------------------------------------------------

    def server_call(
        self,
        *,
        protocol: str,
        method: str,
        authority: str,
        path: str,
        get_header: Callable[[str], str | None],
    ) -> ServerCall:
        """Start an inbound request: joins the caller's trace (W3C, then B3 single, then
        B3 multi), opens the server span when sampled and makes it the current context (so
        the handler's own spans and outbound calls nest under it). Call
        :meth:`ServerCall.finish` from the same thread / task once the response is sent."""
        span: Any = None
        token = None
        if self.tracing:
            ids = _propagation.extract_ids(get_header)
            rng = self._rng
            sampled = ids[2] if ids is not None else rng.random() < self._trace_ratio
            if sampled:
                parent_ctx = (
                    trace.set_span_in_context(
                        NonRecordingSpan(
                            SpanContext(ids[0], ids[1], is_remote=True, trace_flags=_SAMPLED)
                        )
                    )
                    if ids is not None
                    else otel_context.Context()
                )
                span = self._tracer.start_span(
                    f"{authority}{path.split('?', 1)[0]}",
                    context=parent_ctx,
                    kind=SpanKind.SERVER,
                )
                token = otel_context.attach(trace.set_span_in_context(span, parent_ctx))
            else:  # the caller's trace id (or a new one) under a span id of our own
                trace_id = ids[0] if ids is not None else rng.getrandbits(128) or 1
                child = _UnsampledSpan(trace_id, rng.getrandbits(64) or 1)
                if _CONTEXT_VAR is not None:  # otel_context.set_value + attach, one copy
                    made = otel_context.Context({**_CONTEXT_VAR.get(), _SPAN_KEY: child})
                    token = _CONTEXT_VAR.set(made)
                else:
                    token = otel_context.attach(otel_context.set_value(_SPAN_KEY, child))
        return ServerCall(self, protocol, method, authority, path, span, token, get_header)

    def _server_series(  # noqa: PLR0917 - hot path, internal
        self,
        protocol: str,
        status: int,
        grpc_status: int | None,
        flags: tuple[str, ...],
        authority: str,
        peer_principal: str,
        mtls: bool,
        peer: Workload | None,
    ) -> _Series | None:
        """The pre-bound series of a finished inbound request (``peer``: the caller's
        workload from its exchanged metadata, if it sent any)."""
        key = ("in", protocol, status, grpc_status, flags, authority, peer_principal, mtls,
               id(peer))  # fmt: skip
        found = self._label_cache.get(key)
        if found is not None and found[0] is peer:
            return found[1]
        host = _authority_host(authority)
        dst = self.workload
        if not host or _is_ip(host):
            # dialled by address (a proxyless client's endpoint channel): the service is
            # not named; this workload's canonical service and namespace stand in
            host, name, namespace = UNKNOWN, dst.canonical_service, dst.namespace
        else:
            name, namespace = service_name_namespace(host)
        src = peer if peer is not None else _NO_PEER
        src_namespace = src.namespace
        if src_namespace == UNKNOWN:
            src_namespace = _namespace_of(peer_principal)
        labels = (
            "destination",
            src.workload,
            src.canonical_service,
            src.canonical_revision,
            src_namespace,
            peer_principal,
            src.app,
            src.version,
            src.cluster,
            dst.workload,
            dst.namespace,
            self.identity if mtls else UNKNOWN,
            dst.app,
            dst.version,
            host,
            dst.canonical_service,
            dst.canonical_revision,
            name,
            namespace if namespace != UNKNOWN else dst.namespace,
            dst.cluster,
            protocol,
            str(status),
            "" if grpc_status is None else str(grpc_status),
            _flags_text(flags),
            "mutual_tls" if mtls else "none",
        )
        series = self.requests.bind(labels)
        if series is not None:
            if len(self._label_cache) > _MAX_LABEL_CACHE:
                self._label_cache = {}
            self._label_cache[key] = (peer, series)
        return series

    # -- recording -----------------------------------------------------------------------

    def _queue(self, record: tuple[Any, ...]) -> None:
        """The request path's one step per finished request: ``record`` (see
        :meth:`_render`) to the writer's bounded queue. A full queue never blocks: the
        metrics are counted here and then, and the access log line is dropped (counted)."""
        if not self._put(record):
            if record[14] is not None:
                self._writer.dropped += 1
            self._render([(*record[:14], None)])

    def _put(self, entry: tuple[Any, ...]) -> bool:
        """``entry`` to the writer's bounded queue (``False``: full, not queued). The usual
        case is one append; else the writer's :meth:`~AccessLogWriter.offer`, which starts
        its thread, and then quick records are on when wanted (:attr:`_quick`)."""
        pending = self._pending
        if len(pending) < self._max_pending and self._writer._thread is not None:
            pending.append(entry)
            return True
        queued = self._writer.offer(entry)
        if self._quick_wanted and self._writer._thread is not None:
            self._quick = True  # the writer runs: quick records may follow
        return queued

    def _render(self, records: list[tuple[Any, ...]]) -> list[str]:
        """Count finished requests' records into the metrics (under one lock) and return
        their access log lines, in order. Run by the writer thread, or by whoever reads the
        metrics or flushes the log first (every read drains the queue: a scrape right
        after a request sees it, as Envoy merges its thread-local stats at a flush).
        A record: ``(inbound, protocol, status, grpc_status, flags, cluster or authority,
        host or peer principal, mtls, peer workload, duration s, request bytes, response
        bytes, request messages, response messages, line item or None)``, or the HTTP
        client's quick record (:meth:`ClientCall.response`): ``(start perf_counter, end
        perf_counter, method, path, authority, status, request bytes, response bytes, flags,
        cluster, host, peer workload, upstream request header pairs, log line wanted)``,
        whose line and durations are made here."""
        count = self.metrics_enabled
        client, server = self._client_series, self._server_series
        counted: list[tuple[_Series, float, int, int, int, int]] = []
        lines: list[str] = []
        text = self._text
        wall = time.time() - time.perf_counter()  # perf_counter -> wall clock, this drain
        # the previous quick record's series and what names it (consecutive records mostly
        # share one: compared, not looked up)
        last: tuple[Any, ...] = (None, None, None, None, None)
        last_series: _Series | None = None
        spans: list[tuple[Any, ...]] = []
        for r in records:
            if r[0] is _SPAN:  # a finished client span: exported after the counts
                spans.append(r)
                continue
            if r[0].__class__ is float:  # ClientCall.response's quick record
                t0, end, method, path, authority, status, qb, rb, flags, cluster, host, peer, \
                    sent, log = r  # fmt: skip
                seconds = end - t0
                if count:
                    if (
                        host is last[0]
                        and status == last[1]
                        and peer is last[2]
                        and flags == last[3]
                        and cluster == last[4]
                    ):
                        series = last_series
                    else:
                        series = client("http", status, None, flags, cluster, host, False, peer)
                        last, last_series = (host, status, peer, flags, cluster), series
                    if series is not None:
                        counted.append((series, seconds * 1000.0, qb, rb, 0, 0))
                if log:  # text (the quick record's only format)
                    agent, rid = agent_and_id(sent, None, None)
                    lines.append(
                        text_line(t0 + wall, method, path, "HTTP/1.1", status,
                                  ",".join(flags) if flags else "-", qb, rb,
                                  int(seconds * 1000), None, None, agent, rid, authority,
                                  host.key if host is not None else None)
                    )  # fmt: skip
                continue
            if count:
                series = (server if r[0] else client)(
                    r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]
                )
                if series is not None:
                    counted.append((series, r[9] * 1000.0, r[10], r[11], r[12], r[13]))
            item = r[14]
            if item is not None:
                lines.append(text_item(item) if text else format_json(item))
        if counted:
            self.requests.add_many(counted)
        for entry in spans:  # after the loop: a record that breaks it exports none twice
            try:
                self._export_span(entry)
            except Exception:  # a broken processor loses its span, not the batch
                _log.exception("telemetry: exporting a span failed")
        return lines

    def _log_this(self, flagged: bool) -> bool:
        """Whether this request's access log line is written (decided before building it)."""
        mode = self.access_log
        if mode == "off":
            return False
        return mode == "full" or flagged or self._rng.random() < self._sample_logs

    def flush_access_log(self) -> None:
        """Write every queued access log line now (lines are formatted and written by a
        writer thread every ~0.1 s, off the request path; :meth:`close` and interpreter
        exit flush too)."""
        self._writer.flush()

    @property
    def access_log_dropped(self) -> int:
        """Access log lines dropped because the writer's queue was full."""
        return self._writer.dropped

    def peer_of_headers(self, get_header: Callable[[str], str | None]) -> Workload | None:
        """The peer workload a request or response names in its metadata exchange headers
        (``x-envoy-peer-metadata``, else an ambient ``baggage``), memoized; ``None`` if it
        names none or peer exchange is off."""
        if not self.peer_exchange:
            return None
        return self._peers.from_headers(get_header)

    def peer_of_raw(self, headers: Iterable[tuple[bytes, bytes]]) -> Workload | None:
        """:meth:`peer_of_headers` for raw ``(name, value)`` byte pairs (lower-case or not),
        as httpcore and ASGI give them."""
        return self.take_exchange(list(headers))[1]

    def take_exchange(
        self, headers: list[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], Workload | None]:
        """An upstream response's raw headers without the server's metadata exchange
        headers (``x-envoy-peer-metadata``, ``x-envoy-peer-metadata-id``: a client
        sidecar's exchange filter reads and removes them, the application never sees
        them), and the server's workload they (else an ambient ``baggage``) name. The
        same list when there are none; nothing removed with peer exchange off."""
        if not self.peer_exchange:
            return headers, None
        for name, _ in headers:  # the usual case: no name of those lengths, one test a name
            if len(name) in _MX_SIZES:
                break
        else:
            return headers, None
        metadata = baggage = None
        found = False
        for name, value in headers:
            size = len(name)
            if size in {21, 24}:
                lowered = name.lower()
                if lowered == b"x-envoy-peer-metadata":
                    found = True
                    if metadata is None:
                        metadata = value
                elif lowered == b"x-envoy-peer-metadata-id":
                    found = True
            elif size == 7 and baggage is None and name.lower() == b"baggage":
                baggage = value
        if not found:
            peer = self._peers.baggage(baggage.decode("latin-1")) if baggage is not None else None
            return headers, peer
        kept = [kv for kv in headers if kv[0].lower() not in _MX_NAMES]
        if metadata is not None:
            return kept, self._peers.metadata(metadata.decode("latin-1"))
        return kept, self._peers.baggage(baggage.decode("latin-1")) if baggage else None

    def count_attempts(self, cluster: str | None, attempts: int, flags: tuple[str, ...]) -> None:
        if cluster is None:
            return
        if attempts > 1 or "UO" in flags:
            with self._counters_lock:
                if attempts > 1:
                    self.retries[cluster] = self.retries.get(cluster, 0) + attempts - 1
                if "UO" in flags:
                    self.overflows[cluster] = self.overflows.get(cluster, 0) + 1

    # -- mesh internals ------------------------------------------------------------------

    def watch_runtime(self, runtime: MeshRuntime) -> None:
        """Report endpoints healthy / ejected per cluster of ``runtime`` and its xDS
        client's connection and resource states (read at scrape time)."""
        if runtime not in self._runtimes:
            self._runtimes.append(runtime)
        client = runtime.client
        if client is not None:
            self.watch_xds_client(client)

    def watch_xds_client(self, client: XdsClient) -> None:
        if client not in self._xds_clients:
            self._xds_clients.append(client)

    def watch_certificate(self, name: str, not_after: Callable[[], float | None]) -> None:
        """Report ``pymesh_certificate_expiry_seconds{name}``: ``not_after()`` is the
        current certificate's expiry (epoch seconds) or ``None`` when there is none."""
        self._certificates[name] = not_after

    def watch_certificate_provider(
        self, provider: CertificateProvider, name: str = "default"
    ) -> None:
        """Report the expiry of ``provider``'s current certificate (read at scrape time;
        a provider with no certificate yet, or a trust-only bundle, reports nothing)."""

        def not_after() -> float | None:
            try:
                bundle = provider.current()
            except Exception:  # not ready yet
                return None
            if not bundle.has_identity or bundle.not_after == float("inf"):
                return None
            return bundle.not_after

        self.watch_certificate(name, not_after)

    def _register_internals(self) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation

        meter = self.meter_provider.get_meter("pymesh")

        def xds_connected(_: CallbackOptions) -> Iterator[Observation]:
            for client in list(self._xds_clients):
                for state in client.connection_states():
                    yield Observation(int(state.connected), {"server": state.server_uri})

        def xds_resources(_: CallbackOptions) -> Iterator[Observation]:
            counts: dict[tuple[str, str], int] = {}
            for client in list(self._xds_clients):
                for s in client.resource_statuses():
                    key = (s.rtype.value, s.status)
                    counts[key] = counts.get(key, 0) + 1
            for (type_url, status), n in sorted(counts.items()):
                yield Observation(n, {"type_url": type_url, "status": status})

        def endpoints(_: CallbackOptions) -> Iterator[Observation]:
            now = time.monotonic()
            for runtime in list(self._runtimes):
                for name, cluster in list(runtime.clusters().items()):
                    hosts = list(cluster.hosts.values())
                    ejected = sum(1 for h in hosts if h.is_ejected(now))
                    healthy = sum(
                        1 for h in hosts if not h.is_ejected(now) and h.health.name in _UP
                    )
                    yield Observation(healthy, {"cluster_name": name, "state": "healthy"})
                    yield Observation(ejected, {"cluster_name": name, "state": "ejected"})

        def retries(_: CallbackOptions) -> Iterator[Observation]:
            for name, n in sorted(self.retries.items()):
                yield Observation(n, {"cluster_name": name})

        def overflows(_: CallbackOptions) -> Iterator[Observation]:
            for name, n in sorted(self.overflows.items()):
                yield Observation(n, {"cluster_name": name})

        def certificates(_: CallbackOptions) -> Iterator[Observation]:
            for name, fn in list(self._certificates.items()):
                try:
                    value = fn()
                except Exception:
                    continue
                if value is not None:
                    yield Observation(value, {"name": name})

        meter.create_observable_gauge(
            "pymesh_xds_connected", [xds_connected], description="1 while the ADS stream is up"
        )
        meter.create_observable_gauge(
            "pymesh_xds_resources",
            [xds_resources],
            description="Subscribed xDS resources per type and status (ACKED, NACKED, ...)",
        )
        meter.create_observable_gauge(
            "pymesh_cluster_endpoints",
            [endpoints],
            description="Endpoints per cluster: healthy (usable) and ejected (outlier)",
        )
        meter.create_observable_counter(
            "pymesh_upstream_rq_retry_total", [retries], description="Retries per cluster"
        )
        meter.create_observable_counter(
            "pymesh_upstream_rq_pending_overflow_total",
            [overflows],
            description="Requests refused by circuit breaking (UO) per cluster",
        )

        def log_drops(_: CallbackOptions) -> Iterator[Observation]:
            if self._writer.dropped:
                yield Observation(self._writer.dropped, {})

        meter.create_observable_counter(
            "pymesh_access_log_dropped_total",
            [log_drops],
            description="Access log lines dropped because the writer's queue was full",
        )
        meter.create_observable_gauge(
            "pymesh_certificate_expiry_seconds",
            [certificates],
            description="Expiry time (epoch seconds) of the workload certificate",
        )

    # -- export --------------------------------------------------------------------------

    def collect(self) -> list[Metric]:
        """Every metric as OpenTelemetry points: Istio's request metrics, then internals."""
        out = self.requests.otel_metrics() if self.metrics_enabled else []
        data = self._reader.get_metrics_data()
        if data is not None:
            for rm in data.resource_metrics:
                for sm in rm.scope_metrics:
                    out.extend(sm.metrics)
        return out

    def prometheus_text(self) -> str:
        """The Prometheus text exposition of :meth:`collect`."""
        return render_prometheus(self.collect())

    def serve_prometheus(
        self, *, host: str = "127.0.0.1", port: int = 15020, path: str = "/stats/prometheus"
    ) -> Any:
        """Start the scrape endpoint (Istio's ``:15020/stats/prometheus``) on a thread;
        returns a :class:`~pymesh.telemetry.PrometheusServer` (``port=0``: a free port).
        Stopped by :meth:`close`."""
        from pymesh.telemetry._server import PrometheusServer

        server = PrometheusServer(self.prometheus_text, host=host, port=port, path=path)
        self._servers.append(server)
        return server

    def metrics_data(self) -> MetricsData:
        """:meth:`collect` wrapped as the SDK's ``MetricsData`` (what exporters take)."""
        from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        scope = ScopeMetrics(InstrumentationScope("pymesh"), self.collect(), "")
        return MetricsData([ResourceMetrics(self._resource, [scope], "")])

    def export_metrics(self, exporter: MetricExporter, *, interval: float = 60.0) -> None:
        """Push :meth:`metrics_data` to an OpenTelemetry ``exporter`` every ``interval``
        seconds from a daemon thread (OTLP: ``opentelemetry-exporter-otlp-proto-grpc``'s
        ``OTLPMetricExporter``), and once more at :meth:`close`."""
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                self._export_once(exporter)

        thread = threading.Thread(target=run, name="pymesh-metrics-export", daemon=True)
        self._exporters.append((exporter, stop, thread))
        thread.start()

    def _export_once(self, exporter: MetricExporter) -> None:
        try:
            exporter.export(self.metrics_data(), timeout_millis=10_000)
        except Exception:
            _log.exception("telemetry: metrics export failed")

    def close(self) -> None:
        """Stop the scrape endpoints and exporters (one last export each) and uninstall
        this telemetry if it is installed."""
        for server in self._servers:
            server.close()
        self._servers = []
        exporters, self._exporters = self._exporters, []
        for exporter, stop, thread in exporters:
            stop.set()
            thread.join(5)
            self._export_once(exporter)
            exporter.shutdown()
        uninstall(self)
        self._writer.close()
        if self._log_file is not None:
            self._log_file.close()
        if not self._closed:
            self._closed = True
            self.meter_provider.shutdown()


_UP = frozenset({"HEALTHY", "UNKNOWN", "DEGRADED"})
_MX_NAMES = frozenset((b"x-envoy-peer-metadata", b"x-envoy-peer-metadata-id"))
_MX_SIZES = frozenset((7, 21, 24))
"""The lengths of ``baggage`` and the two exchange header names."""
_NO_PEER = Workload()


def _authority_host(authority: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]:port`` or ``v6``."""
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    if authority.count(":") == 1:
        return authority.rsplit(":", 1)[0]
    return authority


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _namespace_of(principal: str) -> str:
    parts = principal.split("/")
    if principal.startswith("spiffe://") and "ns" in parts:
        i = parts.index("ns")
        if i + 1 < len(parts) and parts[i + 1]:
            return parts[i + 1]
    return UNKNOWN


class ClientCall:
    """One outbound request in flight (from :meth:`Telemetry.client_call`)."""

    __slots__ = ("_authority", "_path", "info", "method", "protocol", "raw", "request", "span",
                 "t0", "tel")  # fmt: skip

    info: RequestInfo
    """HTTP: the request to route (set by :func:`http_client_call`)."""

    def __init__(  # noqa: PLR0917 - built by Telemetry only
        self,
        tel: Telemetry,
        protocol: str,
        method: str,
        authority: str | None,
        path: str | None,
        request: Any = None,
    ) -> None:
        self.tel = tel
        self.protocol = protocol
        self.method = method
        self._authority = authority
        self._path = path
        self.request = request
        self.span: Any = None
        self.raw: tuple[tuple[bytes, bytes], ...] = ()
        """HTTP: the trace context headers for each upstream attempt, as bytes."""
        self.t0 = time.perf_counter()
        """The start (``time.perf_counter()``; one clock read per request: the wall-clock
        start is derived from it, :attr:`start`)."""

    @property
    def start(self) -> float:
        """The wall-clock start (``time.time()``), from :attr:`t0`."""
        return time.time() - (time.perf_counter() - self.t0)

    def outbound(self, info: RequestInfo) -> RequestInfo:
        """``info`` (the request as the flow sees it) without the application's own headers
        of the names telemetry writes (its trace context and metadata exchange headers:
        ours replace them on each attempt, :meth:`upstream_headers`). Usually ``info``
        itself: whether a header set has any is memoized per header object (the adapter
        reuses one per distinct header list)."""
        self._authority = info.authority  # the Host header, else the URL's: no URL read later
        self._path = info.path
        tel = self.tel
        headers = info.headers
        found = tel._strip_memo.get(id(headers))
        if found is None or found[0] is not headers:
            names = tel._written
            kept: Headers | None = None
            if names and any(k in names for k, _ in headers):
                kept = lowered_headers(tuple(kv for kv in headers if kv[0] not in names))
            found = (headers, kept)
            if len(tel._strip_memo) > _MAX_LABEL_CACHE:
                tel._strip_memo = {}
            tel._strip_memo[id(headers)] = found
        kept = found[1]
        if kept is None:
            return info
        return RequestInfo(  # positional: dataclasses.replace costs ~3 µs more
            info.method,
            info.authority,
            info.path,
            kept,
            info.scheme,
            info.source_ip,
            info.grpc,
        )

    def upstream_headers(self, cluster: Any) -> tuple[tuple[bytes, bytes], ...]:
        """Telemetry's headers for one HTTP attempt to ``cluster`` (a ``ClusterRuntime``):
        the trace context, then the metadata exchange unless the cluster is outside the
        mesh (:func:`mesh_external`; memoized per cluster config, the hit read here)."""
        config = cluster.config
        found = self.tel._mx_clusters.get(id(config))
        exchange = (
            found[1]
            if found is not None and found[0] is config
            else _exchange_for(self.tel, cluster)
        )
        return self.raw + exchange if exchange else self.raw

    def response(
        self,
        result: CallResult,
        status: int,
        headers: list[tuple[bytes, bytes]],
        stream: Any,
        request_bytes: int,
    ) -> tuple[list[tuple[bytes, bytes]], Any, Callable[[], None]]:
        """An HTTP upstream response, for the application: its headers without the
        server's exchange headers (:meth:`Telemetry.take_exchange`), and the body stream and
        release to hand over (:func:`upstream_body`: counted, recorded at the end)."""
        tel = self.tel
        raw, peer = tel.take_exchange(headers)
        chunks = getattr(stream, "chunks", None)
        if tel._quick and chunks.__class__ is list and self.span is None:
            # The usual end: the body complete with the head, no span, a text line or none.
            # One record of the values at hand, the writer derives the rest; strings and
            # numbers, plus long-lived objects (host, peer): nothing made for this request
            # stays alive in the queue for the collector to scan and promote (records that
            # kept the call and the upstream request made the collector's time most of
            # telemetry's cost).
            pending = tel._pending
            if len(pending) < tel._max_pending:
                flags = result.flags
                if flags or result.attempts > 1:
                    tel.count_attempts(result.cluster, result.attempts, flags)
                sent = result.upstream_request
                pending.append(
                    (
                        self.t0,
                        time.perf_counter(),
                        self.method,
                        self._path,
                        self._authority,
                        status,
                        request_bytes,
                        sum(map(len, chunks)),
                        flags,
                        result.cluster,
                        result.host,
                        peer,
                        sent.headers.pairs if sent is not None else (),
                        tel._log_all or tel._log_this(bool(flags) or status >= 500),
                    )
                )
                return raw, stream, result.release
        stream, release = upstream_body(self, result, status, request_bytes, stream, peer)
        return raw, stream, release

    @property
    def authority(self) -> str:
        """The request's ``:authority`` (read from the httpx request's URL on first use)."""
        value = self._authority
        if value is None:
            value = self._authority = self.request.url.netloc.decode("ascii")
        return value

    @property
    def path(self) -> str:
        """The request's path and query (read from the httpx request's URL on first use)."""
        value = self._path
        if value is None:
            value = self._path = self.request.url.raw_path.decode("ascii")
        return value

    def finish(
        self,
        result: CallResult | None,
        *,
        status: int,
        grpc_status: int | None = None,
        flags: tuple[str, ...] | None = None,
        request_bytes: int = 0,
        response_bytes: int = 0,
        request_messages: int = 0,
        response_messages: int = 0,
        request_id: str | None = None,
        user_agent: str | None = None,
        mtls: bool = False,
        service: str | None = None,
        peer: Workload | None = None,
    ) -> None:
        """Record the finished request (``result``: the flow's, for cluster / host / flags;
        ``service``: the destination host when there is no result, e.g. an upstream error
        surfaced without one; ``peer``: the server's workload from its exchanged metadata,
        see :meth:`Telemetry.peer_of_response`)."""
        tel = self.tel
        duration = time.perf_counter() - self.t0
        if result is not None:
            if flags is None:
                flags = result.flags
            cluster = result.cluster
            host = result.host
            sent = result.upstream_request
            if result.attempts > 1 or flags:
                tel.count_attempts(cluster, result.attempts, flags)
        else:
            if flags is None:
                flags = ()
            cluster = host = sent = None
        span = self.span
        mode = tel.access_log
        log = mode == "full" or (mode == "sampled" and tel._log_this(bool(flags) or status >= 500))
        if span is None and not log and not tel.metrics_enabled:
            return
        upstream = host.key if host is not None else None
        item: Any = None
        if log and tel._text and span is None:  # the writer thread formats the line
            path, authority = self._path, self._authority  # set by outbound() on HTTP
            item = (  # strings, numbers and their tuples: the collector untracks it
                self.start,
                self.method,
                path if path is not None else self.path,
                "HTTP/2" if self.protocol == "grpc" else "HTTP/1.1",
                status,
                ",".join(flags) if flags else "-",
                request_bytes,
                response_bytes,
                int(duration * 1000),
                None,
                None,
                user_agent,
                request_id,
                authority if authority is not None else self.authority,
                upstream,
                # the upstream request's headers: the writer finds the user agent and
                # request id there (only when not given)
                sent.headers.pairs if sent is not None else (),
            )
        elif log or span is not None:
            if request_id is None and sent is not None:
                for name, value in sent.headers:  # one pass for both
                    if name == "x-request-id":
                        request_id = value
                    elif name == "user-agent" and user_agent is None:
                        user_agent = value
            if span is not None:
                _end_span(span, status, grpc_status, flags, cluster, upstream, self, request_id)
            if log and tel._text:
                item = (self.start, self.method, self.path,
                        "HTTP/2" if self.protocol == "grpc" else "HTTP/1.1", status,
                        _flags_text(flags), request_bytes, response_bytes,
                        int(duration * 1000), None, None, user_agent, request_id,
                        self.authority, upstream, ())  # fmt: skip
            elif log:
                item = AccessRecord(
                    start=self.start,
                    method=self.method,
                    path=self.path,
                    protocol="HTTP/2" if self.protocol == "grpc" else "HTTP/1.1",
                    status=status,
                    flags=_flags_text(flags),
                    bytes_received=request_bytes,
                    bytes_sent=response_bytes,
                    duration_ms=int(duration * 1000),
                    authority=self.authority,
                    upstream_host=upstream,
                    upstream_cluster=cluster,
                    request_id=request_id,
                    user_agent=user_agent,
                    grpc_status=grpc_status,
                    reporter="source",
                    trace_id=_trace_id(span),
                )
        # One record: the metrics (label set, series, buckets) and the line are derived
        # from it off the request path (Telemetry._render), drained at every read.
        if item is None and not tel.metrics_enabled:
            return  # a sampled span alone: nothing to count or write
        tel._queue(
            (
                False,
                self.protocol,
                status,
                grpc_status,
                flags,
                cluster if cluster is not None or service is None else f"|||{service}",
                host,
                mtls,
                peer,
                duration,
                request_bytes,
                response_bytes,
                request_messages,
                response_messages,
                item,
            )
        )


class ServerCall:
    """One inbound request in flight (from :meth:`Telemetry.server_call`)."""

    __slots__ = (
        "authority",
        "get_header",
        "method",
        "path",
        "peer",
        "protocol",
        "span",
        "start",
        "t0",
        "tel",
        "token",
    )

    def __init__(  # noqa: PLR0917 - built by Telemetry only
        self,
        tel: Telemetry,
        protocol: str,
        method: str,
        authority: str,
        path: str,
        span: Any,
        token: contextvars.Token[Any] | None,
        get_header: Callable[[str], str | None],
    ) -> None:
        self.tel = tel
        self.protocol = protocol
        self.method = method
        self.authority = authority
        self.path = path
        self.span = span
        self.token = token
        self.get_header = get_header
        self.peer: Workload | None = tel.peer_of_headers(get_header)
        """The caller's workload from its metadata exchange headers (``None``: unknown)."""
        self.start = time.time()
        self.t0 = time.perf_counter()

    def finish(
        self,
        *,
        status: int,
        grpc_status: int | None = None,
        flags: tuple[str, ...] = (),
        peer_uri_sans: Iterable[str] = (),
        mtls: bool = False,
        request_bytes: int = 0,
        response_bytes: int = 0,
        request_messages: int = 0,
        response_messages: int = 0,
    ) -> None:
        """Record the finished request and restore the caller's trace context."""
        tel = self.tel
        duration = time.perf_counter() - self.t0
        if self.token is not None:
            try:
                if _CONTEXT_VAR is not None:
                    _CONTEXT_VAR.reset(self.token)
                else:
                    otel_context.detach(self.token)
            except Exception:  # finished from another context: nothing to restore there
                pass
            self.token = None
        principal = principal_of(peer_uri_sans) if peer_uri_sans else UNKNOWN
        span = self.span
        log = tel.access_log != "off" and tel._log_this(bool(flags) or status >= 500)
        if span is None and not log and not tel.metrics_enabled:
            return
        item: Any = None
        if span is not None or log:
            request_id = self.get_header("x-request-id")
            if span is not None:
                span.set_attribute("peer.principal", principal)
                _end_span(span, status, grpc_status, flags, None, None, self, request_id)
            if log and tel._text:  # queued: the writer thread formats the line
                get = self.get_header
                item = (
                    self.start,
                    self.method,
                    self.path,
                    "HTTP/2" if self.protocol == "grpc" else "HTTP/1.1",
                    status,
                    _flags_text(flags),
                    request_bytes,
                    response_bytes,
                    int(duration * 1000),
                    None,
                    get("x-forwarded-for"),
                    get("user-agent"),
                    request_id,
                    self.authority,
                    None,
                    (),
                )
            elif log:
                item = AccessRecord(
                    start=self.start,
                    method=self.method,
                    path=self.path,
                    protocol="HTTP/2" if self.protocol == "grpc" else "HTTP/1.1",
                    status=status,
                    flags=_flags_text(flags),
                    bytes_received=request_bytes,
                    bytes_sent=response_bytes,
                    duration_ms=int(duration * 1000),
                    authority=self.authority,
                    request_id=request_id,
                    user_agent=self.get_header("user-agent"),
                    forwarded_for=self.get_header("x-forwarded-for"),
                    grpc_status=grpc_status,
                    reporter="destination",
                    trace_id=_trace_id(span),
                )
        if item is None and not tel.metrics_enabled:
            return
        tel._queue(
            (
                True,
                self.protocol,
                status,
                grpc_status,
                flags,
                self.authority,
                principal,
                mtls,
                self.peer,
                duration,
                request_bytes,
                response_bytes,
                request_messages,
                response_messages,
                item,
            )
        )


class _UnsampledSpan(NonRecordingSpan):
    """The current span of an unsampled inbound request: a ``NonRecordingSpan`` whose
    ``SpanContext`` (the caller's trace id, our span id, not sampled) is built when first
    read (an outbound call or an application span continuing the trace), not per request."""

    def __init__(self, trace_id: int, span_id: int) -> None:
        self._ids = (trace_id, span_id)
        self._made: SpanContext | None = None

    @property
    def _context(self) -> SpanContext:  # type: ignore[override]
        return self.get_span_context()

    def get_span_context(self) -> SpanContext:
        made = self._made
        if made is None:
            trace_id, span_id = self._ids
            made = self._made = SpanContext(
                trace_id, span_id, is_remote=False, trace_flags=_NOT_SAMPLED
            )
        return made


def _trace_id(span: Any) -> str | None:
    if span is None:
        return None
    return f"{span.get_span_context().trace_id:032x}"


def _end_span(  # noqa: PLR0917 - internal
    span: Any,
    status: int,
    grpc_status: int | None,
    flags: tuple[str, ...],
    cluster: str | None,
    upstream: str | None,
    call: ClientCall | ServerCall,
    request_id: str | None,
) -> None:
    """Attributes as Istio's Envoy spans carry them, then end the span."""
    attrs: dict[str, Any] = {
        "http.method": call.method,
        "http.url": f"http://{call.authority}{call.path}",
        "http.protocol": "HTTP/2" if call.protocol == "grpc" else "HTTP/1.1",
        "http.status_code": str(status),
        "response_flags": _flags_text(flags),
        "component": "proxy",
        "istio.namespace": call.tel.workload.namespace,
        "istio.canonical_service": call.tel.workload.canonical_service,
        "istio.canonical_revision": call.tel.workload.canonical_revision,
        "node_id": call.tel.workload.workload,
    }
    if request_id:
        attrs["guid:x-request-id"] = request_id
    if cluster is not None:
        attrs["upstream_cluster"] = cluster
        attrs["upstream_cluster.name"] = cluster
    if upstream is not None:
        attrs["upstream_address"] = upstream
    if grpc_status is not None:
        attrs["grpc.status_code"] = str(grpc_status)
    error = status >= 500 or (grpc_status not in (None, 0)) or bool(flags)
    if span.__class__ is _PendingSpan:
        call.tel._queue_span((_SPAN, span, attrs, error, time.time_ns()))
        return
    span.set_attributes(attrs)
    if error:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


_SPAN = object()
"""The first field of a finished pending span's entry in the writer's queue."""


def _flush_at_exit(ref: weakref.ref[Telemetry]) -> None:
    tel = ref()
    if tel is not None:
        tel._writer.flush()


class _PendingSpan:
    """A sampled client span whose ids, parent, name and start are fixed when its request
    starts (the ids go out in the trace headers) and which becomes the SDK's
    ``ReadableSpan`` at its end, on the writer thread (:meth:`Telemetry._export_span`):
    the SDK's span machinery (~100 µs a span among the rest of a request, ~1% of requests)
    off the request path. A client span is never the current span, so nothing needs it
    as an SDK object meanwhile. Span processors see it at ``on_end`` only."""

    __slots__ = ("name", "parent", "span_id", "start_ns", "trace_id")

    def __init__(
        self, trace_id: int, span_id: int, parent: SpanContext | None, name: str, start_ns: int
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.name = name
        self.start_ns = start_ns

    def get_span_context(self) -> SpanContext:
        return SpanContext(self.trace_id, self.span_id, is_remote=False, trace_flags=_SAMPLED)


def _span_output(provider: Any) -> tuple[Any, Any, Any] | None:
    """``(span processor, resource, pymesh's instrumentation scope)`` of an SDK tracer
    provider, for :class:`_PendingSpan`; ``None`` for any other provider, or an SDK
    without the processor attribute this reads."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    processor = getattr(provider, "_active_span_processor", None)
    if not isinstance(provider, TracerProvider) or not hasattr(processor, "on_end"):
        return None
    return processor, provider.resource, InstrumentationScope("pymesh")


def _headers_getter(headers: Mapping[str, str]) -> Callable[[str], str | None]:
    return headers.get


class UpstreamBody:
    """Counts an upstream response body as the application reads it and records the call
    when the body is closed (once), then runs the flow's ``release``. Wraps a sync or
    async byte stream (``close`` / ``aclose`` are forwarded)."""

    __slots__ = ("_call", "_done", "_grpc_status", "_peer", "_release", "_result", "_stream",
                 "request_bytes", "response_bytes", "status")  # fmt: skip

    def __init__(  # noqa: PLR0917 - built by upstream_body only
        self,
        call: ClientCall,
        result: CallResult,
        status: int,
        request_bytes: int,
        stream: Any,
        peer: Workload | None = None,
    ) -> None:
        self._peer = peer
        self._call = call
        self._result = result
        self._release = result.release
        self._stream = stream
        self._done = False
        self._grpc_status: int | None = None
        self.status = status
        self.request_bytes = request_bytes
        self.response_bytes = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self.response_bytes += len(chunk)
            yield chunk

    async def __aiter__(self) -> Any:
        async for chunk in self._stream:
            self.response_bytes += len(chunk)
            yield chunk

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()

    def release(self) -> None:
        """The flow's release, then the record (idempotent)."""
        self._release()
        if self._done:
            return
        self._done = True
        try:
            self._call.finish(
                self._result,
                status=self.status,
                request_bytes=self.request_bytes,
                response_bytes=self.response_bytes,
                peer=self._peer,
            )
        except Exception:  # telemetry must never fail the application's request
            _log.exception("telemetry: recording a request failed")


def http_client_call(info: RequestInfo) -> ClientCall | None:
    """For the httpx adapters: a :class:`ClientCall` of the installed telemetry for a
    request (``info``: the request as the flow sees it; route ``call.info``, which is
    without the application's own trace and exchange headers), or ``None`` when telemetry
    is off: then nothing at all is computed.
    The trace headers are kept in the call as bytes and go on each upstream attempt
    (:meth:`ClientCall.upstream_headers`, with the metadata exchange), as Envoy's router
    injects the trace context per upstream request: never written into the application's
    request (httpx copies every request header again per response for cookies, and the
    adapter memoizes the header conversion on it), nor into the request the flow routes
    (whose memoized header object keeps the flow's per-header-set fast paths)."""
    tel = _current
    if tel is None:
        return None
    call = ClientCall(tel, "http", info.method, info.authority, info.path)
    headers = info.headers
    found = tel._strip_memo.get(id(headers))  # the usual case: a known header set, kept
    call.info = (
        info
        if found is not None and found[0] is headers and found[1] is None
        else call.outbound(info)
    )
    if tel.tracing:
        call.raw = tel._trace_headers(call)
    return call


def _exchange_for(tel: Telemetry, cluster: Any) -> tuple[tuple[bytes, bytes], ...]:
    """``tel``'s metadata exchange headers (``x-envoy-peer-metadata-id``,
    ``x-envoy-peer-metadata``, encoded once) for an HTTP request to ``cluster`` (a
    ``ClusterRuntime``), or ``()``: exchange off, or a destination outside the mesh, as
    Istio's ``peer_metadata`` filter with ``skip_external_clusters`` decides it (see
    :func:`mesh_external`). Memoized per cluster config."""
    if not tel.exchange_headers_raw:
        return ()
    config = cluster.config
    found = tel._mx_clusters.get(id(config))
    if found is None or found[0] is not config:
        model = getattr(config, "cluster", None)
        metadata = getattr(model, "metadata", None)
        headers = () if mesh_external(cluster.name, metadata) else tel.exchange_headers_raw
        found = (config, headers)
        if len(tel._mx_clusters) > _MAX_LABEL_CACHE:
            tel._mx_clusters = {}
        tel._mx_clusters[id(config)] = found
    return found[1]


def mesh_external(cluster_name: str, metadata: Mapping[str, Any] | None) -> bool:
    """Whether a cluster leads outside the mesh (no metadata exchange to it): the
    ``PassthroughCluster``, or ``istio`` filter metadata ``external: true`` (istiod's mark
    for ``MESH_EXTERNAL`` ServiceEntries) or ``disable_mx: true``."""
    if cluster_name == "PassthroughCluster":
        return True
    istio = metadata.get("istio") if metadata else None
    if not isinstance(istio, Mapping):
        return False
    return istio.get("external") is True or istio.get("disable_mx") is True


def _append_to(out: list[tuple[str, str]]) -> Callable[[str, str], None]:
    def add(name: str, value: str) -> None:
        out.append((name, value))

    return add


"""Every header name telemetry writes into a request."""


def finish_local(call: ClientCall, result: CallResult, request_bytes: int) -> None:
    """Record a call the mesh answered itself (a local reply: NR, UH, UO, UT, FI...)."""
    reply = result.local_reply
    try:
        call.finish(
            result,
            status=reply.status if reply is not None else 0,
            request_bytes=request_bytes,
            response_bytes=len(reply.body) if reply is not None else 0,
        )
    except Exception:  # telemetry must never fail the application's request
        _log.exception("telemetry: recording a request failed")


def upstream_body(  # noqa: PLR0917 - the adapters' one call
    call: ClientCall,
    result: CallResult,
    status: int,
    request_bytes: int,
    stream: Any,
    peer: Workload | None = None,
) -> tuple[Any, Callable[[], None]]:
    """``(stream, release)`` to hand the response body: counts it, records at release.

    A body already complete in memory (the HTTP/1.1 engine's ``Done`` stream: a list of
    ``chunks``, read with the head) is recorded at once (its end is now) and handed over as
    it is with the flow's own ``release``: no counting wrapper, so the adapter reads its own
    complete body without its error-translating generator (two generators per request
    saved, async ones costing the event loop's first-iteration hook each), and no
    telemetry object stays alive while the application holds the response."""
    chunks = getattr(stream, "chunks", None)
    if type(chunks) is list:
        try:
            call.finish(
                result,
                status=status,
                request_bytes=request_bytes,
                response_bytes=sum(map(len, chunks)),
                peer=peer,
            )
        except Exception:  # telemetry must never fail the application's request
            _log.exception("telemetry: recording a request failed")
        return stream, result.release
    body = UpstreamBody(call, result, status, request_bytes, stream, peer)
    return body, body.release
