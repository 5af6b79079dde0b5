"""Traces across client -> A -> B: one trace, parent/child links, W3C and B3 honoured inbound.

A and B are uvicorn apps on loopback wrapped in ``telemetry.asgi_middleware`` (the server
side of ASGI apps); A calls B with a pymesh httpx
client inside its handler, with no tracing code of its own: the trace flows through
contextvars. Spans land in an in-memory exporter.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from typing import Any

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import pymesh.httpx
from pymesh import telemetry
from tests.integration.httpx.conftest import Backend, Mesh, Upstream
from tests.integration.telemetry.conftest import parse_prometheus, select

Make = Callable[..., tuple[Backend, Upstream]]


def _entry(name: str, port: int) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: {name}, namespace: default}}
        spec:
          hosts: [{name}.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 80, name: http, protocol: HTTP}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {port}}}}}
        """
    )


def _finished(exporter: InMemorySpanExporter, n: int) -> tuple[Any, ...]:
    """The finished spans once there are ``n`` (a server span ends just after its response
    went out, so the caller may see the response first). Bounded wait."""
    deadline = time.monotonic() + 5
    while len(exporter.get_finished_spans()) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return tuple(exporter.get_finished_spans())


def test_one_trace_across_client_a_b_and_inbound_formats(
    tmp_path: Any, mesh: Mesh, upstreams: Make, installed: Callable[..., telemetry.Telemetry]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _b, ub = upstreams("b", app=telemetry.asgi_middleware(Backend("b")))
    holder: dict[str, Any] = {}

    async def a_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        r = await holder["client"].get("http://b.default.svc.cluster.local/from-a")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": r.content})

    _a, ua = upstreams("a", app=telemetry.asgi_middleware(a_app))
    mesh.write(_entry("a", ua.port) + "---\n" + _entry("b", ub.port), name="svc.yaml")
    mesh.start()
    assert mesh.client is not None
    holder["client"] = pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10)
    tel = installed(node=mesh.client.bootstrap.node, trace_sampling=100.0, tracer_provider=provider)
    assert tel.tracing
    tracer = provider.get_tracer("app")
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        with tracer.start_as_current_span("client-app") as root:
            r = client.get("http://a.default.svc.cluster.local/start")
        assert r.status_code == 200, r.text
        spans = _finished(exporter, 5)
        trace_id = root.get_span_context().trace_id
        assert {s.context.trace_id for s in spans} == {trace_id}
        by_kind: dict[tuple[SpanKind, str], Any] = {}
        for s in spans:
            by_kind[(s.kind, s.name.split("/", 1)[0])] = s
        c0 = by_kind[(SpanKind.CLIENT, "a.default.svc.cluster.local")]
        sa = by_kind[(SpanKind.SERVER, "a.default.svc.cluster.local")]
        c1 = by_kind[(SpanKind.CLIENT, "b.default.svc.cluster.local")]
        sb = by_kind[(SpanKind.SERVER, "b.default.svc.cluster.local")]
        assert c0.parent.span_id == root.get_span_context().span_id
        assert sa.parent.span_id == c0.context.span_id
        assert c1.parent.span_id == sa.context.span_id  # nested via contextvars, no app code
        assert sb.parent.span_id == c1.context.span_id
        assert c1.attributes["upstream_cluster"] == "outbound|80||b.default.svc.cluster.local"
        assert c1.attributes["http.status_code"] == "200"
        assert c1.attributes["response_flags"] == "-"
        assert c1.attributes["upstream_address"] == f"127.0.0.1:{ub.port}"
        # the server reporter of A and B (ASGI middleware), HTTP
        samples = parse_prometheus(tel.prometheus_text())
        for svc in ("a", "b"):
            host = f"{svc}.default.svc.cluster.local"
            got = select(samples, "istio_requests_total", reporter="destination",
                         destination_service=host)  # fmt: skip
            assert [(s[1]["response_code"], s[1]["request_protocol"], s[2]) for s in got] == [
                ("200", "http", 1)
            ], got
            assert got[0][1]["destination_service_name"] == svc
            assert got[0][1]["connection_security_policy"] == "none"

        # Inbound formats: W3C, B3 single, B3 multi each make A's span a child of the caller.
        trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent_hex = "00f067aa0ba902b7"
        for headers in (
            {"traceparent": f"00-{trace_hex}-{parent_hex}-01"},
            {"b3": f"{trace_hex}-{parent_hex}-1"},
            {"x-b3-traceid": trace_hex, "x-b3-spanid": parent_hex, "x-b3-sampled": "1"},
        ):
            exporter.clear()
            direct = httpx.get(f"http://127.0.0.1:{ua.port}/in", headers=headers, timeout=10)
            assert direct.status_code == 200
            server = [
                s
                for s in _finished(exporter, 3)
                if s.kind == SpanKind.SERVER and s.name.startswith("127.0.0.1")
            ]
            assert len(server) == 1, (headers, exporter.get_finished_spans())
            assert f"{server[0].context.trace_id:032x}" == trace_hex, headers
            assert f"{server[0].parent.span_id:016x}" == parent_hex, headers
            # and the outbound call to B carried the same trace on
            b_spans = [s for s in exporter.get_finished_spans() if s.name.startswith("b.")]
            assert {f"{s.context.trace_id:032x}" for s in b_spans} == {trace_hex}

        # A caller that decided not to sample: no spans, the decision travels on.
        exporter.clear()
        httpx.get(
            f"http://127.0.0.1:{ua.port}/in",
            headers={"traceparent": f"00-{trace_hex}-{parent_hex}-00"},
            timeout=10,
        )
        time.sleep(0.2)
        assert exporter.get_finished_spans() == ()
    import asyncio

    asyncio.run(holder["client"].aclose())
