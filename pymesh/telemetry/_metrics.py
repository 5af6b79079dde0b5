"""Istio's request metrics: a cheap in-process table, rendered for Prometheus and OTel.

Why not one ``Counter.add`` per metric per request: the OpenTelemetry SDK hashes and
validates the attribute dict on every measurement, about 30 us for Istio's 25 labels, four
to six times per request. Here a request costs one dict lookup (its label tuple, memoized
by the adapter-side key) and a few integer additions under one lock; the table is turned
into OpenTelemetry points (:meth:`RequestMetrics.otel_metrics`) and Prometheus text
(:func:`render_prometheus`) only when scraped or exported.

Names, types and buckets are Istio's (``istio_requests_total`` counter,
``istio_request_duration_milliseconds`` / ``istio_request_bytes`` /
``istio_response_bytes`` histograms, ``istio_request_messages_total`` /
``istio_response_messages_total`` counters for gRPC).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pymesh.telemetry._labels import LABEL_NAMES

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported when metrics are exported or rendered
    from opentelemetry.sdk.metrics.export import Metric

__all__ = [
    "BYTES_BUCKETS",
    "DURATION_BUCKETS",
    "MAX_SERIES",
    "RequestMetrics",
    "render_prometheus",
]

DURATION_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)  # fmt: skip
"""Istio's ``istio_request_duration_milliseconds`` bucket bounds (ms)."""

BYTES_BUCKETS: tuple[float, ...] = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)
"""Istio's ``istio_request_bytes`` / ``istio_response_bytes`` bucket bounds."""

MAX_SERIES = 10000
"""Label sets kept at most; further new label sets are counted in ``overflow`` (bounded)."""


class _Series:
    __slots__ = (
        "dur_buckets",
        "dur_sum",
        "grpc",
        "req_buckets",
        "req_msgs",
        "req_sum",
        "requests",
        "resp_buckets",
        "resp_msgs",
        "resp_sum",
    )

    def __init__(self, grpc: bool) -> None:
        self.grpc = grpc
        self.requests = 0
        self.dur_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.dur_sum = 0.0
        self.req_buckets = [0] * (len(BYTES_BUCKETS) + 1)
        self.req_sum = 0
        self.resp_buckets = [0] * (len(BYTES_BUCKETS) + 1)
        self.resp_sum = 0
        self.req_msgs = 0
        self.resp_msgs = 0


