"""Plain httpx vs pymesh.httpx against the same upstream on loopback (not a timed test).

The upstream is uvicorn in a subprocess (so it does not share the client's GIL), serving a
tiny body. pymesh runs with the embedded control plane in-process and a config that turns
on what the issue asks for: routing (a VirtualService with a match and a 100% weighted
route), round-robin LB, a retry policy, circuit-breaker limits, outlier detection and
Istio's standard metrics (``--no-metrics`` to leave them out).

Rounds are interleaved (plain, pymesh, plain, pymesh, ...) so both see the same machine
noise; the table reports medians over rounds of throughput, of per-request latency
percentiles (p50/p90/p99), of the client thread's CPU time per request
(``time.thread_time``: the least noisy measure of what pymesh adds on a shared machine) and
of the whole client process's CPU per request read from ``/proc/self/task/*/schedstat``
(every thread: the event loop, the xDS client, ...), and the ratios. Three shapes: sync
sequential, and async with 16 and 64 requests in flight on one client (``--concurrency``).

    python bench/httpx_bench.py [--requests 2000] [--rounds 7] [--concurrency 16,64]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpcore
import httpx

import pymesh.httpx
from pymesh import telemetry
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.xds.client import XdsClient

HOST = "bench.default.svc.cluster.local"
PORT = 8080

APP = textwrap.dedent(
    """
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"hello from the upstream"})
    """
)


def mesh_yaml(port: int) -> str:
    return textwrap.dedent(
        f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: bench, namespace: default}}
        spec:
          hosts: [{HOST}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{version: v1}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: bench, namespace: default}}
        spec:
          host: {HOST}
          trafficPolicy:
            loadBalancer: {{simple: ROUND_ROBIN}}
            connectionPool:
              tcp: {{maxConnections: 1000}}
              http: {{http1MaxPendingRequests: 1000, http2MaxRequests: 1000, maxRetries: 10}}
            outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
          subsets:
          - {{name: v1, labels: {{version: v1}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: bench, namespace: default}}
        spec:
          hosts: [{HOST}]
          http:
          - match: [{{uri: {{prefix: /nope}}}}]
            route: [{{destination: {{host: {HOST}, subset: v1}}}}]
          - route:
            - destination: {{host: {HOST}, subset: v1}}
              weight: 100
            retries: {{attempts: 2, retryOn: "5xx,connect-failure"}}
            timeout: 10s
        """
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_upstream(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    (tmp / "benchapp.py").write_text(APP)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(tmp), "benchapp:app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--no-access-log"],
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc, port
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("upstream did not start")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


Round = tuple[float, list[float], float, float]
"""(requests per second, per-request latencies in s, client-thread CPU s per request,
client-process CPU s per request from /proc)"""


