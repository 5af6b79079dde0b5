"""Istio's request metrics for HTTP, client reporter: the real httpx adapter against uvicorn
backends under the embedded control plane, scraped from the Prometheus endpoint."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

import httpx

import pymesh.httpx
from pymesh import telemetry
from tests.integration.httpx.conftest import HOST, PORT, Backend, Mesh, Upstream, service_yaml
from tests.integration.telemetry.conftest import scrape, select, value

URL = f"http://{HOST}:{PORT}"
Make = Callable[..., tuple[Backend, Upstream]]
CLUSTER_V1 = f"outbound|{PORT}|v1|{HOST}"

VS = f"""\
http:
- match: [{{uri: {{prefix: /fault}}}}]
  fault: {{abort: {{percentage: {{value: 100}}, httpStatus: 418}}}}
  route: [{{destination: {{host: {HOST}, subset: v1}}}}]
- match: [{{uri: {{prefix: /timeout}}}}]
  timeout: 0.1s
  route: [{{destination: {{host: {HOST}, subset: v1}}}}]
- match: [{{uri: {{prefix: /retry}}}}]
  retries: {{attempts: 2, retryOn: 5xx, perTryTimeout: 2s}}
  route: [{{destination: {{host: {HOST}, subset: v1}}}}]
- match: [{{uri: {{prefix: /nohost}}}}]
  route: [{{destination: {{host: {HOST}, subset: empty}}}}]
- match: [{{uri: {{prefix: /ok}}}}, {{uri: {{prefix: /status}}}}, {{uri: {{prefix: /sleep}}}}]
  retries: {{attempts: 0}}
  route: [{{destination: {{host: {HOST}, subset: v1}}}}]
"""

DR = """\
trafficPolicy:
  connectionPool:
    tcp: {maxConnections: 1}
    http: {http1MaxPendingRequests: 1, http2MaxRequests: 100, maxRetries: 3}
