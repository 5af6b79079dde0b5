"""End to end on loopback: pymesh.httpx clients, the embedded control plane, uvicorn backends.

Each test writes Istio YAML, starts the control plane and a fresh xDS client, and checks what
an application would see behind an Istio sidecar with that config.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable

import httpx
import pytest

import pymesh.httpx
from pymesh.errors import NotInMeshError, UpstreamTimeoutError
from tests.integration.httpx.conftest import HOST, PORT, Backend, Mesh, Upstream, service_yaml

URL = f"http://{HOST}:{PORT}"
Make = Callable[[str], tuple[Backend, Upstream]]

SPLIT = """\
http:
- route:
  - destination: {{host: {host}, subset: v1}}
    weight: {w1}
  - destination: {{host: {host}, subset: v2}}
    weight: {w2}
"""


def split(w1: int) -> str:
    return SPLIT.format(host=HOST, w1=w1, w2=100 - w1)


def names(client: httpx.Client, n: int, url: str = URL) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        r = client.get(url + "/")
        assert r.status_code == 200, (r.status_code, r.text)
        seen[r.json()["name"]] += 1
    return seen


def test_weighted_split_and_live_reweight(mesh: Mesh, upstreams: Make) -> None:
    _b1, u1 = upstreams("v1")
    _b2, u2 = upstreams("v2")
    mesh.write(service_yaml({"v1": u1.port, "v2": u2.port}, virtual_service=split(80)))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        seen = names(client, 1000)
        assert abs(seen["v1"] / 10 - 80) <= 5, seen
        # New weights, same client: applied without a restart.
        mesh.write(service_yaml({"v1": u1.port, "v2": u2.port}, virtual_service=split(20)))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if names(client, 50)["v1"] < 25:
                break
            time.sleep(0.1)
        seen = names(client, 1000)
        assert abs(seen["v1"] / 10 - 20) <= 5, seen


def test_short_name_and_upstream_request(mesh: Mesh, upstreams: Make) -> None:
    b1, u1 = upstreams("v1")
    mesh.write(service_yaml({"v1": u1.port}))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        r = client.get(f"http://echo:{PORT}/a/b?c=d", headers={"x-mine": "1"})
        assert r.status_code == 200
        body = r.json()
        assert body["path"] == "/a/b"
        assert body["host"] == f"echo:{PORT}"  # the Host header is the application's
        sent = b1.seen_headers[-1]
        assert sent["x-mine"] == "1"
        assert len(sent["x-request-id"]) == 36
        result = r.extensions[pymesh.httpx.RESULT_EXTENSION]
        assert result.cluster == f"outbound|{PORT}||{HOST}"
        assert result.host.address.port == u1.port


def test_non_mesh_hosts_pass_through_or_are_refused(mesh: Mesh, upstreams: Make) -> None:
    _b1, u1 = upstreams("plain")
    mesh.write(service_yaml({"v1": u1.port}))
    mesh.start()
    plain = f"http://127.0.0.1:{u1.port}/"
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        start = time.monotonic()
        r = client.get(plain)
        assert r.status_code == 200 and r.json()["name"] == "plain"
        assert pymesh.httpx.RESULT_EXTENSION not in r.extensions
        assert time.monotonic() - start < 2  # a bounded wait for a non-cluster-domain host
        start = time.monotonic()
        assert client.get(plain).status_code == 200
        assert time.monotonic() - start < 0.5  # the verdict is cached
    with pymesh.httpx.Client(
        xds_client=mesh.client, mesh_wait=10, outbound_traffic_policy="REGISTRY_ONLY"
    ) as client:
        assert client.get(plain).status_code == 502
        assert client.get(URL + "/").status_code == 200
    with (
        pymesh.httpx.Client(
            xds_client=mesh.client,
            mesh_wait=10,
            outbound_traffic_policy="REGISTRY_ONLY",
            raise_on_mesh_error=True,
        ) as client,
        pytest.raises(NotInMeshError),
    ):
        client.get(plain)


def test_retries_hide_an_endpoint_that_always_fails(mesh: Mesh, upstreams: Make) -> None:
    bad, u1 = upstreams("bad")
    _good, u2 = upstreams("good")
    bad.status = 503
    # No VirtualService: Istio's default route retries 503 twice on another host.
    mesh.write(service_yaml({"v1": u1.port, "v2": u2.port}))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        statuses = collections.Counter(client.get(URL + "/").status_code for _ in range(200))
    assert statuses == {200: 200}
    assert bad.count > 50  # the failing endpoint really got traffic (and it was retried)


def test_retries_turn_half_failures_into_zero_errors(mesh: Mesh, upstreams: Make) -> None:
    flaky, u1 = upstreams("flaky")
    _solid, u2 = upstreams("solid")
    flaky.fail_every = 2  # 50% of its answers are 503
    vs = f"""\
