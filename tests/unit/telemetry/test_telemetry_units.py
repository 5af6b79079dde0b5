"""Table tests of the pure parts: trace header parsing/writing, label derivation, the
Prometheus renderer, access log formats, environment configuration, the public surface."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from opentelemetry.trace import SpanContext, TraceFlags

from pymesh import telemetry
from pymesh.errors import ConfigError
from pymesh.telemetry._labels import PeerWorkload, Workload, service_of_cluster
from pymesh.telemetry._metrics import RequestMetrics

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def _get(headers: dict[str, str]) -> Any:
    return headers.get


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"traceparent": f"00-{TRACE}-{SPAN}-01"}, (TRACE, SPAN, True)),
        ({"traceparent": f"00-{TRACE}-{SPAN}-00"}, (TRACE, SPAN, False)),
        ({"b3": f"{TRACE}-{SPAN}-1"}, (TRACE, SPAN, True)),
        ({"b3": f"{TRACE}-{SPAN}-0-{SPAN}"}, (TRACE, SPAN, False)),
        ({"b3": f"{TRACE[16:]}-{SPAN}-d"}, ("0" * 16 + TRACE[16:], SPAN, True)),  # 64-bit id
        ({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "1"}, (TRACE, SPAN, True)),
        ({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-flags": "1"}, (TRACE, SPAN, True)),
        ({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN}, (TRACE, SPAN, False)),
        # W3C wins over B3 when both are present
        (
            {"traceparent": f"00-{TRACE}-{SPAN}-01", "b3": f"{'1' * 32}-{SPAN}-0"},
            (TRACE, SPAN, True),
        ),
        # invalid W3C falls back to B3
        ({"traceparent": "00-zz-yy-01", "b3": f"{TRACE}-{SPAN}-1"}, (TRACE, SPAN, True)),
    ],
)
def test_extract(headers: dict[str, str], expected: tuple[str, str, bool]) -> None:
    ctx = telemetry.extract(_get(headers))
    assert ctx is not None
    assert (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", ctx.trace_flags.sampled) == expected
    assert ctx.is_remote


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},  # all-zero trace id
        {"traceparent": f"ff-{TRACE}-{SPAN}-01"},  # forbidden version
        {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},  # version 00 has 4 fields
        {"traceparent": f"00-{TRACE[:-1]}-{SPAN}-01"},
        {"b3": "1"},  # a sampling decision alone
        {"x-b3-traceid": TRACE},
        {"x-b3-traceid": "xyz", "x-b3-spanid": SPAN},
    ],
)
def test_extract_rejects(headers: dict[str, str]) -> None:
    assert telemetry.extract(_get(headers)) is None


def test_inject_every_format() -> None:
    out: dict[str, str] = {}
    ctx = SpanContext(int(TRACE, 16), int(SPAN, 16), False, TraceFlags(1))
    telemetry.inject(ctx, out.__setitem__, frozenset({"tracecontext", "b3multi", "b3"}))
    assert out == {
        "traceparent": f"00-{TRACE}-{SPAN}-01",
        "x-b3-traceid": TRACE,
        "x-b3-spanid": SPAN,
        "x-b3-sampled": "1",
        "b3": f"{TRACE}-{SPAN}-1",
    }
    # and what we write, we read back
    assert telemetry.extract(_get({"b3": out["b3"]})) == telemetry.extract(
        _get({"traceparent": out["traceparent"]})
    )


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        ("outbound|9080|v1|reviews.default.svc.cluster.local",
         ("reviews.default.svc.cluster.local", "reviews", "default")),
        ("outbound|443||api.example.com", ("api.example.com", "api.example.com", "unknown")),
        ("inbound|8080||", ("inbound|8080||", "inbound|8080||", "unknown")),
        (None, ("unknown", "unknown", "unknown")),
    ],
)  # fmt: skip
def test_service_of_cluster(cluster: str | None, expected: tuple[str, str, str]) -> None:
    assert service_of_cluster(cluster) == expected


def test_workloads_from_node_and_endpoint_metadata() -> None:
    w = Workload.from_node(
        workload="reviews-v2",
        namespace="shop",
        labels={"app": "reviews", "version": "v2"},
        cluster_id="Kubernetes",
    )
    assert w.values() == ("reviews-v2", "reviews", "v2", "shop", "reviews", "v2", "Kubernetes")
    canonical = Workload.from_node(
        workload="w",
        namespace="ns",
        labels={"service.istio.io/canonical-name": "svc", "app": "a"},
        cluster_id="",
    )
    assert (canonical.canonical_service, canonical.canonical_revision) == ("svc", "latest")
    empty = Workload.from_node(workload="", namespace="", labels={}, cluster_id="")
    assert empty == Workload(canonical_revision="latest")  # Istio's default revision
    # Istio's EDS endpoint metadata: "name;namespace;canonical;revision;cluster"
    peer = PeerWorkload.from_metadata({"istio": {"workload": "ratings-v1;default;ratings;v1;K"}})
    assert peer.values() == ("ratings-v1", "ratings", "v1", "default", "ratings", "v1", "K")
    assert PeerWorkload.from_metadata(None) == Workload()
    assert PeerWorkload.from_metadata({"envoy.lb": {}}) == Workload()


def _labels(**over: str) -> tuple[str, ...]:
    base = dict.fromkeys(telemetry.LABEL_NAMES, "unknown")
    base |= {"reporter": "source", "request_protocol": "http", "response_code": "200"}
    base |= over
    return tuple(base[n] for n in telemetry.LABEL_NAMES)


def test_prometheus_rendering_exact() -> None:
    table = RequestMetrics()
    table.record(_labels(), 0.3, 0, 120)
    table.record(_labels(), 7.0, 5, 120)
    table.record(_labels(response_code="503", response_flags="UO"), 1.0, 0, 81)
    text = telemetry.render_prometheus(table.otel_metrics())
    lines = text.splitlines()
    assert "# TYPE istio_requests_total counter" in lines
    assert "# TYPE istio_request_duration_milliseconds histogram" in lines
    assert "istio_request_messages_total" not in text  # gRPC only
    ok = [
        ln for ln in lines if ln.startswith("istio_requests_total{") and 'response_code="200"' in ln
    ]
    assert len(ok) == 1 and ok[0].endswith(" 2")
    assert ok[0].startswith('istio_requests_total{reporter="source",source_workload="unknown",')
    buckets = [
        ln for ln in lines
        if ln.startswith("istio_request_duration_milliseconds_bucket") and 'code="200"' in ln
    ]  # fmt: skip
    les = [ln.split('le="')[1].split('"')[0] for ln in buckets]
    assert les == [*(telemetry._metrics._num(b) for b in telemetry.DURATION_BUCKETS), "+Inf"]
    counts = [int(ln.rsplit(" ", 1)[1]) for ln in buckets]
    assert counts[:4] == [1, 1, 1, 2]  # 0.3 <= 0.5; 7.0 <= 10 (cumulative)
    assert counts[-1] == 2
    assert any(
        ln.startswith("istio_request_duration_milliseconds_sum{") and ln.endswith(" 7.3")
        for ln in lines
    )


def test_label_values_are_escaped() -> None:
    table = RequestMetrics()
    table.record(_labels(destination_service='a"b\\c\nd'), 1.0, 0, 0)
    text = telemetry.render_prometheus(table.otel_metrics())
    assert 'destination_service="a\\"b\\\\c\\nd"' in text


def test_series_are_bounded() -> None:
    table = RequestMetrics()
    for i in range(telemetry._metrics.MAX_SERIES + 5):
        table.record(_labels(response_code=str(i)), 1.0, 0, 0)
    assert len(table.snapshot()) == telemetry._metrics.MAX_SERIES
    assert table.overflow == 5


RECORD = telemetry.AccessRecord(
    start=1700000000.25,
    method="GET",
    path="/reviews/0",
    protocol="HTTP/1.1",
    status=503,
    flags="UO",
    bytes_received=0,
    bytes_sent=81,
    duration_ms=3,
    authority="reviews:9080",
    upstream_host=None,
    upstream_cluster="outbound|9080||reviews.default.svc.cluster.local",
    request_id="req-1",
    user_agent="python-httpx/0.28",
)


def test_access_log_text_is_envoys_default_format() -> None:
    assert telemetry.format_text(RECORD) == (
        '[2023-11-14T22:13:20.250Z] "GET /reviews/0 HTTP/1.1" 503 UO 0 81 3 - "-" '
        '"python-httpx/0.28" "req-1" "reviews:9080" "-"'
    )


def test_access_log_json() -> None:
    doc = json.loads(telemetry.format_json(RECORD))
    assert doc["start_time"] == "2023-11-14T22:13:20.250Z"
    assert (doc["response_code"], doc["response_flags"], doc["bytes_sent"]) == (503, "UO", 81)
    assert doc["upstream_cluster"] == "outbound|9080||reviews.default.svc.cluster.local"
    assert doc["upstream_host"] is None


def test_sampled_access_log_keeps_flagged_requests() -> None:
    lines: list[str] = []
    tel = telemetry.Telemetry(
        access_log="sampled", access_log_sample=0.0, access_log_sink=lines.append,
        rng=random.Random(1),
    )  # fmt: skip
    try:
        for status, flags in ((200, ()), (200, ()), (503, ("UO",)), (502, ())):
            call = tel.client_call(
                protocol="http", method="GET", authority="a", path="/", set_header=lambda k, v: None
            )
            call.finish(None, status=status, flags=flags)
        tel.flush_access_log()
        assert [ln.split('" ')[1].split(" ")[:2] for ln in lines] == [["503", "UO"], ["502", "-"]]
    finally:
        tel.close()


def test_configure_from_env() -> None:
    assert telemetry.configure_from_env(env={}) is None
    tel = telemetry.configure_from_env(
        env={
            "PYMESH_TELEMETRY": "on",
            "PYMESH_PROMETHEUS_ADDRESS": "off",
            "PYMESH_ACCESS_LOG": "full",
            "PYMESH_ACCESS_LOG_FORMAT": "json",
            "PYMESH_TRACE_SAMPLING": "100",
            "PYMESH_TRACE_PROPAGATION": "b3multi",
        }
    )
    try:
        assert tel is not None and telemetry.current() is tel
        assert tel.access_log == "full"
        assert tel.propagation == frozenset({"b3multi"})
    finally:
        assert tel is not None
        tel.close()
    assert telemetry.current() is None
    with pytest.raises(ConfigError, match="PYMESH_ACCESS_LOG"):
        telemetry.configure_from_env(env={"PYMESH_TELEMETRY": "on", "PYMESH_ACCESS_LOG": "x"})
    with pytest.raises(ConfigError, match="PYMESH_TRACE_SAMPLING"):
        telemetry.configure_from_env(env={"PYMESH_TELEMETRY": "on", "PYMESH_TRACE_SAMPLING": "x"})
    with pytest.raises(ConfigError, match="percentage"):
        telemetry.configure_from_env(env={"PYMESH_TELEMETRY": "on", "PYMESH_TRACE_SAMPLING": "101"})


def test_access_log_file_is_written_a_batch_at_a_time(tmp_path: Any, capsys: Any) -> None:
    """``access_log_file`` (Istio's ``accessLogFile``): lines appended to the file in order,
    one write a drain; ``/dev/stdout`` follows ``sys.stdout``; a path that cannot be opened
    is an error naming it (in the environment: naming the variable); a file and a sink
    together are refused."""
    path = tmp_path / "access.log"
    path.write_text("earlier\n")
    tel = telemetry.Telemetry(access_log="full", access_log_file=path, tracing=False)
    try:
        for status in (200, 503):
            call = tel.client_call(
                protocol="http", method="GET", authority="a", path="/", set_header=lambda k, v: None
            )
            call.finish(None, status=status, service="a")
        tel.flush_access_log()
        lines = path.read_text().splitlines()
        assert lines[0] == "earlier" and len(lines) == 3
        assert [ln.split('" ')[1].split(" ")[0] for ln in lines[1:]] == ["200", "503"]
    finally:
        tel.close()
    out = telemetry.Telemetry(access_log="full", access_log_file="/dev/stdout", tracing=False)
    try:
        call = out.client_call(
            protocol="http", method="GET", authority="a", path="/x", set_header=lambda k, v: None
        )
        call.finish(None, status=200, service="a")
        out.flush_access_log()
        assert '"GET /x HTTP/1.1" 200' in capsys.readouterr().out
    finally:
        out.close()
    missing = tmp_path / "no" / "such" / "dir" / "access.log"
    with pytest.raises(ValueError, match=f"access log file {missing}"):
        telemetry.Telemetry(access_log="full", access_log_file=missing)
    with pytest.raises(ValueError, match="not both"):
        telemetry.Telemetry(access_log_file=path, access_log_sink=print)
    with pytest.raises(ConfigError, match="PYMESH_ACCESS_LOG_FILE"):
        telemetry.configure_from_env(
            env={"PYMESH_TELEMETRY": "on", "PYMESH_ACCESS_LOG_FILE": str(missing)}
        )
    tel = telemetry.configure_from_env(
        env={
            "PYMESH_TELEMETRY": "on",
            "PYMESH_PROMETHEUS_ADDRESS": "off",
            "PYMESH_ACCESS_LOG": "full",
            "PYMESH_ACCESS_LOG_FILE": str(path),
        }
    )
    assert tel is not None
    try:
        call = tel.client_call(
            protocol="http", method="GET", authority="a", path="/env", set_header=lambda k, v: None
        )
        call.finish(None, status=200, service="a")
        tel.flush_access_log()
        assert '"GET /env HTTP/1.1" 200' in path.read_text().splitlines()[-1]
    finally:
        tel.close()


def test_public_surface_is_pinned() -> None:
    assert sorted(telemetry.__all__) == sorted(
        [
            "BYTES_BUCKETS", "DURATION_BUCKETS", "LABEL_NAMES", "UNKNOWN", "AccessLogMode",
            "AccessRecord", "ClientCall", "PrometheusServer", "ServerCall", "Telemetry",
            "asgi_middleware",
            "configure_from_env", "current", "extract", "format_json", "format_text", "inject",
            "install", "render_prometheus", "uninstall",
        ]
    )  # fmt: skip
    assert len(telemetry.LABEL_NAMES) == 25


def test_export_metrics_through_an_sdk_exporter() -> None:
    import io

    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

    out = io.StringIO()
    tel = telemetry.Telemetry()
    call = tel.client_call(
        protocol="grpc", method="POST", authority="a:1", path="/s/M", set_header=lambda k, v: None
    )
    call.finish(None, status=200, grpc_status=0, request_messages=1, response_messages=1)
    tel.export_metrics(ConsoleMetricExporter(out=out), interval=3600)
    tel.close()  # one last export at close
    doc = json.loads(out.getvalue())
    names = [m["name"] for sm in doc["resource_metrics"][0]["scope_metrics"] for m in sm["metrics"]]
    assert names[:6] == [
        "istio_requests_total",
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
        "istio_request_messages_total",
        "istio_response_messages_total",
    ]
    point = doc["resource_metrics"][0]["scope_metrics"][0]["metrics"][0]["data"]["data_points"][0]
    assert point["value"] == 1
    assert point["attributes"]["request_protocol"] == "grpc"
    assert point["attributes"]["grpc_response_status"] == "0"


def test_certificate_expiry_from_a_provider() -> None:
    from pymesh.security import CertificateBundle, StaticProvider

    provider = StaticProvider()
    tel = telemetry.Telemetry()
    try:
        tel.watch_certificate_provider(provider, "default")
        assert "pymesh_certificate_expiry_seconds" not in tel.prometheus_text()  # none yet
        provider.update(CertificateBundle(b"chain", b"key", b"roots", not_after=1900000000.0))
        lines = [
            ln
            for ln in tel.prometheus_text().splitlines()
            if ln.startswith("pymesh_certificate_expiry_seconds")
        ]
        assert lines == ['pymesh_certificate_expiry_seconds{name="default"} 1900000000']
    finally:
        tel.close()
        provider.close()


def test_only_the_telemetry_module_imports_opentelemetry() -> None:
    import ast
    from pathlib import Path

    root = Path(telemetry.__file__).parent.parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "telemetry":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] == "opentelemetry" for n in names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_configure_from_env_names_the_workload_from_the_bootstrap() -> None:
    from pymesh.bootstrap import generate_bootstrap

    data = generate_bootstrap(
        namespace="shop", workload="reviews-v2", labels={"app": "reviews", "version": "v2"}
    )
    tel = telemetry.configure_from_env(
        env={
            "PYMESH_TELEMETRY": "on",
            "PYMESH_PROMETHEUS_ADDRESS": "127.0.0.1:0",
            "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(data),
        }
    )
    assert tel is not None
    try:
        assert (tel.workload.workload, tel.workload.namespace, tel.workload.app) == (
            "reviews-v2",
            "shop",
            "reviews",
        )
        assert tel.identity == "spiffe://cluster.local/ns/shop/sa/default"
        assert "istio_requests_total" not in tel.prometheus_text()
    finally:
        tel.close()


def _lines(batch: list[object]) -> list[str]:
    """A writer's renderer: one line per queued item."""
    return [str(item) for item in batch]


def test_access_log_writer_thread_flushes_drops_and_closes() -> None:
    import threading

    from pymesh.telemetry._accesslog import AccessLogWriter

    lines: list[str] = []
    writer = AccessLogWriter(_lines, lines.append, interval=60, max_pending=3)
    for i in range(5):  # the queue holds 3: two dropped, never blocking
        writer.put(i)
    assert writer.dropped == 2 and lines == []  # nothing formatted on the request path
    writer.close()  # flushes what is queued, stops the thread
    assert lines == ["0", "1", "2"]
    assert writer._thread is not None and not writer._thread.is_alive()

    written = threading.Event()

    def sink(line: str) -> None:
        lines.append(line)
        written.set()

    timed = AccessLogWriter(_lines, sink, interval=0.01)
    timed.put("by the thread")
    assert written.wait(10), "the writer thread wrote nothing"
    assert lines[-1] == "by the thread"
    timed.close()


def test_access_log_sink_failure_does_not_stop_the_writer() -> None:
    from pymesh.telemetry._accesslog import AccessLogWriter

    lines: list[str] = []

    def sink(line: str) -> None:
        if line == "bad":
            raise RuntimeError("sink down")
        lines.append(line)

    writer = AccessLogWriter(_lines, sink, interval=60)
    for item in ("a", "bad", "b"):
        writer.put(item)
    writer.flush()
    assert lines == ["a", "b"]
    writer.close()


def test_access_log_bad_record_loses_only_its_own_line() -> None:
    """The writer renders a batch in one call; a record that breaks it is dropped alone
    (logged), the others of the batch are still rendered, in order."""
    from pymesh.telemetry._accesslog import AccessLogWriter

    lines: list[str] = []

    def render(batch: list[object]) -> list[str]:
        if "bad" in batch:
            raise ValueError("a bad record")
        return _lines(batch)

    writer = AccessLogWriter(render, lines.append, interval=60)
    for item in ("a", "bad", "b"):
        writer.put(item)
    writer.flush()
    assert lines == ["a", "b"]
    writer.put("c")
    writer.close()
    assert lines == ["a", "b", "c"]


def test_access_log_sink_that_reads_metrics_continues_the_flush() -> None:
    """A sink that reads metrics drains the queue (a re-entrant flush): no deadlock, every
    line written once, in order."""
    import threading

    from pymesh.telemetry._accesslog import AccessLogWriter

    lines: list[str] = []
    writer: AccessLogWriter

    def sink(line: str) -> None:
        lines.append(line)
        if line == "b":
            writer.flush()  # what a metrics read does first

    writer = AccessLogWriter(_lines, sink, interval=60)
    for item in ("a", "b", "c", "d"):
        writer.put(item)
    done = threading.Thread(target=writer.flush, daemon=True)
    done.start()
    done.join(10)
    assert not done.is_alive(), "the flush deadlocked"
    assert lines == ["a", "b", "c", "d"]
    writer.close()


def test_unsampled_trace_headers_and_mesh_external() -> None:
    from pymesh.telemetry._propagation import extract_ids, unsampled_headers
    from pymesh.telemetry._telemetry import mesh_external

    ids = "0af7651916cd43dd8448eb211c80319c" + "b7ad6b7169203331"
    out = {k.decode(): v.decode() for k, v in unsampled_headers(ids, (True, True, True))}
    assert out["traceparent"] == f"00-{ids[:32]}-{ids[32:]}-00"
    assert out["b3"] == f"{ids[:32]}-{ids[32:]}-0"
    assert (out["x-b3-traceid"], out["x-b3-spanid"], out["x-b3-sampled"]) == (
        ids[:32], ids[32:], "0",
    )  # fmt: skip
    assert extract_ids(out.get) == (int(ids[:32], 16), int(ids[32:], 16), False)
    assert [k for k, _ in unsampled_headers(ids, (True, False, False))] == [b"traceparent"]
    assert unsampled_headers(ids, (True, False, True)) == (
        (b"traceparent", f"00-{ids[:32]}-{ids[32:]}-00".encode()),
        (b"b3", f"{ids[:32]}-{ids[32:]}-0".encode()),
    )
    # Istio's peer_metadata filter (skip_external_clusters): no exchange outside the mesh
    assert mesh_external("PassthroughCluster", None)
    assert mesh_external("outbound|443||api.example.com", {"istio": {"external": True}})
    assert mesh_external("outbound|80||x", {"istio": {"disable_mx": True}})
    assert not mesh_external("outbound|80||x", {"istio": {"external": False}})
    assert not mesh_external("outbound|9080||reviews.default.svc.cluster.local", {})


def test_client_trace_ids_are_fresh_and_follow_the_current_trace() -> None:
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    tel = telemetry.Telemetry(trace_sampling=0.0, rng=random.Random(7))
    try:
        seen: list[dict[str, str]] = []
        for _ in range(2):
            got: dict[str, str] = {}
            tel.client_call(
                protocol="http", method="GET", authority="a", path="/", set_header=got.__setitem__
            )
            seen.append(got)
        first, second = (h["traceparent"].split("-") for h in seen)
        assert first[3] == second[3] == "00" and first[1] != second[1]
        assert int(first[1], 16) and int(first[2], 16)
        parent = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(0))
        token = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
        try:
            got = {}
            tel.client_call(
                protocol="http", method="GET", authority="a", path="/", set_header=got.__setitem__
            )
        finally:
            otel_context.detach(token)
        parts = got["traceparent"].split("-")
        assert (parts[1], parts[3]) == (f"{0xABC:032x}", "00") and parts[2] != f"{0xDEF:016x}"
    finally:
        tel.close()