class RequestMetrics:
    """The request table: label tuple (:data:`LABEL_NAMES` order) -> counts."""

    def __init__(self, drain: Callable[[], None] | None = None) -> None:
        self._drain = drain
        """Called before every read (:meth:`snapshot`): counts the requests still queued
        (the telemetry's records, counted off the request path)."""
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}
        self._start_ns = time.time_ns()
        self.overflow = 0

    def bind(self, labels: tuple[str, ...]) -> _Series | None:
        """The series of ``labels`` (created empty if new), to :meth:`add` to later: the
        adapters' label memo keeps it, so a request makes no label lookup here. ``None``
        when the table is full (:data:`MAX_SERIES`; counted in ``overflow``)."""
        with self._lock:
            s = self._series.get(labels)
            if s is None:
                if len(self._series) >= MAX_SERIES:
                    self.overflow += 1
                    return None
                s = self._series[labels] = _Series(labels[20] == "grpc")
            return s

    def record(  # noqa: PLR0917 - kept for callers holding labels only
        self,
        labels: tuple[str, ...],
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
        request_messages: int = 0,
        response_messages: int = 0,
    ) -> None:
        """Count one finished request by its labels (:meth:`bind` then :meth:`add`)."""
        s = self.bind(labels)
        if s is not None:
            self.add(s, duration_ms, request_bytes, response_bytes, request_messages,
                     response_messages)  # fmt: skip

    def add(  # noqa: PLR0917 - one request's values
        self,
        s: _Series,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
        request_messages: int = 0,
        response_messages: int = 0,
    ) -> None:
        """Count one finished request into a bound series (a few additions under a lock)."""
        self.add_many(
            ((s, duration_ms, request_bytes, response_bytes, request_messages, response_messages),)
        )

    def add_many(self, counted: Iterable[tuple[_Series, float, int, int, int, int]]) -> None:
        """:meth:`add` for a batch of ``(series, duration ms, request bytes, response
        bytes, request messages, response messages)``, under one lock (the telemetry
        writer's drain)."""
        dur_b, bytes_b, find = DURATION_BUCKETS, BYTES_BUCKETS, bisect.bisect_left
        with self._lock:
            for s, duration_ms, request_bytes, response_bytes, qm, rm in counted:
                s.requests += 1
                s.dur_buckets[find(dur_b, duration_ms)] += 1
                s.dur_sum += duration_ms
                s.req_buckets[find(bytes_b, request_bytes)] += 1
                s.req_sum += request_bytes
                s.resp_buckets[find(bytes_b, response_bytes)] += 1
                s.resp_sum += response_bytes
                s.req_msgs += qm
                s.resp_msgs += rm

    def snapshot(self) -> list[tuple[tuple[str, ...], _Series]]:
        """A consistent copy of the table (taken under the lock)."""
        if self._drain is not None:
            self._drain()
        out: list[tuple[tuple[str, ...], _Series]] = []
        with self._lock:
            for labels, s in self._series.items():
                c = _Series(s.grpc)
                c.requests = s.requests
                c.dur_buckets = list(s.dur_buckets)
                c.dur_sum = s.dur_sum
                c.req_buckets = list(s.req_buckets)
                c.req_sum = s.req_sum
                c.resp_buckets = list(s.resp_buckets)
                c.resp_sum = s.resp_sum
                c.req_msgs = s.req_msgs
                c.resp_msgs = s.resp_msgs
                out.append((labels, c))
        return out

    def otel_metrics(self) -> list[Metric]:
        """The table as OpenTelemetry cumulative points (for OTLP and any SDK exporter)."""
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Histogram,
            HistogramDataPoint,
            Metric,
            NumberDataPoint,
            Sum,
        )

        now = time.time_ns()
        start = self._start_ns
        rows = self.snapshot()

        def attrs(labels: tuple[str, ...]) -> dict[str, Any]:
            return dict(zip(LABEL_NAMES, labels, strict=True))

        def counter(name: str, pick: Any, grpc_only: bool = False) -> Metric:
            points = [
                NumberDataPoint(attrs(lab), start, now, pick(s))
                for lab, s in rows
                if s.grpc or not grpc_only
            ]
            return Metric(name, None, None, Sum(points, AggregationTemporality.CUMULATIVE, True))

        def histogram(name: str, bounds: Sequence[float], pick: Any, unit: str) -> Metric:
            points = []
            for lab, s in rows:
                buckets, total = pick(s)
                points.append(
                    HistogramDataPoint(
                        attrs(lab),
                        start,
                        now,
                        s.requests,
                        total,
                        list(buckets),
                        list(bounds),
                        0.0,
                        0.0,
                    )
                )
            return Metric(name, None, unit, Histogram(points, AggregationTemporality.CUMULATIVE))

        return [
            counter("istio_requests_total", lambda s: s.requests),
            histogram(
                "istio_request_duration_milliseconds",
                DURATION_BUCKETS,
                lambda s: (s.dur_buckets, s.dur_sum),
                "ms",
            ),
            histogram(
                "istio_request_bytes", BYTES_BUCKETS, lambda s: (s.req_buckets, s.req_sum), "By"
            ),
            histogram(
                "istio_response_bytes",
                BYTES_BUCKETS,
                lambda s: (s.resp_buckets, s.resp_sum),
                "By",
            ),
            counter("istio_request_messages_total", lambda s: s.req_msgs, grpc_only=True),
            counter("istio_response_messages_total", lambda s: s.resp_msgs, grpc_only=True),
        ]


# --------------------------------------------------------------------------- Prometheus


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels_text(attributes: Iterable[tuple[str, Any]], extra: str = "") -> str:
    parts = [f'{k}="{_escape(str(v))}"' for k, v in attributes]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value == float("inf"):
        return "+Inf"
    if value.is_integer():
        return str(int(value))
    return repr(value)


def render_prometheus(metrics: Iterable[Metric]) -> str:
    """Prometheus text exposition (format 0.0.4) of OpenTelemetry metrics.

    Monotonic sums are counters (``_total`` is appended unless the name has it), gauges and
    non-monotonic sums are gauges, histograms get ``_bucket`` (cumulative, with ``le``),
    ``_sum`` and ``_count``. Names are used as given (Istio's are already Prometheus names).
    """
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

    out: list[str] = []
    for metric in metrics:
        data = metric.data
        name = metric.name
        if not data.data_points:
            continue  # nothing to say yet: no TYPE line for an empty family
        if isinstance(data, Sum) and data.is_monotonic:
            if not name.endswith("_total"):
                name += "_total"
            out.append(f"# TYPE {name} counter")
            for p in data.data_points:
                out.append(f"{name}{_labels_text((p.attributes or {}).items())} {_num(p.value)}")
        elif isinstance(data, (Sum, Gauge)):
            out.append(f"# TYPE {name} gauge")
            for p in data.data_points:
                out.append(f"{name}{_labels_text((p.attributes or {}).items())} {_num(p.value)}")
        elif isinstance(data, Histogram):
            out.append(f"# TYPE {name} histogram")
            for h in data.data_points:
                items = list((h.attributes or {}).items())
                running = 0
                for bound, n in zip(
                    [*h.explicit_bounds, float("inf")], h.bucket_counts, strict=True
                ):
                    running += n
                    le = 'le="' + _num(bound) + '"'
                    out.append(f"{name}_bucket{_labels_text(items, le)} {running}")
                out.append(f"{name}_sum{_labels_text(items)} {_num(h.sum)}")
                out.append(f"{name}_count{_labels_text(items)} {h.count}")
    return "\n".join(out) + "\n" if out else ""