def process_cpu(pid: int | str = "self") -> float:
    """CPU seconds of every thread of process ``pid`` (default: this one) so far (``/proc``,
    ns resolution)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total / 1e9


def sync_round(client: httpx.Client, url: str, n: int) -> Round:
    lat: list[float] = []
    t0 = time.perf_counter()
    c0 = time.thread_time()
    p0 = process_cpu()
    for _ in range(n):
        s = time.perf_counter()
        r = client.get(url)
        lat.append(time.perf_counter() - s)
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.text}")
    cpu = (time.thread_time() - c0) / n
    proc = (process_cpu() - p0) / n
    return n / (time.perf_counter() - t0), lat, cpu, proc


async def async_round(client: httpx.AsyncClient, url: str, n: int, concurrency: int) -> Round:
    lat: list[float] = []
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            s = time.perf_counter()
            r = await client.get(url)
            lat.append(time.perf_counter() - s)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text}")

    t0 = time.perf_counter()
    c0 = time.thread_time()
    p0 = process_cpu()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu = (time.thread_time() - c0) / n
    proc = (process_cpu() - p0) / n
    return n / (time.perf_counter() - t0), lat, cpu, proc


FIELDS = ("rps", "p50", "p90", "p99", "cpu", "proc")


def medians(rounds: list[Round]) -> dict[str, float]:
    """Medians over rounds: req/s, latency percentiles (µs), CPU per request (µs)."""
    out = {"rps": statistics.median(r[0] for r in rounds)}
    for f, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        out[f] = statistics.median(pct(r[1], q) for r in rounds) * 1e6
    out["cpu"] = statistics.median(r[2] for r in rounds) * 1e6
    out["proc"] = statistics.median(r[3] for r in rounds) * 1e6
    return out


def summarize(name: str, plain: list[Round], mesh: list[Round]) -> list[str]:
    p, m = medians(plain), medians(mesh)
    rows = [f"{name:<22} {'req/s':>14} {p['rps']:>12.0f} {m['rps']:>12.0f} "
            f"{m['rps'] / p['rps']:>9.3f}x"]  # fmt: skip
    labels = {"p50": "p50 µs", "p90": "p90 µs", "p99": "p99 µs",
              "cpu": "thread cpu µs/rq", "proc": "proc cpu µs/rq"}  # fmt: skip
    for f in ("p50", "p90", "p99", "cpu", "proc"):
        rows.append(f"{'':<22} {labels[f]:>14} {p[f]:>12.1f} {m[f]:>12.1f} "
                    f"{m[f] - p[f]:>+9.1f}µs")  # fmt: skip
    return rows


class _MemoryPool:
    """An httpcore pool that answers at once from memory (no socket, no server)."""

    connections: list[object] = []

    def handle_request(self, request: object) -> httpcore.Response:
        return httpcore.Response(
            200, headers=[(b"content-type", b"text/plain")], content=[b"hello from memory"]
        )


def isolated_overhead(xds: XdsClient, mesh_url: str, repeats: int = 40) -> tuple[float, float]:
    """µs per request of httpx's own transport and of the mesh transport, both answering
    from memory: the policy core and the adapter's conversions, without network noise."""
    pool = _MemoryPool()
    plain = httpx.HTTPTransport()
    plain._pool = pool  # type: ignore[assignment]
    mesh = pymesh.httpx.MeshTransport(xds)
    mesh._pools.get = lambda send, link: pool  # type: ignore[method-assign,assignment,return-value]
    with httpx.Client() as builder:
        plain_rq = builder.build_request("GET", mesh_url)
        mesh_rq = builder.build_request("GET", mesh_url)

    def one(transport: httpx.BaseTransport, request: httpx.Request) -> Callable[[], None]:
        def run() -> None:
            r = transport.handle_request(request)
            r.read()
            r.close()

        return run

    run_plain, run_mesh = one(plain, plain_rq), one(mesh, mesh_rq)
    run_mesh()  # first request: waits for the config

    def cpu(run: Callable[[], None], n: int = 1000) -> float:
        # Client-thread CPU (time.thread_time): time other processes take from this one on
        # the shared machine is not counted, as wall-clock timeit would.
        c0 = time.thread_time()
        for _ in range(n):
            run()
        return (time.thread_time() - c0) / n * 1e6

    # Interleaved (plain, mesh, plain, ...): both see the same background; min of each.
    plain_runs: list[float] = []
    mesh_runs: list[float] = []
    for _ in range(repeats):
        plain_runs.append(cpu(run_plain))
        mesh_runs.append(cpu(run_mesh))
    mesh.close()
    return min(plain_runs), min(mesh_runs)


def engines_compared(port: int, rounds: int, n: int) -> dict[str, tuple[float, float]]:
    """The connection layers alone on real sockets, no httpx client, no mesh: httpcore's
    pools against pymesh's HTTP/1.1 engine (``pymesh.httpx._h1``), client-thread CPU µs per
    request (read to the end), medians over interleaved rounds; sync sequential and 16 in
    flight on one async pool."""
    from pymesh.httpx._h1 import AsyncPool, SyncPool

    url = f"http://127.0.0.1:{port}/"
    timeouts = {"connect": 10.0, "read": 10.0, "write": 10.0, "pool": 10.0}

    def request() -> httpcore.Request:
        return httpcore.Request(
            b"GET", url, headers=[(b"host", b"bench")], extensions={"timeout": timeouts}
        )

    def sync_cpu(pool: Any) -> float:
        c0 = time.thread_time()
        for _ in range(n):
            response = pool.handle_request(request())
            response.read()
            response.close()
        return (time.thread_time() - c0) / n * 1e6

    async def async_cpu(pool: Any) -> float:
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                response = await pool.handle_async_request(request())
                await response.aread()
                await response.aclose()

        c0 = time.thread_time()
        await asyncio.gather(*(worker() for _ in range(16)))
        return (time.thread_time() - c0) / n * 1e6

    rows: dict[str, list[float]] = {"sync core": [], "sync h1": [], "a16 core": [], "a16 h1": []}
    core_sync, h1_sync = httpcore.ConnectionPool(), SyncPool("127.0.0.1", port)

    async def async_rounds() -> None:
        core_async, h1_async = httpcore.AsyncConnectionPool(), AsyncPool("127.0.0.1", port)
        await async_cpu(core_async)
        await async_cpu(h1_async)
        for _ in range(rounds):
            rows["a16 core"].append(await async_cpu(core_async))
            rows["a16 h1"].append(await async_cpu(h1_async))
        await core_async.aclose()
        await h1_async.aclose()

    sync_cpu(core_sync)
    sync_cpu(h1_sync)
    for _ in range(rounds):
        rows["sync core"].append(sync_cpu(core_sync))
        rows["sync h1"].append(sync_cpu(h1_sync))
    core_sync.close()
    h1_sync.close()
    asyncio.run(async_rounds())
    med = statistics.median
    return {
        "sync sequential": (med(rows["sync core"]), med(rows["sync h1"])),
        "async, 16 in flight": (med(rows["a16 core"]), med(rows["a16 h1"])),
    }


