"""pymesh.httpx with telemetry on vs off, side by side (not a timed test).

"On" is what issue 7 sets as the budget: Istio's request metrics, access logs (Envoy's text
format, every request, to a file as Istio's ``accessLogFile`` says it: ``access_log_file``,
written a batch at a time by telemetry's writer thread; ``--ab``'s "line sink" calls a
function per line instead) and traces sampled at 1% (spans to an in-memory exporter). The
same mesh client, upstream and config as ``bench/httpx_bench.py`` (uvicorn in a subprocess,
embedded control plane, routing + retries + limits + outlier detection); sync sequential
requests, then async with ``--concurrency`` requests in flight on one client.

Method (the main figure and ``--ab``). This is a shared VM whose host steals CPU in bursts.
The same variant's throughput swings 2x within a minute, so each variant is run in short
*paired slices*, not in long separate rounds. Each of ``--rounds`` rounds is split into
slices of about ``--slice`` requests (``--requests`` per variant per round). A *cycle* is one
slice of every variant back to back: off, on (``--ab``: every variant), the order rotating
by one each cycle (off/on, on/off, ...). Each variant therefore sees the same bursts, and
each still sends ``--requests`` x ``--rounds`` requests in all. One untimed cycle warms up
first (connections, caches).

What a slice times: from just before its first request to just after its last response
and, when telemetry is installed, a ``Telemetry.flush_access_log()`` call. Telemetry only
queues a finished request's record. A writer thread drains that queue every 0.1 s
(metrics counted, access log lines formatted and written). The flush drains what the slice
left queued, in the client thread. It is *inside* the timing, so a slice pays for all of
its own deferred work and none of it spills into the next variant's slice. The
exception is ``--ab``'s ``writer idle``: its writer thread never runs and its flush is
*outside* the timing, which shows the cost of the request path alone.

Per variant, over all its slices: requests/s = total requests / total timed wall time;
latency p50/p99 over all its requests (the end-of-slice flush is in no request's
latency); client CPU per request = the requesting thread's CPU (``time.thread_time``; it
includes the end-of-slice flush) / requests; process CPU per request = every thread's
(``/proc/self/task/*/schedstat``: the writer thread's drains during the slice and the
flush included) / requests. The on/off ratio is the ratio of those throughputs. The
*paired* ratio takes each cycle's on slice rate / off slice rate (in the main figure the
two slices are adjacent, some 50 ms each) and reports their median and interquartile range:
a burst that stalls one slice moves the total-time ratio, not the paired median.
``--ab`` also gives the upstream process's CPU and GC collections per 1000 requests.
Short async slices include the ramp-up and drain of the ``--concurrency`` workers, so
absolute async throughput is a little lower than with long rounds. That cost is the same
for every variant.

A second figure isolates the per-request cost: both transports answer from memory (no
network), timed as client-thread CPU, min over repeats.

A third isolates the server side: the telemetry ASGI middleware ``pymesh.serve`` applies by
default, driven in memory around a one-line app.

``--parts`` runs telemetry on only, with each request-path part (and the writer's render,
per record) timed in place by ``perf_counter`` wrappers: what each costs among the rest of a
request, 2-3 times its tight-loop cost; no ratios (the timers cost too).

    python bench/telemetry_bench.py [--requests 2000] [--rounds 7] [--slice 200]
                                    [--concurrency 16] [--isolated-only]
                                    [--ab [--ab-variants "on,writer idle"]] [--parts]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpcore
import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).parent))

from httpx_bench import HOST, PORT, mesh_yaml, pct, process_cpu, start_upstream

import pymesh.httpx
from pymesh import telemetry
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.httpx._h1 import Done
from pymesh.xds.client import XdsClient


def make_telemetry(xds: XdsClient, log_path: Path) -> telemetry.Telemetry:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return telemetry.Telemetry(
        node=xds.bootstrap.node,
        access_log="full",
        access_log_format="text",
        access_log_file=log_path,
        trace_sampling=1.0,
        tracer_provider=provider,
    )


def make_variants(
    xds: XdsClient, log_path: Path, sink_file: Any
) -> dict[str, telemetry.Telemetry | None]:
    """``--ab``: the bench's telemetry and the same with one part switched off each."""
    write = sink_file.write

    def tel(**kw: Any) -> telemetry.Telemetry:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        args: dict[str, Any] = {
            "node": xds.bootstrap.node,
            "access_log": "full",
            "access_log_format": "text",
            "access_log_file": log_path,
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
        "line sink": tel(access_log_file=None, access_log_sink=lambda line: write(line + "\n")),
        "no spans (0%)": tel(trace_sampling=0.0),
        "no trace headers": tel(tracing=False),
        "no exchange": tel(peer_exchange=False),
        "no metrics": tel(metrics=False),
        "metrics only": tel(access_log="off", tracing=False, peer_exchange=False),
        "headers only": tel(access_log="off", metrics=False),
    }