http:
- route:
  - destination: {{host: {HOST}}}
  retries: {{attempts: 3, retryOn: "5xx"}}
"""
    mesh.write(service_yaml({"v1": u1.port, "v2": u2.port}, virtual_service=vs))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        statuses = collections.Counter(client.get(URL + "/").status_code for _ in range(300))
    assert statuses == {200: 300}
    assert flaky.count >= 100


def test_failover_when_an_endpoint_dies(mesh: Mesh, upstreams: Make) -> None:
    _b1, u1 = upstreams("v1")
    _b2, u2 = upstreams("v2")
    mesh.write(service_yaml({"v1": u1.port, "v2": u2.port}))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        assert set(names(client, 20)) == {"v1", "v2"}
        u1.stop()  # connections refused from now on
        seen = names(client, 100)  # every request still succeeds (connect-failure retry)
        assert seen == {"v2": 100}


def test_route_timeout_is_504(mesh: Mesh, upstreams: Make) -> None:
    _b1, u1 = upstreams("v1")
    vs = f"""\
http:
- route:
  - destination: {{host: {HOST}}}
  timeout: 0.3s
  retries: {{attempts: 0}}
"""
    mesh.write(service_yaml({"v1": u1.port}, virtual_service=vs))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        start = time.monotonic()
        r = client.get(URL + "/sleep/2000")
        took = time.monotonic() - start
        assert r.status_code == 504
        # Istio gives proxyless nodes (ours) the route timeout as max_stream_duration, so
        # Envoy with this xDS answers its stream-duration 504 (flag DT), not the router's.
        assert r.text == "downstream duration timeout"
        assert 0.25 < took < 1.5
        assert client.get(URL + "/sleep/10").status_code == 200
    with (
        pymesh.httpx.Client(
            xds_client=mesh.client, mesh_wait=10, raise_on_mesh_error=True
        ) as client,
        pytest.raises(UpstreamTimeoutError) as info,
    ):
        client.get(URL + "/sleep/2000")
    assert info.value.status == 504 and info.value.flags == ("DT",)


def test_fault_delay_and_abort(mesh: Mesh, upstreams: Make) -> None:
    b1, u1 = upstreams("v1")
    vs = f"""\
http:
- match: [{{uri: {{prefix: /slow}}}}]
  fault: {{delay: {{percentage: {{value: 100}}, fixedDelay: 0.3s}}}}
  route:
  - destination: {{host: {HOST}}}
- match: [{{uri: {{prefix: /broken}}}}]
  fault: {{abort: {{percentage: {{value: 100}}, httpStatus: 418}}}}
  route:
  - destination: {{host: {HOST}}}
- route:
  - destination: {{host: {HOST}}}
"""
    mesh.write(service_yaml({"v1": u1.port}, virtual_service=vs))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        client.get(URL + "/")  # warm the connection
        start = time.monotonic()
        assert client.get(URL + "/").status_code == 200
        fast = time.monotonic() - start
        start = time.monotonic()
        r = client.get(URL + "/slow")
        slow = time.monotonic() - start
        assert r.status_code == 200
        assert slow >= 0.3 and slow - fast < 0.6, (slow, fast)
        before = b1.count
        r = client.get(URL + "/broken")
        assert (r.status_code, r.text) == (418, "fault filter abort")
        assert b1.count == before  # an abort never reaches the upstream


def test_circuit_breaker_overflow_under_concurrency(mesh: Mesh, upstreams: Make) -> None:
    b1, u1 = upstreams("v1")
    dr = """\
trafficPolicy:
  connectionPool:
    tcp: {maxConnections: 1}
    http: {http1MaxPendingRequests: 1, http2MaxRequests: 100, maxRetries: 0}
"""
    vs = f"""\
http:
- route:
  - destination: {{host: {HOST}}}
  retries: {{attempts: 0}}
"""
    mesh.write(service_yaml({"v1": u1.port}, destination_rule=dr, virtual_service=vs))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        assert client.get(URL + "/").status_code == 200
        barrier = threading.Barrier(8)

        def call(_: int) -> httpx.Response:
            barrier.wait()
            return client.get(URL + "/sleep/300")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(call, range(8)))
    codes = collections.Counter(r.status_code for r in responses)
    assert codes[200] == 2, codes  # one in flight + one pending
    assert codes[503] == 6, codes
    overflow = [r for r in responses if r.status_code == 503]
    assert all(r.headers["x-envoy-overloaded"] == "true" for r in overflow)
    assert all(r.extensions[pymesh.httpx.RESULT_EXTENSION].flags == ("UO",) for r in overflow)
    assert b1.max_active == 1  # the pending one waited for the connection


def test_async_client_split_retries_and_concurrency(mesh: Mesh, upstreams: Make) -> None:
    _b1, u1 = upstreams("v1")
    b2, u2 = upstreams("v2")
    b2.fail_every = 3  # a third of its answers are 503 (any order under concurrency)
    vs = f"""\