def transport_split(
    plain_url: str, mesh_url: str, xds: XdsClient, rounds: int, n: int
) -> dict[str, tuple[float, float]]:
    """Real sockets, sync: client-thread CPU per request in the transport's own code
    (``handle_request`` minus the httpcore connection pool's ``handle_request``), in the
    pool, and in the rest of the client (httpx's ``Client``, body read), medians over
    interleaved rounds. Instrumented (two ``thread_time`` reads per wrapped call), so kept
    apart from the main figures; it shows where the added CPU of a meshed request is."""
    clock = time.thread_time
    spent = {"transport": 0.0, "pool": 0.0}
    pool_call = httpcore.ConnectionPool.handle_request

    def timed_pool(self: httpcore.ConnectionPool, request: httpcore.Request) -> httpcore.Response:
        t = clock()
        try:
            return pool_call(self, request)
        finally:
            spent["pool"] += clock() - t

    def timed(call: Callable[[Any, httpx.Request], httpx.Response]) -> Any:
        def run(self: Any, request: httpx.Request) -> httpx.Response:
            t = clock()
            try:
                return call(self, request)
            finally:
                spent["transport"] += clock() - t

        return run

    patches: list[tuple[Any, str, Any]] = [
        (httpcore.ConnectionPool, "handle_request", timed_pool),
        (httpx.HTTPTransport, "handle_request", timed(httpx.HTTPTransport.handle_request)),
        (
            pymesh.httpx.MeshTransport,
            "handle_request",
            timed(pymesh.httpx.MeshTransport.handle_request),
        ),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    rows: dict[str, list[tuple[float, float, float]]] = {"plain": [], "mesh": []}
    try:
        with httpx.Client() as plain, pymesh.httpx.Client(xds_client=xds) as meshc:
            sync_round(plain, plain_url, 200)
            sync_round(meshc, mesh_url, 200)
            for _ in range(rounds):
                for name, client, url in (("plain", plain, plain_url), ("mesh", meshc, mesh_url)):
                    spent["transport"] = spent["pool"] = 0.0
                    _, _, cpu, _ = sync_round(client, url, n)
                    rows[name].append((cpu * n, spent["transport"], spent["pool"]))
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)

    def med(name: str, f: Callable[[tuple[float, float, float]], float]) -> float:
        return statistics.median(f(r) for r in rows[name]) / n * 1e6

    out: dict[str, tuple[float, float]] = {}
    for label, f in (
        ("transport own code", lambda r: r[1] - r[2]),
        ("connection pool", lambda r: r[2]),
        ("rest of the client", lambda r: r[0] - r[1]),
        ("total", lambda r: r[0]),
    ):
        out[label] = (med("plain", f), med("mesh", f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--concurrency",
        default="16,64",
        help="comma-separated requests in flight for the async runs (default 16,64)",
    )
    ap.add_argument("--json", type=Path, help="also write the medians here (JSON)")
    ap.add_argument(
        "--engines",
        action="store_true",
        help="also: httpcore's pools vs pymesh's HTTP/1.1 engine alone on real sockets",
    )
    ap.add_argument(
        "--no-metrics", action="store_true", help="pymesh without its metrics (on by default)"
    )
    ap.add_argument(
        "--isolated-only",
        action="store_true",
        help="only the in-memory transport comparison (no sockets: quick and less noisy)",
    )
    ap.add_argument(
        "--split",
        action="store_true",
        help="also: where the client CPU goes on real sockets (transport, pool, rest)",
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proc, port = start_upstream(tmp)
        mesh_dir = tmp / "mesh"
        mesh_dir.mkdir()
        (mesh_dir / "bench.yaml").write_text(mesh_yaml(port))
        cp = ControlPlane([mesh_dir], xds_address="127.0.0.1:0", admin_port=None).start()
        data = generate_bootstrap(xds_address=cp.address, namespace="default")
        xds = XdsClient(parse_bootstrap(json.dumps(data), source="bench"))
        if not args.no_metrics:
            # Istio's standard metrics for every meshed request (no tracing, no access log,
            # no metadata exchange headers); plain httpx never calls pymesh's hooks.
            telemetry.install(
                telemetry.Telemetry(node=xds.bootstrap.node, tracing=False, peer_exchange=False)
            )
        plain_url = f"http://127.0.0.1:{port}/"
        mesh_url = f"http://{HOST}:{PORT}/"
        plain_sync: list[Round] = []
        mesh_sync: list[Round] = []
        levels = [int(c) for c in str(args.concurrency).split(",") if c]
        async_runs: dict[int, tuple[list[Round], list[Round]]] = {}
        try:
            if not args.isolated_only:
                plain_sync, mesh_sync = run_sync(plain_url, mesh_url, xds, args)
                for level in levels:
                    async_runs[level] = asyncio.run(
                        run_async(plain_url, mesh_url, xds, args, level)
                    )
            isolated = isolated_overhead(xds, mesh_url)
            split = (
                transport_split(plain_url, mesh_url, xds, args.rounds, args.requests)
                if args.split
                else {}
            )
            engines = engines_compared(port, args.rounds, args.requests) if args.engines else {}
        finally:
            telemetry.uninstall()
            xds.close()
            cp.stop()
            proc.terminate()
            proc.wait(10)

    results: dict[str, Any] = {}
    if not args.isolated_only:
        print(f"loopback, {args.rounds} interleaved rounds of {args.requests} requests, "
              f"medians over rounds; pymesh metrics {'off' if args.no_metrics else 'on'}; "
              f"cpu count {os.cpu_count()}; "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(f"{'':<22} {'':>14} {'plain httpx':>12} {'pymesh':>12} {'ratio/added':>10}")
        shapes = [("sync sequential", plain_sync, mesh_sync)]
        shapes += [(f"async {c} in flight", *async_runs[c]) for c in levels]
        for name, plain_rounds, mesh_rounds in shapes:
            for line in summarize(name, plain_rounds, mesh_rounds):
                print(line)
            results[name] = {"plain": medians(plain_rounds), "pymesh": medians(mesh_rounds)}
    p, m = isolated
    results["transport, no socket"] = {"plain": p, "pymesh": m}
    print(f"{'transport, no socket':<22} {'µs/rq':>14} {p:>12.1f} {m:>12.1f} {m - p:>+9.1f}µs")
    print("  (handle_request + read + close on an in-memory pool, client-thread CPU, min of 40")
    print("   interleaved runs of 1000: the noise-resistant measure of what the mesh adds)")
    if split:
        print("sync, real sockets, client-thread CPU µs/rq (instrumented, medians):")
        for label, (p, m) in split.items():
            print(f"  {label:<20} {'':>14} {p:>12.1f} {m:>12.1f} {m - p:>+9.1f}µs")
    if engines:
        print("connection layer alone (no httpx client, no mesh), client-thread CPU µs/rq:")
        print(f"  {'':<20} {'':>14} {'httpcore':>12} {'pymesh h1':>12}")
        for label, (p, m) in engines.items():
            print(f"  {label:<20} {'':>14} {p:>12.1f} {m:>12.1f} {m / p:>9.2f}x")
            results[f"engine, {label}"] = {"httpcore": p, "pymesh": m}
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2))  # fmt: skip


def run_sync(
    plain_url: str, mesh_url: str, xds: XdsClient, args: argparse.Namespace
) -> tuple[list[Round], list[Round]]:
    """Sequential requests, plain and mesh rounds interleaved."""
    plain_sync: list[Round] = []
    mesh_sync: list[Round] = []
    with httpx.Client() as plain, pymesh.httpx.Client(xds_client=xds) as meshc:
        sync_round(plain, plain_url, 200)  # warm up: connections, config, caches
        sync_round(meshc, mesh_url, 200)
        for _ in range(args.rounds):
            plain_sync.append(sync_round(plain, plain_url, args.requests))
            mesh_sync.append(sync_round(meshc, mesh_url, args.requests))
    return plain_sync, mesh_sync


async def run_async(
    plain_url: str, mesh_url: str, xds: XdsClient, args: argparse.Namespace, concurrency: int
) -> tuple[list[Round], list[Round]]:
    """``concurrency`` requests in flight on one client, plain and mesh rounds interleaved
    (plain httpx keeps as many connections alive as requests in flight)."""
    pa: list[Round] = []
    ma: list[Round] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        httpx.AsyncClient(limits=limits) as plain,
        pymesh.httpx.AsyncClient(xds_client=xds) as meshc,
    ):
        await async_round(plain, plain_url, 200, concurrency)
        await async_round(meshc, mesh_url, 200, concurrency)
        for _ in range(args.rounds):
            pa.append(await async_round(plain, plain_url, args.requests, concurrency))
            ma.append(await async_round(meshc, mesh_url, args.requests, concurrency))
    return pa, ma


if __name__ == "__main__":
    main()