UNTIMED_FLUSH = frozenset({"writer idle"})
"""``--ab`` variants whose end-of-slice flush is outside the timing (the request path's
cost alone, without the deferred work)."""


@dataclass(slots=True)
class Slice:
    """What one slice of one variant measured (seconds; see the module docstring)."""

    n: int
    wall: float
    """requests and, with telemetry, the end-of-slice flush"""
    lat: list[float]
    cpu: float
    """client thread"""
    proc: float
    """every thread of this process"""
    upstream: float
    """the upstream process (0 when not measured)"""
    gcs: int
    """GC collections started"""

    @property
    def rate(self) -> float:
        return self.n / self.wall


Cycle = dict[str, Slice]
"""One slice of every variant, back to back."""

_gcs = [0]


def _count_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gcs[0] += 1


def sync_slice(
    client: httpx.Client, url: str, n: int, *, flush: Callable[[], None] | None, upstream_pid: int
) -> Slice:
    """``n`` sequential requests, then ``flush`` (inside the timing)."""
    lat: list[float] = []
    get, clock = client.get, time.perf_counter
    u0 = process_cpu(upstream_pid) if upstream_pid else 0.0
    p0 = process_cpu()
    g0 = _gcs[0]
    c0 = time.thread_time()
    t0 = clock()
    for _ in range(n):
        s = clock()
        r = get(url)
        lat.append(clock() - s)
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.text}")
    if flush is not None:
        flush()
    wall = clock() - t0
    cpu = time.thread_time() - c0
    gcs = _gcs[0] - g0
    proc = process_cpu() - p0
    up = process_cpu(upstream_pid) - u0 if upstream_pid else 0.0
    return Slice(n, wall, lat, cpu, proc, up, gcs)


async def async_slice(
    client: httpx.AsyncClient,
    url: str,
    n: int,
    *,
    flush: Callable[[], None] | None,
    upstream_pid: int,
    concurrency: int,
) -> Slice:
    """``n`` requests, ``concurrency`` in flight, then ``flush`` (inside the timing)."""
    lat: list[float] = []
    left = n
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            s = clock()
            r = await client.get(url)
            lat.append(clock() - s)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text}")

    u0 = process_cpu(upstream_pid) if upstream_pid else 0.0
    p0 = process_cpu()
    g0 = _gcs[0]
    c0 = time.thread_time()
    t0 = clock()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    if flush is not None:
        flush()
    wall = clock() - t0
    cpu = time.thread_time() - c0
    gcs = _gcs[0] - g0
    proc = process_cpu() - p0
    up = process_cpu(upstream_pid) - u0 if upstream_pid else 0.0
    return Slice(n, wall, lat, cpu, proc, up, gcs)