http:
- route:
  - destination: {{host: {HOST}, subset: v1}}
    weight: 50
  - destination: {{host: {HOST}, subset: v2}}
    weight: 50
  retries: {{attempts: 10, retryOn: "5xx"}}
"""
    mesh.write(service_yaml({"v1": u1.port, "v2": u2.port}, virtual_service=vs))
    mesh.start()

    async def main() -> collections.Counter[tuple[int, str]]:
        async with pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10) as client:
            sem = asyncio.Semaphore(16)

            async def one() -> tuple[int, str]:
                async with sem:
                    r = await client.get(URL + "/")
                    return r.status_code, r.json()["name"]

            return collections.Counter(await asyncio.gather(*(one() for _ in range(400))))

    seen = asyncio.run(main())
    assert sum(n for (code, _), n in seen.items() if code == 200) == 400, seen
    v1 = seen[(200, "v1")]
    assert abs(v1 / 4 - 50) <= 7, seen


def test_endpoint_removed_by_eds_is_drained(mesh: Mesh, upstreams: Make) -> None:
    b1, u1 = upstreams("v1")
    _b2, u2 = upstreams("v2")
    mesh.write(service_yaml({"v1": u1.port, "v2": u2.port}))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        assert set(names(client, 20)) == {"v1", "v2"}
        mesh.write(service_yaml({"v2": u2.port}))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "v1" in names(client, 10):
            time.sleep(0.05)
        before = b1.count
        assert names(client, 50) == {"v2": 50}
        assert b1.count == before
        transport = client.mesh_transport
        pools = transport._pools._pools
        assert all(k[0] != f"127.0.0.1:{u1.port}" for k in pools)


def test_mirror_is_shadowed_with_the_shadow_host(mesh: Mesh, upstreams: Make) -> None:
    primary, u1 = upstreams("v1")
    shadow, u2 = upstreams("v2")
    vs = f"""\
http:
- route:
  - destination: {{host: {HOST}, subset: v1}}
  mirror: {{host: {HOST}, subset: v2}}
  mirrorPercentage: {{value: 100}}
"""
    mesh.write(service_yaml({"v1": u1.port, "v2": u2.port}, virtual_service=vs))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        assert names(client, 20) == {"v1": 20}  # the application only sees the primary
        deadline = time.monotonic() + 5
        while shadow.count < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert primary.count == 20
    assert shadow.count == 20
    assert shadow.seen_headers[0]["host"] == f"{HOST}-shadow:{PORT}"
    assert primary.seen_headers[0]["host"] == f"{HOST}:{PORT}"


def test_outlier_detection_ejects_a_failing_endpoint(mesh: Mesh, upstreams: Make) -> None:
    bad, u1 = upstreams("bad")
    _good, u2 = upstreams("good")
    bad.status = 500
    dr = """\
trafficPolicy:
  outlierDetection:
    consecutive5xxErrors: 3
    interval: 1s
    baseEjectionTime: 60s
    maxEjectionPercent: 100
"""
    vs = f"""\
http:
- route:
  - destination: {{host: {HOST}}}
  retries: {{attempts: 0}}
"""
    mesh.write(
        service_yaml({"v1": u1.port, "v2": u2.port}, destination_rule=dr, virtual_service=vs)
    )
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        first = collections.Counter(client.get(URL + "/").status_code for _ in range(20))
        assert first[500] == 3, first  # three consecutive 5xx, then the host is ejected
        after = collections.Counter(client.get(URL + "/").status_code for _ in range(50))
    assert after == {200: 50}
    assert bad.count == 3


def test_two_label_names_mean_service_namespace_or_an_external_host(
    mesh: Mesh, upstreams: Make
) -> None:
    _echo, u1 = upstreams("echo")
    _ext, u2 = upstreams("external")
    external = f"""\
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: default}}
spec:
  hosts: [httpbin.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {u2.port}}}}}
"""
    mesh.write(service_yaml({"v1": u1.port}, extra=external))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        r = client.get(f"http://echo.default:{PORT}/")  # service.namespace
        assert r.json()["name"] == "echo"
        assert r.extensions[pymesh.httpx.RESULT_EXTENSION].cluster.endswith(HOST)
        r = client.get(f"http://httpbin.test:{PORT}/")  # an external ServiceEntry host
        assert r.json()["name"] == "external"
        result = r.extensions[pymesh.httpx.RESULT_EXTENSION]
        assert result.cluster == f"outbound|{PORT}||httpbin.test"


def test_envoy_request_headers_are_honoured_and_consumed(mesh: Mesh, upstreams: Make) -> None:
    flaky, u1 = upstreams("flaky")
    flaky.fail_every = 2
    vs = f"""\
