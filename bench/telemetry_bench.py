"""pymesh.httpx with telemetry on vs off, side by side (not a timed test).

"On" is what issue 7 sets as the budget: Istio's request metrics, access logs (Envoy's text
format, every request, written to a file by telemetry's writer thread) and traces sampled at
1% (spans to an in-memory exporter). "client CPU" is the requesting thread's, "process CPU"
every thread's (the access log writer's included). The same mesh client, upstream and
config as ``bench/httpx_bench.py`` (uvicorn in a subprocess, embedded control plane,
routing + retries + limits + outlier detection); rounds are interleaved (off, on, off,
on, ...) so both see the same machine noise. The table gives medians over rounds and the
on/off ratios (target: throughput within 5%).

A second figure isolates the per-request cost: both transports answer from memory (no
network), timed as client-thread CPU, min over repeats.

A third isolates the server side: the telemetry ASGI middleware ``pymesh.serve`` applies by
default, driven in memory around a one-line app.

    python bench/telemetry_bench.py [--requests 2000] [--rounds 7] [--concurrency 16]
                                    [--isolated-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpcore
import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).parent))

from httpx_bench import (
    HOST,
    PORT,
    Round,
    async_round,
    mesh_yaml,
    pct,
    start_upstream,
    sync_round,
)

import pymesh.httpx
from pymesh import telemetry
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.httpx._h1 import Done
from pymesh.xds.client import XdsClient


def make_telemetry(xds: XdsClient, log_file: object) -> telemetry.Telemetry:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    write = log_file.write  # type: ignore[attr-defined]
    return telemetry.Telemetry(
        node=xds.bootstrap.node,
        access_log="full",
        access_log_format="text",
        access_log_sink=lambda line: write(line + "\n"),
        trace_sampling=1.0,
        tracer_provider=provider,
    )


def make_variants(xds: XdsClient, log_file: object) -> dict[str, telemetry.Telemetry | None]:
    """``--ab``: the bench's telemetry and the same with one part switched off each."""
    write = log_file.write  # type: ignore[attr-defined]

    def tel(**kw: Any) -> telemetry.Telemetry:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        args: dict[str, Any] = {
            "node": xds.bootstrap.node,
            "access_log": "full",
            "access_log_format": "text",
            "access_log_sink": lambda line: write(line + "\n"),
            "trace_sampling": 1.0,
            "tracer_provider": provider,
        }
        args.update(kw)
        return telemetry.Telemetry(**args)

    slow = tel()
    slow._writer._interval = 1.0
    idle = tel()
    idle._writer._interval = 3600.0  # queued records are counted at the next read only
    return {
        "writer idle": idle,
        "off": None,
        "on": tel(),
        "no access log": tel(access_log="off"),
        "log writer 1 s": slow,
        "no spans (0%)": tel(trace_sampling=0.0),
        "no trace headers": tel(tracing=False),
        "no exchange": tel(peer_exchange=False),
        "no metrics": tel(metrics=False),
    }


