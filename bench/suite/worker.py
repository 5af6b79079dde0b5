"""The client process of one variant: ``python -m bench.suite.worker SPEC_JSON``.

One process per variant, so that its CPU time and RSS (read by the suite from /proc) are that
client's alone and a plain variant does not carry pymesh's imports. It imports only what its
variant needs, prints ``{"ready": true}`` once a first request succeeded, then runs commands
read from stdin, one JSON object a line: ``{"shape": "sync" | "async" | "rate", "n": N,
"concurrency": C}`` => ``{"elapsed": s, "lat": [s, ...]}`` (or ``{"error": "..."}``).

Every variant is timed by the same three loops (:func:`timed_sync`, :func:`timed_async`,
:func:`timed_rate`): a request is ``GET url`` checked for 200 (HTTP) or one unary call
(gRPC).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

SyncCall = Callable[[], None]
AsyncCall = Callable[[], Awaitable[None]]


def timed_sync(call: SyncCall, n: int) -> tuple[float, list[float]]:
    """``n`` sequential requests: (elapsed s, per-request latencies s)."""
    clock = time.perf_counter
    lat: list[float] = []
    start = clock()
    for _ in range(n):
        t = clock()
        call()
        lat.append(clock() - t)
    return clock() - start, lat


async def timed_async(call: AsyncCall, n: int, concurrency: int) -> tuple[float, list[float]]:
    """``n`` requests, ``concurrency`` in flight at any time: (elapsed s, latencies s)."""
    clock = time.perf_counter
    lat: list[float] = []
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = clock()
            await call()
            lat.append(clock() - t)

    start = clock()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return clock() - start, lat


RATE_QPS = 1000
"""The ``rate`` shape's offered load: Istio's published latency figures are at 1,000 requests
per second over 16 connections (fortio ``-qps 1000 -c 16``)."""


async def timed_rate(
    call: AsyncCall,
    n: int,
    concurrency: int,
    qps: float = RATE_QPS,
    late: list[float] | None = None,
) -> tuple[float, list[float]]:
    """``n`` requests offered at ``qps`` in all over ``concurrency`` connections, as fortio
    paces them: each connection sends every ``concurrency / qps`` s (connections staggered
    evenly), waits for its answer, and sends the next one at its next slot (at once when
    late). Latency is from the actual send to the answer. ``late`` (optional) gets how late
    each send was against its slot (a stalled event loop shows there)."""
    clock = time.perf_counter
    lat: list[float] = []
    interval = concurrency / qps
    per = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    start = clock()

    async def worker(i: int) -> None:
        due = start + i * interval / concurrency
        for _ in range(per[i]):
            wait = due - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            t = clock()
            if late is not None:
                late.append(max(0.0, t - due))
            await call()
            lat.append(clock() - t)
            due += interval

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return clock() - start, lat


class Variant:
    """Makes the sync call, and the async call for a concurrency (inside the event loop)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.xds: Any = None
        if spec.get("bootstrap"):
            from pymesh.bootstrap import parse_bootstrap
            from pymesh.xds.client import XdsClient

            with open(spec["bootstrap"]) as f:
                self.xds = XdsClient(parse_bootstrap(f.read(), source=spec["bootstrap"]))
        self.telemetry: Any = None
        if spec.get("metrics"):
            # Istio's request metrics (no traces, no access log): part of the full policy.
            from pymesh import telemetry

            self.telemetry = telemetry.install(
                telemetry.Telemetry(node=self.xds.bootstrap.node, tracing=False)
            )
        self._closers: list[Callable[[], Any]] = []
        self._sync: SyncCall | None = None
        self._async: dict[int, AsyncCall] = {}

    def sync_call(self) -> SyncCall:
        if self._sync is None:
            self._sync = self._make_sync()
        return self._sync

    async def async_call(self, concurrency: int) -> AsyncCall:
        if concurrency not in self._async:
            self._async[concurrency] = await self._make_async(concurrency)
        return self._async[concurrency]

    # -- HTTP ----------------------------------------------------------------------------

    def _http_client(self, sync: bool, concurrency: int) -> Any:
        import httpx

        limits = httpx.Limits(max_connections=max(concurrency, 1))
        if self.xds is None:
            return httpx.Client() if sync else httpx.AsyncClient(limits=limits)
        import pymesh.httpx

        if sync:
            return pymesh.httpx.Client(xds_client=self.xds, mesh_wait=20)
        return pymesh.httpx.AsyncClient(xds_client=self.xds, mesh_wait=20, limits=limits)

    def _make_sync(self) -> SyncCall:
        if self.spec["kind"] == "http":
            client = self._http_client(True, 1)
            self._closers.append(client.close)
            url = self.spec["url"]

            def get() -> None:
                r = client.get(url)
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")

            return get
        channel = self._grpc_channel(False)
        self._closers.append(channel.close)
        stub = channel.unary_unary(self.spec["method"], None, None)

        def unary() -> None:
            stub(b"hi", timeout=10)

        return unary

    async def _make_async(self, concurrency: int) -> AsyncCall:
        if self.spec["kind"] == "http":
            client = self._http_client(False, concurrency)
            self._closers.append(client.aclose)
            url = self.spec["url"]

            async def get() -> None:
                r = await client.get(url)
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")

            return get
        channel = self._grpc_channel(True)
        self._closers.append(lambda: channel.close(None))
        stub = channel.unary_unary(self.spec["method"], None, None)

        async def unary() -> None:
            await stub(b"hi", timeout=10)

        return unary

    # -- gRPC ----------------------------------------------------------------------------

    def _grpc_channel(self, aio: bool) -> Any:
        target = self.spec["target"]
        if self.xds is not None:
            if aio:
                import pymesh.grpc.aio

                return pymesh.grpc.aio.insecure_channel(target, xds_client=self.xds)
            import pymesh.grpc

            return pymesh.grpc.insecure_channel(target, xds_client=self.xds)
        import grpc
        import grpc.aio

        return grpc.aio.insecure_channel(target) if aio else grpc.insecure_channel(target)

    async def aclose(self) -> None:
        for close in reversed(self._closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result
        if self.xds is not None:
            self.xds.close()

    def metric_series(self) -> int | None:
        """How many request-metric series the installed telemetry holds (``None``: none)."""
        if self.telemetry is None:
            return None
        return len(self.telemetry.requests.snapshot())


def _package(filename: str) -> str:
    """A profile entry's package: ``pymesh.httpx``, ``httpcore``, ``asyncio``, ``C``..."""
    if filename == "~" or filename.startswith("<"):
        return "C (built-ins, extensions)"
    path = filename.replace("\\", "/")
    for marker in ("/site-packages/", "/work/main/"):
        if marker in path:
            parts = path.split(marker, 1)[1].split("/")
            return ".".join(parts[:2]) if parts[0] == "pymesh" else parts[0]
    if "/lib/python3" in path:
        rest = path.split("/lib/python3", 1)[1].split("/")[1:]
        return "stdlib " + (rest[0].removesuffix(".py") if rest else "?")
    return path.rsplit("/", 1)[-1]


def profiled(run: Callable[[], tuple[float, list[float]]], n: int, top: int) -> dict[str, Any]:
    """Run one batch under cProfile with the thread's CPU clock: self CPU time per request
    by package and the top functions (this thread only; profiling slows Python code, so read
    shares, not absolutes)."""
    import cProfile
    import pstats

    prof = cProfile.Profile(time.thread_time)  # CPU time: waiting for the server is not cost
    prof.enable()
    elapsed, _ = run()
    prof.disable()
    entries = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1e-9
    by_package: dict[str, float] = {}
    funcs = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in entries.items():
        pkg = _package(filename)
        by_package[pkg] = by_package.get(pkg, 0.0) + tt
        short = filename.rsplit("/", 1)[-1]
        funcs.append((tt, ct, nc, f"{pkg}: {short}:{line} {func}"))
    funcs.sort(reverse=True)
    return {
        "requests": n,
        "profiled_elapsed_s": elapsed,
        "self_us_per_request_total": total / n * 1e6,
        "by_package": sorted(
            ({"package": k, "self_us": v / n * 1e6, "share": v / total}
             for k, v in by_package.items()),
            key=lambda d: -float(d["self_us"]),  # type: ignore[arg-type]
        )[:top],
        "functions": [
            {"function": name, "self_us": tt / n * 1e6, "cum_us": ct / n * 1e6,
             "calls_per_request": nc / n}
            for tt, ct, nc, name in funcs[:top]
        ],
    }  # fmt: skip


def _runner(
    variant: Variant, loop: asyncio.AbstractEventLoop, shape: str, n: int, concurrency: int
) -> Callable[[], tuple[float, list[float]]]:
    """The batch of one command, ready to run (the clients exist once it returns)."""
    if shape == "sync":
        sync = variant.sync_call()
        return lambda: timed_sync(sync, n)
    acall = loop.run_until_complete(variant.async_call(concurrency))
    if shape == "rate":
        return lambda: loop.run_until_complete(timed_rate(acall, n, concurrency))
    return lambda: loop.run_until_complete(timed_async(acall, n, concurrency))


def main() -> None:
    spec = json.loads(sys.argv[1])
    loop = asyncio.new_event_loop()
    variant = Variant(spec)
    out = sys.stdout
    sys.stdout = sys.stderr  # stdout carries the replies only

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        deadline = time.monotonic() + 60
        while True:  # the first request may wait for config / connections
            try:
                variant.sync_call()()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        reply({"ready": True, "metric_series": variant.metric_series()})
    except Exception:
        reply({"error": traceback.format_exc()})
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("stop"):
            break
        try:
            n = cmd["n"]
            run = _runner(variant, loop, cmd["shape"], n, cmd.get("concurrency", 1))
            if cmd.get("profile"):
                reply({"profile": profiled(run, n, int(cmd["profile"]))})
            else:
                elapsed, lat = run()
                reply({"elapsed": elapsed, "lat": lat})
        except Exception:
            reply({"error": traceback.format_exc()})
    loop.run_until_complete(variant.aclose())
    loop.close()


if __name__ == "__main__":
    main()