def slice_sizes(requests: int, rounds: int, size: int) -> list[int]:
    """Requests per cycle: each round's ``requests`` split into slices of about ``size``."""
    k = max(1, round(requests / max(1, size)))
    per_round = [requests // k + (1 if j < requests % k else 0) for j in range(k)]
    return [s for _ in range(rounds) for s in per_round if s > 0]


async def run_cycles(
    client: httpx.Client | httpx.AsyncClient,
    url: str,
    variants: dict[str, telemetry.Telemetry | None],
    *,
    requests: int,
    rounds: int,
    size: int,
    concurrency: int,
    upstream_pid: int = 0,
) -> list[Cycle]:
    """Cycles of one slice per variant in rotating order (the first, untimed, warms up),
    ``requests`` x ``rounds`` requests per variant in all. Telemetry's deferred work is
    flushed at the end of each of its slices, inside the timing (outside for
    :data:`UNTIMED_FLUSH`)."""
    names = list(variants)
    sizes = slice_sizes(requests, rounds, size)
    cycles: list[Cycle] = []
    gc.callbacks.append(_count_gc)
    try:
        for i, n in enumerate([min(size, requests), *sizes] if sizes else []):
            cycle: Cycle = {}
            for name in names[i % len(names) :] + names[: i % len(names)]:
                t = variants[name]
                if t is None:
                    telemetry.uninstall()
                else:
                    telemetry.install(t)
                timed = None if t is None or name in UNTIMED_FLUSH else t.flush_access_log
                if isinstance(client, httpx.AsyncClient):
                    s = await async_slice(
                        client,
                        url,
                        n,
                        flush=timed,
                        upstream_pid=upstream_pid,
                        concurrency=concurrency,
                    )
                else:
                    s = sync_slice(client, url, n, flush=timed, upstream_pid=upstream_pid)
                if t is not None and timed is None:
                    t.flush_access_log()  # writer idle: what the slice queued, untimed
                cycle[name] = s
            if i > 0:  # cycle 0 warms up
                cycles.append(cycle)
    finally:
        telemetry.uninstall()
        gc.callbacks.remove(_count_gc)
    return cycles


class Stats:
    """One variant's figures over all its slices (see the module docstring)."""

    def __init__(self, cycles: list[Cycle], name: str, base: str = "off") -> None:
        slices = [c[name] for c in cycles]
        n = sum(s.n for s in slices)
        self.rps = n / sum(s.wall for s in slices)
        lat = [x for s in slices for x in s.lat]
        self.p50, self.p99 = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
        self.cpu = sum(s.cpu for s in slices) / n * 1e6
        self.cpu_min = min(s.cpu / s.n for s in slices) * 1e6
        self.proc = sum(s.proc for s in slices) / n * 1e6
        self.proc_min = min(s.proc / s.n for s in slices) * 1e6
        self.upstream = sum(s.upstream for s in slices) / n * 1e6
        self.gc = sum(s.gcs for s in slices) * 1000 / n
        paired = [c[name].rate / c[base].rate for c in cycles]
        self.paired = statistics.median(paired)
        if len(paired) > 1:
            self.q1, _, self.q3 = statistics.quantiles(paired, n=4, method="inclusive")
        else:
            self.q1 = self.q3 = self.paired
        self.pairs = len(paired)


def describe(cycles: list[Cycle], names: list[str], concurrency: int | None) -> str:
    """The header of a table: what was run."""
    n = sum(c["off"].n for c in cycles)
    shape = "sync" if concurrency is None else f"async, concurrency {concurrency}"
    order = "off/on alternating" if len(names) == 2 else "rotating order"
    untimed = [name for name in names if name in UNTIMED_FLUSH]
    flush = "telemetry's flush timed" + (f" except {', '.join(untimed)}'s" if untimed else "")
    return (
        f"{shape}: {n} requests per variant in {len(cycles)} slices of "
        f"~{round(n / len(cycles))} ({order}; {flush})"
    )


def summarize(title: str, cycles: list[Cycle]) -> list[str]:
    off, on = Stats(cycles, "off"), Stats(cycles, "on")
    return [
        title,
        f"  {'':24}{'telemetry off':>15}{'telemetry on':>15}{'on/off':>9}",
        f"  {'requests/s':24}{off.rps:15.0f}{on.rps:15.0f}{on.rps / off.rps:9.3f}",
        f"  {'':24}ratio {on.rps / off.rps:.3f} (paired median {on.paired:.3f}, "
        f"IQR {on.q1:.2f}-{on.q3:.2f}, {on.pairs} pairs)",
        f"  {'p50 latency (ms)':24}{off.p50:15.3f}{on.p50:15.3f}{on.p50 / off.p50:9.3f}",
        f"  {'p99 latency (ms)':24}{off.p99:15.3f}{on.p99:15.3f}{on.p99 / off.p99:9.3f}",
        f"  {'client CPU/request (us)':24}{off.cpu:15.1f}{on.cpu:15.1f}{on.cpu / off.cpu:9.3f}",
        f"  {'process CPU/request (us)':24}{off.proc:15.1f}{on.proc:15.1f}"
        f"{on.proc / off.proc:9.3f}",
    ]


def ab_table(cycles: list[Cycle], names: list[str]) -> list[str]:
    """``--ab``: per variant, requests/s, ratio to off (and the paired median and IQR),
    client thread, process and upstream process CPU per request (and the min over slices),
    GC collections per 1000 requests."""
    base = Stats(cycles, "off")
    out = [
        f"  {'variant':18}{'req/s':>7}{'ratio':>7}{'paired':>7}{'IQR':>10}{'client us':>10}"
        f"{'(min)':>7}{'process us':>11}{'(min)':>7}{'upstream us':>12}{'gc/1000':>8}"
    ]
    for name in names:
        s = Stats(cycles, name)
        out.append(
            f"  {name:18}{s.rps:7.0f}{s.rps / base.rps:7.3f}{s.paired:7.3f}"
            f"{f'{s.q1:.2f}-{s.q3:.2f}':>10}{s.cpu:10.1f}{s.cpu_min:7.1f}{s.proc:11.1f}"
            f"{s.proc_min:7.1f}{s.upstream:12.1f}{s.gc:8.1f}"
        )
    return out


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


def timed_parts(tel: telemetry.Telemetry) -> tuple[dict[str, list[float]], Callable[[], None]]:
    """Wrap telemetry's request-path functions (and ``tel``'s writer render, per record)
    with ``perf_counter`` timers: what each part costs among the rest of a request, not in a
    tight loop. Returns the totals (name -> [seconds, calls or records]) and the undo."""
    from pymesh.telemetry import _telemetry as T

    parts: dict[str, list[float]] = {}
    undo: list[Callable[[], None]] = []
    clock = time.perf_counter

    def timed(f: Any, name: str, per_record: bool = False) -> Any:
        total = parts[name] = [0.0, 0.0]

        def timer(*args: Any, **kw: Any) -> Any:
            t = clock()
            try:
                return f(*args, **kw)
            finally:
                total[0] += clock() - t
                total[1] += len(args[0]) if per_record else 1

        return timer

    for owner, name in [
        (T, "http_client_call"),
        (T.Telemetry, "_trace_headers"),
        (T.Telemetry, "_draw"),
        (T.Telemetry, "_sampled_headers"),
        (T.ClientCall, "upstream_headers"),
        (T.ClientCall, "response"),
        (T.Telemetry, "take_exchange"),
        (T.ClientCall, "finish"),
    ]:
        original = getattr(owner, name)
        setattr(owner, name, timed(original, name))
        undo.append(lambda o=owner, n=name, f=original: setattr(o, n, f))
    render = tel._writer._render
    tel._writer._render = timed(render, "writer render (per record)", per_record=True)
    undo.append(lambda: setattr(tel._writer, "_render", render))

    def undo_all() -> None:
        for u in reversed(undo):
            u()

    return parts, undo_all


def parts_table(parts: dict[str, list[float]], requests: int) -> list[str]:
    """µs per request of each timed part (nested parts are inside their callers')."""
    out = [f"  {'part':<28} {'us/request':>10} {'calls':>8} {'us/call':>9}"]
    for name, (seconds, calls) in parts.items():
        per_call = seconds / calls * 1e6 if calls else 0.0
        out.append(f"  {name:<28} {seconds / requests * 1e6:10.2f} {calls:8.0f} {per_call:9.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--slice",
        type=int,
        default=200,
        help="requests per slice: variants alternate every slice (default 200)",
    )
    ap.add_argument(
        "--ab", action="store_true", help="on sockets: telemetry with one part off at a time"
    )
    ap.add_argument("--ab-variants", help="with --ab: only these (comma-separated) and off")
    ap.add_argument(
        "--isolated-only", action="store_true", help="only the in-memory client and ASGI figures"
    )
    ap.add_argument(
        "--parts",
        action="store_true",
        help="on sockets, telemetry on only: each request-path part timed in place (us/request)",
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
        log_path = tmp / "access.log"
        sink_file = open(tmp / "sink.log", "w")  # noqa: SIM115 - closed below
        tel = make_telemetry(xds, log_path)
        url = f"http://{HOST}:{PORT}/"
        lines: list[str] = []
        try:
            if args.isolated_only:
                args.rounds = 0
            if args.ab:
                variants = make_variants(xds, log_path, sink_file)
                if args.ab_variants:
                    keep = ["off", *(v.strip() for v in args.ab_variants.split(","))]
                    unknown = [k for k in keep if k not in variants]
                    if unknown:
                        ap.error(f"--ab-variants: no variant {unknown}; known: {list(variants)}")
                    for name in [k for k in variants if k not in keep]:
                        t = variants.pop(name)
                        if t is not None:
                            t.close()
            else:
                variants = {"off": None, "on": tel}
            kw: dict[str, Any] = {
                "requests": args.requests,
                "rounds": args.rounds,
                "size": args.slice,
                "concurrency": args.concurrency,
                "upstream_pid": proc.pid if args.ab else 0,
            }

            async def run_sync() -> list[Cycle]:
                with pymesh.httpx.Client(xds_client=xds, mesh_wait=10) as client:
                    client.get(url)
                    return await run_cycles(client, url, variants, **kw)

            async def run_async() -> list[Cycle]:
                async with pymesh.httpx.AsyncClient(xds_client=xds, mesh_wait=10) as client:
                    await client.get(url)
                    return await run_cycles(client, url, variants, **kw)

            if args.parts:  # telemetry on only, its parts timed in place (no ratios)
                variants = {"on": tel}
                for concurrency, run in ((None, run_sync), (args.concurrency, run_async)):
                    parts, undo = timed_parts(tel)
                    try:
                        cycles = asyncio.run(run())
                    finally:
                        undo()
                    n = sum(c["on"].n for c in cycles) + min(args.slice, args.requests)
                    shape = "sync" if concurrency is None else f"async, {concurrency} in flight"
                    lines += [f"parts, {shape} ({n} requests with telemetry on):"]
                    lines += parts_table(parts, n)
            else:
                for concurrency, run in ((None, run_sync), (args.concurrency, run_async)):
                    cycles = asyncio.run(run())
                    if not cycles:
                        continue
                    title = describe(cycles, list(variants), concurrency)
                    if args.ab:
                        lines += [title, *ab_table(cycles, list(variants))]
                    else:
                        lines += summarize(title, cycles)
            if args.ab:
                for t in variants.values():
                    if t is not None:
                        t.close()
            elif not args.parts:
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
                logged = sum(1 for _ in open(log_path))  # noqa: SIM115
                lines.append(f"(checks: {series} metric series, {logged} access log lines)")
        finally:
            telemetry.uninstall()
            tel.close()
            sink_file.close()
            xds.close()
            cp.stop()
            proc.terminate()
            proc.wait(10)
    print(f"pymesh telemetry bench (python {sys.version.split()[0]}, {os.cpu_count()} cpus)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