def test_new_traces_are_decided_in_batches_and_forgotten_by_a_forked_child() -> None:
    """Outbound requests with no current span pop a decided trace (sampled or not, ids
    ready): every id distinct, the sampled share as configured; a forked child drops the
    parent's undrawn ids and reseeds the default random source, so pre-fork workers never
    repeat their parent's trace ids."""
    from pymesh.telemetry import _telemetry

    tel = telemetry.Telemetry(trace_sampling=10.0)  # 10%
    try:
        ids: list[str] = []
        sampled = 0
        for _ in range(2000):
            got: dict[str, str] = {}
            call = tel.client_call(
                protocol="http", method="GET", authority="a", path="/", set_header=got.__setitem__
            )
            if call.span is not None:
                sampled += 1
                call.finish(None, status=200)
            parts = got["traceparent"].split("-")
            assert got["b3"] == f"{parts[1]}-{parts[2]}-{'1' if call.span else '0'}"
            ids.append(parts[1])
        assert len(set(ids)) == 2000
        assert 120 <= sampled <= 290  # 200 expected; 5 standard deviations either side
        left = list(tel._draws)
        assert left  # a batch in progress
        assert tel._quick  # the first record started the writer thread: quick records
        state = tel._rng.getstate()
        _telemetry._after_fork_in_child()
        assert tel._draws == [] and tel._rng.getstate() != state
        assert not tel._quick  # the child's first record starts its own writer first
    finally:
        tel.close()