http:
- route:
  - destination: {{host: {HOST}}}
  retries: {{attempts: 0}}
"""
    mesh.write(service_yaml({"v1": u1.port}, virtual_service=vs))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        # No retries configured: half the calls fail ...
        plain = collections.Counter(client.get(URL + "/").status_code for _ in range(20))
        assert plain == {200: 10, 503: 10}
        # ... unless the request asks for retries, as Envoy's x-envoy-* headers allow.
        ask = {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "3"}
        asked = collections.Counter(
            client.get(URL + "/", headers=ask).status_code for _ in range(20)
        )
        assert asked == {200: 20}
        assert "x-envoy-retry-on" not in flaky.seen_headers[-1]  # consumed, not forwarded
        start = time.monotonic()
        r = client.get(URL + "/sleep/2000", headers={"x-envoy-upstream-rq-timeout-ms": "200"})
        assert r.status_code == 504
        assert time.monotonic() - start < 1.5


def test_route_rewrites_headers_redirects_and_direct_responses(mesh: Mesh, upstreams: Make) -> None:
    backend, u1 = upstreams("v1")
    vs = f"""\
http:
- match: [{{uri: {{prefix: /old}}}}]
  redirect: {{uri: /new, redirectCode: 302}}
- match: [{{uri: {{prefix: /static}}}}]
  directResponse: {{status: 418, body: {{string: teapot}}}}
- match: [{{uri: {{prefix: /api/}}}}]
  rewrite: {{uri: /v2/}}
  headers:
    request: {{set: {{x-added: "yes"}}}}
    response: {{set: {{x-served-by: mesh}}}}
  route:
  - destination: {{host: {HOST}}}
"""
    mesh.write(service_yaml({"v1": u1.port}, virtual_service=vs))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        r = client.get(URL + "/api/items?x=1")
        assert r.status_code == 200
        assert r.json()["path"] == "/v2/items"
        assert r.headers["x-served-by"] == "mesh"
        assert backend.seen_headers[-1]["x-added"] == "yes"
        r = client.get(URL + "/old/page")
        assert r.status_code == 302
        assert r.headers["location"].endswith("/new")
        r = client.get(URL + "/static")
        assert (r.status_code, r.text) == (418, "teapot")
        assert client.get(URL + "/nothing").status_code == 404


def test_async_cancellation_gives_back_the_request_slot(mesh: Mesh, upstreams: Make) -> None:
    _backend, u1 = upstreams("v1")
    dr = """\
trafficPolicy:
  connectionPool:
    http: {http2MaxRequests: 1}
"""
    mesh.write(service_yaml({"v1": u1.port}, destination_rule=dr))
    mesh.start()

    async def main() -> list[int]:
        async with pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10) as client:
            assert (await client.get(URL + "/")).status_code == 200
            slow = asyncio.ensure_future(client.get(URL + "/sleep/5000"))
            await asyncio.sleep(0.3)
            busy = (await client.get(URL + "/")).status_code  # the only slot is taken
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            after = (await client.get(URL + "/")).status_code  # and given back
            return [busy, after]

    assert asyncio.run(main()) == [503, 200]


def test_the_applications_own_timeout_raises_as_httpx_does(mesh: Mesh, upstreams: Make) -> None:
    _backend, u1 = upstreams("v1")
    mesh.write(service_yaml({"v1": u1.port}))  # Istio's default route: no mesh timeout
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10, timeout=0.3) as client:
        assert client.get(URL + "/").status_code == 200
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            client.get(URL + "/sleep/2000")
        assert time.monotonic() - start < 1.5  # not retried by the mesh
        clusters = client.mesh_transport.runtime.clusters().values()
        assert all(c.limits.requests == 0 for c in clusters)  # the attempt was given back
        assert client.get(URL + "/").status_code == 200


def test_a_dropped_streaming_response_gives_its_slot_back(mesh: Mesh, upstreams: Make) -> None:
    import gc

    _backend, u1 = upstreams("v1")
    dr = """\
trafficPolicy:
  connectionPool:
    http: {http2MaxRequests: 1}
"""
    mesh.write(service_yaml({"v1": u1.port}, destination_rule=dr))
    mesh.start()
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        request = client.build_request("GET", URL + "/")
        streamed = client.send(request, stream=True)  # holds the only request slot
        assert client.get(URL + "/").status_code == 503
        del streamed
        gc.collect()
        assert client.get(URL + "/").status_code == 200