async def ab(
    client: Any,
    url: str,
    variants: dict[str, telemetry.Telemetry | None],
    *,
    n: int,
    rounds: int,
    concurrency: int,
    upstream_pid: int,
    is_async: bool,
) -> list[str]:
    """Every variant in turn per round (rotating order), on sockets: requests/s, client
    thread, process and upstream process CPU per request, GC collections per 1000."""
    import gc

    from httpx_bench import process_cpu

    gcs = [0]

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gcs[0] += 1

    rows: dict[str, list[tuple[float, float, float, float, float]]] = {k: [] for k in variants}
    names = list(variants)

    async def go() -> None:
        for i in range(rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                t = variants[name]
                if t is None:
                    telemetry.uninstall()
                else:
                    telemetry.install(t)
                u0 = process_cpu(upstream_pid)
                g0 = gcs[0]
                if is_async:
                    r = await async_round(client, url, n, concurrency)
                else:
                    r = sync_round(client, url, n)
                up = (process_cpu(upstream_pid) - u0) / n
                if t is not None:
                    t.flush_access_log()  # outside the timing: what the round queued
                rows[name].append(
                    (r[0], r[2] * 1e6, r[3] * 1e6, up * 1e6, (gcs[0] - g0) * 1000 / n)
                )
        telemetry.uninstall()

    gc.callbacks.append(count)
    try:
        await go()
    finally:
        gc.callbacks.remove(count)
    med = statistics.median
    base = med(r[0] for r in rows["off"])
    out = [
        f"  {'variant':20}{'req/s':>8}{'ratio':>7}{'client us':>10}{'(min)':>7}"
        f"{'process us':>11}{'(min)':>7}{'upstream us':>12}{'gc/1000':>8}"
    ]
    for name, rs in rows.items():
        rps = med(r[0] for r in rs)
        out.append(
            f"  {name:20}{rps:8.0f}{rps / base:7.3f}{med(r[1] for r in rs):10.1f}"
            f"{min(r[1] for r in rs):7.1f}{med(r[2] for r in rs):11.1f}"
            f"{min(r[2] for r in rs):7.1f}{med(r[3] for r in rs):12.1f}"
            f"{med(r[4] for r in rs):8.1f}"
        )
    return out


def summarize(name: str, off: list[Round], on: list[Round]) -> list[str]:
    def med(rounds: list[Round], f: Callable[[Round], float]) -> float:
        return statistics.median(f(r) for r in rounds)

    rps_off, rps_on = med(off, lambda r: r[0]), med(on, lambda r: r[0])
    p50_off, p50_on = (med(x, lambda r: pct(r[1], 0.5) * 1e3) for x in (off, on))
    p99_off, p99_on = (med(x, lambda r: pct(r[1], 0.99) * 1e3) for x in (off, on))
    cpu_off, cpu_on = (med(x, lambda r: r[2] * 1e6) for x in (off, on))
    proc_off, proc_on = (med(x, lambda r: r[3] * 1e6) for x in (off, on))
    return [
        f"{name}",
        f"  {'':24}{'telemetry off':>15}{'telemetry on':>15}{'on/off':>9}",
        f"  {'requests/s':24}{rps_off:15.0f}{rps_on:15.0f}{rps_on / rps_off:9.3f}",
        f"  {'p50 latency (ms)':24}{p50_off:15.3f}{p50_on:15.3f}{p50_on / p50_off:9.3f}",
        f"  {'p99 latency (ms)':24}{p99_off:15.3f}{p99_on:15.3f}{p99_on / p99_off:9.3f}",
        f"  {'client CPU/request (us)':24}{cpu_off:15.1f}{cpu_on:15.1f}{cpu_on / cpu_off:9.3f}",
        f"  {'process CPU/request (us)':24}{proc_off:15.1f}{proc_on:15.1f}"
        f"{proc_on / proc_off:9.3f}",
    ]


class _DonePool:
    """An httpcore pool answering from memory as the HTTP/1.1 engine answers a small
    response: the body complete when the head is read (its ``Done`` stream), sync or async."""

    connections: list[object] = []

    def _response(self) -> httpcore.Response:
        return httpcore.Response(
            200, headers=[(b"content-type", b"text/plain")], content=Done([b"hello from memory"])
        )

    def handle_request(self, request: object) -> httpcore.Response:
        return self._response()

    async def handle_async_request(self, request: object) -> httpcore.Response:
        return self._response()


def isolated(xds: XdsClient, tel: telemetry.Telemetry, repeats: int = 30) -> dict[str, float]:
    """Client-thread CPU µs per request of the mesh transports answering from memory, with
    telemetry off and on (min over interleaved repeats): sync, and async on one event loop
    (sequential awaits, so the figure is the transport's and telemetry's code, not the
    loop's scheduling)."""
    pool = _DonePool()
    mesh = pymesh.httpx.MeshTransport(xds)
    mesh._pools.get = lambda send, link: pool  # type: ignore[method-assign,assignment,return-value]
    amesh = pymesh.httpx.AsyncMeshTransport(xds)
    amesh._pools.get = lambda send, link: pool  # type: ignore[method-assign,assignment,return-value]
    url = f"http://{HOST}:{PORT}/"

    def run() -> None:
        r = mesh.handle_request(httpx.Request("GET", url))
        r.read()
        r.close()

    async def arun() -> None:
        r = await amesh.handle_async_request(httpx.Request("GET", url))
        await r.aread()
        await r.aclose()

    def cpu(n: int = 1000) -> float:
        c0 = time.thread_time()
        for _ in range(n):
            run()
        return (time.thread_time() - c0) / n * 1e6

    async def acpu(n: int = 1000) -> float:
        c0 = time.thread_time()
        for _ in range(n):
            await arun()
        return (time.thread_time() - c0) / n * 1e6

    out: dict[str, list[float]] = {"off": [], "on": [], "aoff": [], "aon": []}

    async def arounds() -> None:
        await arun()
        for _ in range(repeats):
            telemetry.uninstall()
            out["aoff"].append(await acpu())
            telemetry.install(tel)
            out["aon"].append(await acpu())
        telemetry.uninstall()
        global ACALLS
        ACALLS = (
            await acalls_per_request(arun, False, tel),
            await acalls_per_request(arun, True, tel),
        )
        await amesh.aclose()

    run()
    for _ in range(repeats):
        telemetry.uninstall()
        out["off"].append(cpu())
        telemetry.install(tel)
        out["on"].append(cpu())
    telemetry.uninstall()
    asyncio.run(arounds())
    global CALLS
    CALLS = (calls_per_request(run, False, tel), calls_per_request(run, True, tel))
    mesh.close()
    return {k: min(v) for k, v in out.items()}


CALLS = (0.0, 0.0)
ACALLS = (0.0, 0.0)


async def acalls_per_request(run: Callable[[], Any], on: bool, tel: telemetry.Telemetry) -> float:
    """:func:`calls_per_request` of an async request."""
    import cProfile
    import pstats

    if on:
        telemetry.install(tel)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(500):
        await run()
    profile.disable()
    telemetry.uninstall()
    return pstats.Stats(profile).total_calls / 500  # type: ignore[attr-defined,no-any-return]


def calls_per_request(run: Callable[[], None], on: bool, tel: telemetry.Telemetry) -> float:
    """Python function calls per request (cProfile's count): unlike time, the same on a
    busy machine, so a change's cost shows even when the timings are noise."""
    import cProfile
    import pstats

    if on:
        telemetry.install(tel)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(500):
        run()
    profile.disable()
    telemetry.uninstall()
    return pstats.Stats(profile).total_calls / 500  # type: ignore[attr-defined,no-any-return]


def asgi_isolated(tel: telemetry.Telemetry, repeats: int = 30) -> dict[str, float]:
    """Server side: CPU µs per request of the telemetry ASGI middleware (what
    ``pymesh.serve`` applies by default) around a one-line app, driven in memory on one
    event loop (no sockets, no uvicorn): the app alone, wrapped with no telemetry installed,
    wrapped with ``tel`` installed (a caller's metadata exchange and trace headers in)."""
    from pymesh.telemetry._peer import exchange_headers

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = telemetry.asgi_middleware(app)
    caller = [(k.encode(), v.encode()) for k, v in exchange_headers(tel.node)]
    headers = [
        (b"host", b"reviews.default.svc.cluster.local:9080"),
        (b"user-agent", b"python-httpx/0.28.1"),
        (b"accept", b"*/*"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
        (b"x-request-id", b"9b6c7a3e-3f0e-4a51-9d5c-0d4b5d1f8a77"),
        *caller,
    ]
    scope = {"type": "http", "method": "GET", "path": "/reviews/0", "query_string": b"",
             "headers": headers, "extensions": {}}  # fmt: skip
    request = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> Any:
        return request

    async def send(message: Any) -> None:
        return None

    async def loop(target: Any, n: int) -> float:
        c0 = time.thread_time()
        for _ in range(n):
            await target(dict(scope), receive, send)
        return (time.thread_time() - c0) / n * 1e6

    async def run() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"app": [], "off": [], "on": []}
        for _ in range(repeats):
            telemetry.uninstall()
            out["app"].append(await loop(app, 1000))
            out["off"].append(await loop(wrapped, 1000))
            telemetry.install(tel)
            out["on"].append(await loop(wrapped, 1000))
        telemetry.uninstall()
        return out

    return {k: min(v) for k, v in asyncio.run(run()).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--ab", action="store_true", help="on sockets: telemetry with one part off at a time"
    )
    ap.add_argument("--ab-variants", help="with --ab: only these (comma-separated) and off")
    ap.add_argument(
        "--isolated-only", action="store_true", help="only the in-memory client and ASGI figures"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        proc, port = start_upstream(tmp)
        mesh_dir = tmp / "mesh"
        mesh_dir.mkdir()
        (mesh_dir / "bench.yaml").write_text(mesh_yaml(port))
        cp = ControlPlane([mesh_dir], xds_address="127.0.0.1:0", admin_port=None).start()
        data = generate_bootstrap(
            xds_address=cp.address, namespace="default", workload="bench-client",
            labels={"app": "bench-client", "version": "v1"},
        )  # fmt: skip
        xds = XdsClient(parse_bootstrap(json.dumps(data), source="bench"))
        log_file = open(tmp / "access.log", "w")  # noqa: SIM115 - closed below
        tel = make_telemetry(xds, log_file)
        url = f"http://{HOST}:{PORT}/"
        lines: list[str] = []
        try:
            if args.ab:
                variants = make_variants(xds, log_file)
                if args.ab_variants:
                    keep = ["off", *args.ab_variants.split(",")]
                    for name in [k for k in variants if k not in keep]:
                        t = variants.pop(name)
                        if t is not None:
                            t.close()
                kw = {
                    "n": args.requests,
                    "rounds": args.rounds,
                    "concurrency": args.concurrency,
                    "upstream_pid": proc.pid,
                }
                with pymesh.httpx.Client(xds_client=xds, mesh_wait=10) as client:
                    client.get(url)
                    lines.append(f"sync, {args.requests} requests x {args.rounds} per variant")
                    lines += asyncio.run(ab(client, url, variants, **kw, is_async=False))

                async def run_ab() -> list[str]:
                    async with pymesh.httpx.AsyncClient(xds_client=xds, mesh_wait=10) as client:
                        await client.get(url)
                        return await ab(client, url, variants, **kw, is_async=True)

                lines.append(f"async, concurrency {args.concurrency}")
                lines += asyncio.run(run_ab())
                for t in variants.values():
                    if t is not None:
                        t.close()
            else:
                if args.isolated_only:
                    args.rounds = 0
                with pymesh.httpx.Client(xds_client=xds, mesh_wait=10) as client:
                    client.get(url)
                    off: list[Round] = []
                    on: list[Round] = []
                    for _ in range(args.rounds):
                        telemetry.uninstall()
                        off.append(sync_round(client, url, args.requests))
                        telemetry.install(tel)
                        on.append(sync_round(client, url, args.requests))
                    telemetry.uninstall()
                    if off:
                        lines += summarize(
                            f"sync, {args.requests} requests x {args.rounds}", off, on
                        )

                async def run_async() -> tuple[list[Round], list[Round]]:
                    async with pymesh.httpx.AsyncClient(xds_client=xds, mesh_wait=10) as client:
                        await client.get(url)
                        a_off: list[Round] = []
                        a_on: list[Round] = []
                        for _ in range(args.rounds):
                            telemetry.uninstall()
                            a_off.append(
                                await async_round(client, url, args.requests, args.concurrency)
                            )
                            telemetry.install(tel)
                            a_on.append(
                                await async_round(client, url, args.requests, args.concurrency)
                            )
                        telemetry.uninstall()
                        return a_off, a_on

                a_off, a_on = asyncio.run(run_async())
                if a_off:
                    lines += summarize(f"async, concurrency {args.concurrency}", a_off, a_on)
                iso = isolated(xds, tel)
                lines += [
                    "isolated (in-memory upstream, client CPU per request, min of 30 x 1000)",
                    f"  sync: telemetry off {iso['off']:.1f} us, on {iso['on']:.1f} us: "
                    f"+{iso['on'] - iso['off']:.1f} us per request",
                    f"  async: telemetry off {iso['aoff']:.1f} us, on {iso['aon']:.1f} us: "
                    f"+{iso['aon'] - iso['aoff']:.1f} us per request",
                    f"  Python calls per request, sync: off {CALLS[0]:.0f}, on {CALLS[1]:.0f} "
                    f"(+{CALLS[1] - CALLS[0]:.0f}); async: off {ACALLS[0]:.0f}, on {ACALLS[1]:.0f} "
                    f"(+{ACALLS[1] - ACALLS[0]:.0f})",
                ]
                srv = asgi_isolated(tel)
                lines += [
                    "ASGI server middleware (in memory, CPU per request, min of 30 x 1000)",
                    f"  app alone {srv['app']:.1f} us; wrapped, telemetry off "
                    f"{srv['off']:.1f} us (+{srv['off'] - srv['app']:.1f}); on {srv['on']:.1f} us "
                    f"(+{srv['on'] - srv['app']:.1f})",
                ]
                series = len(tel.requests.snapshot())
                tel.flush_access_log()  # lines still queued for the writer thread
                log_file.flush()
                logged = sum(1 for _ in open(tmp / "access.log"))  # noqa: SIM115
                lines.append(f"(checks: {series} metric series, {logged} access log lines)")
        finally:
            telemetry.uninstall()
            tel.close()
            log_file.close()
            xds.close()
            cp.stop()
            proc.terminate()
            proc.wait(10)
    print(f"pymesh telemetry bench (python {sys.version.split()[0]}, {os.cpu_count()} cpus)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