def test_sampled_client_spans_are_made_at_their_end_on_the_writer() -> None:
    """With an SDK provider, a sampled client span's ids, parent and start are fixed when
    the request starts (and sent in its headers); the SDK span is made when the writer
    drains: one CLIENT span with those ids, its parent (the current server span), Istio's
    attributes and an error status for a 5xx. Any other provider gets its spans through
    its own tracer."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from pymesh.telemetry import _telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tel = telemetry.Telemetry(trace_sampling=100.0, tracer_provider=provider)
    tel._writer._interval = 3600.0  # drained by the flush below only
    try:
        server = tel.server_call(
            protocol="http", method="GET", authority="a", path="/in", get_header={}.get
        )
        got: dict[str, str] = {}
        call = tel.client_call(
            protocol="http", method="GET", authority="b:80", path="/x?q=1",
            set_header=got.__setitem__,
        )  # fmt: skip
        assert isinstance(call.span, _telemetry._PendingSpan)
        call.finish(None, status=503, service="b")
        server.finish(status=200)
        assert [s.kind for s in exporter.get_finished_spans()] == [SpanKind.SERVER]
        tel.flush_access_log()
        client = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
        assert len(client) == 1
        span = client[0]
        (server_span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
        _, trace_id, span_id, flags = got["traceparent"].split("-")
        assert flags == "01"
        assert (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}") == (
            trace_id,
            span_id,
        )
        assert span.parent is not None
        assert span.parent.span_id == server_span.context.span_id
        assert span.context.trace_id == server_span.context.trace_id
        assert span.name == "b:80/x"
        assert span.attributes["http.status_code"] == "503"
        assert span.attributes["component"] == "proxy"
        assert span.status.status_code == StatusCode.ERROR
        assert span.start_time <= span.end_time
        assert span.instrumentation_scope.name == "pymesh"
        tel._writer._max = tel._max_pending = 0  # a full queue: exported at once, not lost
        call = tel.client_call(
            protocol="http", method="GET", authority="b:80", path="/full",
            set_header=lambda k, v: None,
        )  # fmt: skip
        call.finish(None, status=200, service="b")
        assert exporter.get_finished_spans()[-1].name == "b:80/full"
    finally:
        tel.close()
    other = telemetry.Telemetry(trace_sampling=100.0, tracer_provider=trace.NoOpTracerProvider())
    try:
        call = other.client_call(
            protocol="http", method="GET", authority="b", path="/", set_header=lambda k, v: None
        )
        assert not isinstance(call.span, _telemetry._PendingSpan)
        call.finish(None, status=200, service="b")
    finally:
        other.close()


def test_pending_client_spans_are_exported_at_interpreter_exit(tmp_path: Any) -> None:
    """A client span still waiting for the writer when the interpreter exits reaches the
    exporter: pymesh's exit hook runs before the provider's shutdown."""
    import subprocess
    import sys

    script = tmp_path / "exit_span.py"
    script.write_text(
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import (\n"
        "    BatchSpanProcessor, SpanExporter, SpanExportResult)\n"
        "from pymesh import telemetry\n"
        "class Print(SpanExporter):\n"
        "    def export(self, spans):\n"
        "        for s in spans:\n"
        "            print('EXPORTED', s.name, flush=True)\n"
        "        return SpanExportResult.SUCCESS\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(BatchSpanProcessor(Print()))\n"
        "tel = telemetry.Telemetry(trace_sampling=100.0, tracer_provider=provider)\n"
        "tel._writer._interval = 3600.0\n"
        "call = tel.client_call(protocol='http', method='GET', authority='b', path='/exit',\n"
        "                       set_header=lambda k, v: None)\n"
        "call.finish(None, status=200, service='b')\n"
        "print('END', flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["END", "EXPORTED b/exit"], (out.stdout, out.stderr)


def test_a_drawn_batch_never_carries_an_all_zero_id() -> None:
    """W3C forbids all-zero trace and span ids: a batch whose random bits come out zero
    (2^-64 odds an entry) replaces those entries; every format stays well formed."""
    import random
    import re

    class Zeros(random.Random):
        def getrandbits(self, k: int) -> int:
            return 0

    for propagation in (("tracecontext", "b3"), ("tracecontext", "b3multi")):
        tel = telemetry.Telemetry(trace_sampling=0.0, rng=Zeros(), propagation=propagation)
        try:
            tel._draw()
            entries = [dict(e) for e in tel._draws if e is not None]
            assert len(entries) == 63
            for headers in entries:
                parts = headers[b"traceparent"].split(b"-")
                assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-00", headers[b"traceparent"])
                assert parts[1] != b"0" * 32 and parts[2] != b"0" * 16
                if b"b3" in headers:
                    assert headers[b"b3"] == b"%s-%s-0" % (parts[1], parts[2])
                else:
                    assert headers[b"x-b3-traceid"] == parts[1]
                    assert headers[b"x-b3-spanid"] == parts[2]
        finally:
            tel.close()


def test_asgi_middleware_hides_the_callers_exchange_headers_from_the_app() -> None:
    import asyncio

    from pymesh.telemetry._peer import exchange_headers

    seen: list[list[bytes]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append([k for k, _ in scope["headers"]])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    from pymesh.bootstrap import generate_bootstrap, parse_bootstrap

    data = generate_bootstrap(
        xds_address="127.0.0.1:1", namespace="default", workload="ratings-v1",
        labels={"app": "ratings"},
    )  # fmt: skip
    caller = parse_bootstrap(json.dumps(data), source="test").node
    headers = [(b"host", b"ratings:9080"), (b"user-agent", b"t"),
               *((k.encode(), v.encode()) for k, v in exchange_headers(caller))]  # fmt: skip
    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    answers: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        answers.append(message)

    wrapped = telemetry.asgi_middleware(app)
    for exchange in (True, False):
        tel = telemetry.install(telemetry.Telemetry(node=caller, peer_exchange=exchange))
        try:

            async def one() -> None:
                await wrapped(dict(scope), receive, send)

            asyncio.run(one())
        finally:
            tel.close()
    hidden, kept = seen
    assert hidden == [b"host", b"user-agent"]  # Istio's filter removes them on the way in
    assert b"x-envoy-peer-metadata" in kept  # exchange off: no filter, nothing removed
    assert scope["headers"] is headers and len(headers) == 4  # the server's scope untouched


def test_access_log_writer_restarts_in_a_forked_child(tmp_path: Any) -> None:
    import os
    import time

    from pymesh.telemetry._accesslog import AccessLogWriter

    out = tmp_path / "child.log"
    lines: list[str] = []
    writer = AccessLogWriter(_lines, lines.append, interval=0.01)
    writer.put("parent")
    writer.flush()
    pid = os.fork()
    if pid == 0:  # the child: its own writer thread writes its lines, not the parent's
        code = 1
        try:
            writer.put("child")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and lines[-1:] != ["child"]:
                time.sleep(0.01)
            out.write_text(",".join(lines))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    writer.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert out.read_text() == "parent,child"  # written by the child's own thread
    assert lines == ["parent"]


def test_one_record_per_request_read_right_after_and_full_queue() -> None:
    """A finished request is one queued record; metrics and the log line come from it off
    the request path, and every read drains the queue first (a scrape right after a
    request sees it). A full queue never blocks: the metrics are counted at once and only
    the line is dropped (counted)."""
    lines: list[str] = []
    tel = telemetry.Telemetry(access_log="full", access_log_sink=lines.append, tracing=False)
    tel._writer._interval = 3600.0  # the thread never flushes within the test
    tel._writer._max = tel._max_pending = 2
    try:
        for status in (200, 404, 503):  # the third finds the queue full
            call = tel.client_call(
                protocol="http", method="GET", authority="a", path="/", set_header=lambda k, v: None
            )
            call.finish(None, status=status, service="a")
            srv = tel.server_call(
                protocol="http", method="GET", authority="a", path="/", get_header={}.get
            )
            srv.finish(status=status)
        assert len(tel._writer._pending) == 2 and lines == []  # nothing done on the request path
        assert tel.access_log_dropped == 4
        counts = {
            (labels[0], labels[21]): s.requests for labels, s in tel.requests.snapshot()
        }  # the read drained the queue: every request counted, reporters and codes apart
        assert counts == {
            (r, c): 1 for r in ("source", "destination") for c in ("200", "404", "503")
        }
        assert not tel._writer._pending and len(lines) == 2  # drained lines written in order
        assert [ln.split('" ')[1].split(" ")[0] for ln in lines] == ["200", "200"]
        text = tel.prometheus_text()
        assert text.count('response_code="503"') >= 2
    finally:
        tel.close()


def test_unsampled_server_request_continues_the_callers_trace() -> None:
    """An unsampled inbound request makes no span, yet its current span (built lazily)
    carries the caller's trace id, not sampled: the handler's outbound calls continue it."""
    from opentelemetry import trace

    tel = telemetry.Telemetry(rng=random.Random(3))
    try:
        inbound = {"traceparent": f"00-{TRACE}-{SPAN}-00"}
        srv = tel.server_call(
            protocol="http", method="GET", authority="a", path="/", get_header=inbound.get
        )
        assert srv.span is None
        ctx = trace.get_current_span().get_span_context()
        assert (f"{ctx.trace_id:032x}", ctx.trace_flags.sampled, ctx.is_remote) == (
            TRACE,
            False,
            False,
        )
        assert ctx.is_valid and f"{ctx.span_id:016x}" != SPAN  # a span id of our own
        sent: dict[str, str] = {}
        call = tel.client_call(
            protocol="http", method="GET", authority="b", path="/", set_header=sent.__setitem__
        )
        assert sent["traceparent"].startswith(f"00-{TRACE}-") and sent["traceparent"].endswith(
            "-00"
        )
        call.finish(None, status=200)
        srv.finish(status=200)
        assert not trace.get_current_span().get_span_context().is_valid  # restored
    finally:
        tel.close()