"""

EMPTY_SUBSET = "  - {name: empty, labels: {version: none}}\n"


def test_client_reporter_labels_counts_and_flags(
    mesh: Mesh, upstreams: Make, installed: Callable[..., telemetry.Telemetry]
) -> None:
    b1, u1 = upstreams("v1")
    mesh.write(service_yaml({"v1": u1.port}, virtual_service=VS, destination_rule=DR))
    # the "empty" subset selects no endpoint: no healthy upstream (UH)
    text = (mesh.dir / "echo.yaml").read_text()
    text = text.replace("  subsets:\n", "  subsets:\n" + EMPTY_SUBSET)
    mesh.write(text)
    mesh.start(workload="productpage-v1", labels={"app": "productpage", "version": "v1"})
    assert mesh.client is not None
    tel = installed(node=mesh.client.bootstrap.node, access_log="off")
    server = tel.serve_prometheus(port=0)
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        for _ in range(3):
            assert client.post(URL + "/ok", content=b"abcd").status_code == 200
        assert client.get(URL + "/status/500").status_code == 500
        assert client.get(URL + "/zzz").status_code == 404  # NR
        assert client.get(URL + "/fault").status_code == 418  # FI
        b1.delay = 0.4
        assert client.get(URL + "/timeout").status_code == 504  # route timeout
        b1.delay = 0.0
        assert client.get(URL + "/nohost").status_code == 503  # UH
        b1.status = 503
        assert client.get(URL + "/retry").status_code == 503  # URX
        b1.status = 200
        barrier = threading.Barrier(6)

        def call(_: int) -> int:
            barrier.wait()
            return client.get(URL + "/sleep/300").status_code

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(call, range(6)))
        assert codes == [200, 200, 503, 503, 503, 503], codes  # UO

    samples = scrape(server.url)
    common = {
        "reporter": "source",
        "source_workload": "productpage-v1",
        "source_workload_namespace": "default",
        "source_app": "productpage",
        "source_version": "v1",
        "source_canonical_service": "productpage",
        "source_canonical_revision": "v1",
        "source_principal": "unknown",
        "destination_service": HOST,
        "destination_service_name": "echo",
        "destination_service_namespace": "default",
        "request_protocol": "http",
        "grpc_response_status": "",
        "connection_security_policy": "unknown",
    }
    ok = select(samples, "istio_requests_total", **common, response_code="200")
    assert len(ok) == 1, ok
    labels = ok[0][1]
    assert set(labels) == set(telemetry.LABEL_NAMES)
    assert labels["response_flags"] == "-"
    # the picked endpoint's Istio EDS metadata (its version label; no app label)
    assert (labels["destination_version"], labels["destination_canonical_revision"]) == ("v1", "v1")
    assert (labels["destination_workload_namespace"], labels["destination_app"]) == (
        "default",
        "unknown",
    )
    assert ok[0][2] == 3 + 2  # three /ok and the two /sleep/300 that got through
    assert value(samples, "istio_requests_total", **common, response_code="500") == 1
    for code, flags, n in (
        ("404", "NR", 1),
        ("418", "FI", 1),
        # the embedded control plane also writes the VirtualService timeout as the route's
        # max_stream_duration (as istiod does for proxyless), so the flow says DT
        ("504", "DT", 1),
        ("503", "UH", 1),
        ("503", "URX", 1),
        ("503", "UO", 4),
    ):
        got = select(samples, "istio_requests_total", response_code=code, response_flags=flags)
        assert [s[2] for s in got] == [n], (code, flags, got)
    # NR has no cluster: the destination is unknown, as in Istio
    nr = select(samples, "istio_requests_total", response_flags="NR")[0][1]
    assert nr["destination_service"] == "unknown"
    # the histograms: Istio's buckets, count and sum agree with the counter
    name = "istio_request_duration_milliseconds"
    buckets = select(samples, name + "_bucket", **common, response_code="200")
    assert [b[1]["le"] for b in buckets][:3] == ["0.5", "1", "5"]
    assert buckets[-1][1]["le"] == "+Inf" and buckets[-1][2] == 5
    assert value(samples, name + "_count", **common, response_code="200") == 5
    assert value(samples, name + "_sum", **common, response_code="200") >= 2 * 300
    assert value(samples, "istio_request_bytes_sum", **common, response_code="200") == 3 * 4
    body = len(b'{"name": "v1", "path": "/ok", "host": "echo.default.svc.cluster.local:8080"}')
    assert value(samples, "istio_response_bytes_sum", **common, response_code="200") >= 3 * body
    # no gRPC message counters for HTTP
    assert select(samples, "istio_request_messages_total") == []
    # mesh internals
    assert value(samples, "pymesh_upstream_rq_retry_total", cluster_name=CLUSTER_V1) == 2
    assert value(samples, "pymesh_upstream_rq_pending_overflow_total", cluster_name=CLUSTER_V1) == 4


def test_async_client_is_reported(
    mesh: Mesh, upstreams: Make, installed: Callable[..., telemetry.Telemetry]
) -> None:
    import asyncio

    _b1, u1 = upstreams("v1")
    mesh.write(service_yaml({"v1": u1.port}))
    mesh.start()
    assert mesh.client is not None
    tel = installed(node=mesh.client.bootstrap.node)

    async def main() -> None:
        async with pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10) as client:
            for _ in range(4):
                r = await client.get(URL + "/")
                assert r.status_code == 200

    asyncio.run(main())
    from tests.integration.telemetry.conftest import parse_prometheus

    samples = parse_prometheus(tel.prometheus_text())
    assert value(samples, "istio_requests_total", response_code="200", reporter="source") == 4


def test_telemetry_off_records_nothing(mesh: Mesh, upstreams: Make) -> None:
    _b1, u1 = upstreams("v1")
    mesh.write(service_yaml({"v1": u1.port}))
    mesh.start()
    tel = telemetry.Telemetry()  # built but not installed
    try:
        with httpx.Client(transport=pymesh.httpx.MeshTransport(mesh.client, mesh_wait=10)) as c:
            assert c.get(URL + "/").status_code == 200
        assert "istio_requests_total" not in tel.prometheus_text()
        assert tel.requests.snapshot() == []
    finally:
        tel.close()


def test_access_logs_and_mesh_internals(
    mesh: Mesh, upstreams: Make, installed: Callable[..., telemetry.Telemetry]
) -> None:
    import json
    import re

    _b1, u1 = upstreams("v1")
    mesh.write(service_yaml({"v1": u1.port}))
    mesh.start()
    assert mesh.client is not None
    text_lines: list[str] = []
    tel = installed(
        node=mesh.client.bootstrap.node, access_log="full", access_log_sink=text_lines.append
    )
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        r = client.get(URL + "/ok?x=1", headers={"user-agent": "ua-test"})
        assert r.status_code == 200
        tel.watch_runtime(client.mesh_transport.runtime)
        samples = scrape(tel.serve_prometheus(port=0).url)
    tel.flush_access_log()  # lines are written by the writer thread; flush them now
    assert len(text_lines) == 1
    line = text_lines[0]
    m = re.fullmatch(
        r'\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] "GET /ok\?x=1 HTTP/1\.1" 200 - 0 (\d+) '
        r'(\d+) - "-" "ua-test" "([0-9a-f-]{36})" "(\S+)" "127\.0\.0\.1:(\d+)"',
        line,
    )
    assert m is not None, line
    assert int(m.group(2)) == len(r.content)
    assert m.group(5) == f"{HOST}:{PORT}"
    assert int(m.group(6)) == u1.port
    # internals: the ADS stream, the ACKed resources, the cluster's endpoints
    assert [s[2] for s in select(samples, "pymesh_xds_connected")] == [1]
    acked = {
        s[1]["type_url"].rsplit(".", 1)[1]
        for s in select(samples, "pymesh_xds_resources", status="ACKED")
    }
    assert {"Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment"} <= acked
    cluster = f"outbound|{PORT}||{HOST}"
    assert value(samples, "pymesh_cluster_endpoints", cluster_name=cluster, state="healthy") == 1
    assert value(samples, "pymesh_cluster_endpoints", cluster_name=cluster, state="ejected") == 0

    # JSON lines carry the same facts
    json_lines: list[str] = []
    tel.close()
    tel = installed(
        node=mesh.client.bootstrap.node,
        access_log="full",
        access_log_format="json",
        access_log_sink=json_lines.append,
    )
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        assert client.get(URL + "/nothing").status_code == 200
    tel.flush_access_log()
    doc = json.loads(json_lines[0])
    assert doc["upstream_cluster"] == cluster
    assert doc["upstream_host"] == f"127.0.0.1:{u1.port}"
    assert (doc["response_code"], doc["response_flags"], doc["reporter"]) == (200, "-", "source")


def test_http_records_keep_nothing_made_for_the_request(
    mesh: Mesh, upstreams: Make, installed: Callable[..., telemetry.Telemetry]
) -> None:
    """The record of a finished HTTP request waits in the writer's queue for up to 0.1 s:
    it holds strings, numbers and long-lived objects only (the picked host), so the
    garbage collector has nothing of the request's to scan and promote meanwhile (records
    that kept the call and the upstream request made the collector most of telemetry's
    cost). The line and the counts it gives are the ones the full record gives."""
    import re

    _b1, u1 = upstreams("v1")
    mesh.write(service_yaml({"v1": u1.port}))
    mesh.start()
    assert mesh.client is not None
    lines: list[str] = []
    tel = installed(
        node=mesh.client.bootstrap.node, access_log="full", access_log_sink=lines.append
    )
    tel._writer._interval = 3600.0  # the writer thread runs but does not drain in the test
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        first = client.get(URL + "/ok?x=1", headers={"user-agent": "ua-test"})
        assert tel._quick  # the first record started the writer; quick records follow
        second = client.get(URL + "/ok?x=1", headers={"user-agent": "ua-test"})
    assert first.status_code == second.status_code == 200
    record = tel._pending[-1]
    result = second.extensions[pymesh.httpx.RESULT_EXTENSION]

    def atomic(x: object) -> bool:
        if isinstance(x, tuple):
            return all(atomic(y) for y in x)
        return x is None or isinstance(x, (str, int, float))

    assert [x for x in record if not atomic(x)] == [result.host]
    tel.flush_access_log()
    assert len(lines) == 2

    def fixed(line: str) -> str:  # start time, duration and request id differ
        line = re.sub(r"^\[[^]]+\]", "[T]", line)
        line = re.sub(r'" 200 - 0 (\d+) \d+ ', r'" 200 - 0 \1 D ', line)
        return re.sub(r'"[0-9a-f-]{36}"', '"ID"', line)

    assert fixed(lines[0]) == fixed(lines[1]), lines
    assert f'"ID" "{HOST}:{PORT}" "127.0.0.1:{u1.port}"' in fixed(lines[1])
    rid = dict(result.upstream_request.headers)["x-request-id"]
    assert f'"{rid}"' in lines[1]
    counts = [s.requests for _, s in tel.requests.snapshot()]
    assert counts == [2]  # one series: the quick record names the same one
