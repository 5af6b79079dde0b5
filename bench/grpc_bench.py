"""Benchmark: plain grpcio channel vs grpcio's C-core ``xds:///`` channel vs pymesh's channel.

Run: ``/work/venv/bin/python bench/grpc_bench.py [--rounds 5] [--calls 2000]``

One backend (a grpcio server in a subprocess, so its CPU is not the client's) behind the
embedded control plane (a ServiceEntry with that one endpoint, Istio's default routes). Three
clients call the same unary method:

- ``plain``: ``grpc.insecure_channel("127.0.0.1:PORT")``, no mesh at all;
- ``cxds``: ``grpc.insecure_channel("xds:///echo...:7070")``, grpcio's own xDS client;
- ``pymesh``: ``pymesh.grpc.insecure_channel("xds:///echo...:7070")``.

Two workloads: sync sequential unary calls, and grpc.aio with 16 calls in flight. Rounds are
interleaved (plain, cxds, pymesh, plain, ...) so machine noise hits all three alike; the
report gives per client the median throughput over rounds, the median client CPU time per
call (``time.process_time``: less sensitive than wall-clock throughput to other processes on
a shared machine), p50/p99 latency, and the ratios pymesh/plain (target >= 0.85) and
pymesh/cxds (target >= 0.90): of the medians, and the median of the per-round ratios (each
round's three clients ran back to back under the same load).

``--overhead``: pymesh's own Python per call, steady even on a loaded machine (thread CPU
time, best of 5 batches of 20,000 calls): each endpoint's grpcio multicallable is replaced
by a stub answering at once, so what is timed is the adapter plus the policy core's flow
(route, cluster, x-request-id, deadlines, host pick, limits, outcome, result), sync and aio;
and the flow alone, driven by hand. On real sockets the same Python costs 2-4 times more
(caches shared with grpcio's C-core): the mode also times, in 9 interleaved rounds, plain
grpcio calls alone and each followed by a stubbed pymesh call (sync, and aio with 16 in
flight), and prints the difference (thread CPU, paired median): pymesh's Python between real
calls. Compare code trees with these, not with grpcio. ``--overhead --baseline DIR``: the
same, alternated in fresh processes with pymesh imported from ``DIR`` (another tree's
``pymesh/`` package), and the ratios new/base.

``--count-calls``: the function calls per awaited aio call (``sys.setprofile`` over 1,000
calls): in all, and pymesh's own with their list (``PYTHONPATH=DIR`` counts another tree).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = "echo.default.svc.cluster.local"
PORT = 7070
METHOD = "/echo.Echo/Who"

SERVER = textwrap.dedent(
    """
    import sys, grpc
    from concurrent import futures
    def who(request, context):
        return b"ok"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "echo.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(None)
    """
)

MESH = textwrap.dedent(
    f"""
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: echo, namespace: default}}
    spec:
      hosts: [{HOST}]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{{number: {PORT}, name: grpc, protocol: GRPC}}]
      endpoints:
      - {{address: 127.0.0.1, ports: {{grpc: BACKEND_PORT}}}}
    """
)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Result = tuple[float, float, list[float]]  # calls/s, client CPU s per call, latencies


def sync_round(call: Callable[..., Any], calls: int) -> Result:
    latencies = []
    clock = time.perf_counter
    cpu = time.process_time()
    start = clock()
    for _ in range(calls):
        t = clock()
        call(b"hi", timeout=10)
        latencies.append(clock() - t)
    elapsed = clock() - start
    return calls / elapsed, (time.process_time() - cpu) / calls, latencies


async def aio_round(call: Any, calls: int, concurrency: int) -> Result:
    latencies: list[float] = []
    clock = time.perf_counter
    per_worker = calls // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            t = clock()
            await call(b"hi", timeout=10)
            latencies.append(clock() - t)

    cpu = time.process_time()
    start = clock()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    n = per_worker * concurrency
    return n / (clock() - start), (time.process_time() - cpu) / n, latencies


Results = dict[str, tuple[list[float], list[float], list[float]]]


def report(title: str, results: Results) -> None:
    print(f"\n{title}")
    print(f"{'client':8} {'calls/s (median)':>17} {'CPU us/call':>12} {'p50 us':>8} {'p99 us':>8}")
    rate, cpu = {}, {}
    for name, (rates, cpus, lats) in results.items():
        rate[name] = statistics.median(rates)
        cpu[name] = statistics.median(cpus)
        print(
            f"{name:8} {rate[name]:17.0f} {cpu[name] * 1e6:12.0f} "
            f"{_percentile(lats, 0.5) * 1e6:8.0f} {_percentile(lats, 0.99) * 1e6:8.0f}"
        )
    print(
        f"throughput: pymesh/plain = {rate['pymesh'] / rate['plain']:.2f}  "
        f"pymesh/cxds = {rate['pymesh'] / rate['cxds']:.2f}"
    )
    # The same ratios taken round by round (the three clients of a round ran back to back,
    # under the same machine load), then the median: steadier on a shared machine.
    paired = {
        other: statistics.median(
            p / o for p, o in zip(results["pymesh"][0], results[other][0], strict=True)
        )
        for other in ("plain", "cxds")
    }
    print(
        f"throughput, median of per-round ratios: pymesh/plain = {paired['plain']:.2f}  "
        f"pymesh/cxds = {paired['cxds']:.2f}"
    )
    print(
        f"CPU per call (inverse ratio): plain/pymesh = {cpu['plain'] / cpu['pymesh']:.2f}  "
        f"cxds/pymesh = {cpu['cxds'] / cpu['pymesh']:.2f}"
    )


OVERHEAD_CALLS = 20_000


def _best(run: Callable[[], None], calls: int = OVERHEAD_CALLS) -> float:
    """Thread CPU seconds per call of ``run`` (``calls`` calls), best of 5 batches."""
    best = math.inf
    for _ in range(5):
        t = time.thread_time()
        run()
        best = min(best, (time.thread_time() - t) / calls)
    return best


def overhead(target: str, client: Any, plain_target: str) -> None:
    """Print pymesh's own CPU per call with the grpcio attempt replaced by a stub: hot, and
    between real grpcio calls to ``plain_target``."""
    import grpc
    import grpc.aio

    import pymesh.grpc
    import pymesh.grpc.aio
    from pymesh.core.flow import AttemptResult, call_flow
    from pymesh.grpc._channel import OK

    def stub(request: Any, timeout: Any = None, metadata: Any = None, **kwargs: Any) -> Any:
        return b"ok"

    class Done:
        def __await__(self) -> Any:
            return b"ok"
            yield  # a generator: an awaitable that is done at once

    def astub(request: Any, timeout: Any = None, metadata: Any = None, **kwargs: Any) -> Any:
        return Done()

    channel = pymesh.grpc.insecure_channel(target, xds_client=client)
    call = channel.unary_unary(METHOD, None, None)
    for _ in range(50):  # config, subchannel, multicallable
        call(b"hi", timeout=20)
    spec = call._spec  # type: ignore[attr-defined]
    for key in list(spec.mcs):
        spec.mcs[key] = stub

    def sync_calls() -> None:
        for _ in range(OVERHEAD_CALLS):
            call(b"hi", timeout=10)

    sync_us = _best(sync_calls) * 1e6
    mesh = channel._mesh  # type: ignore[attr-defined]
    snapshot = mesh.handle.current()
    info = mesh.request_info_of(spec, None, 10, snapshot)
    answer = AttemptResult(OK, (b"ok", None))

    def flows() -> None:
        for _ in range(OVERHEAD_CALLS):
            flow = call_flow(mesh.runtime, snapshot, info, clock=time.monotonic)
            next(flow)
            try:
                flow.send(answer)
            except StopIteration as stop:
                stop.value.release()

    flow_us = _best(flows) * 1e6
    plain_channel = grpc.insecure_channel(plain_target)
    plain = plain_channel.unary_unary(METHOD, None, None)

    def plain_only() -> None:
        for _ in range(SITU_CALLS):
            plain(b"hi", timeout=10)

    def plain_and_pymesh() -> None:
        for _ in range(SITU_CALLS):
            call(b"hi", timeout=10)
            plain(b"hi", timeout=10)

    plain_only()  # warm up
    sync_situ = _paired(plain_only, plain_and_pymesh)
    plain_channel.close()
    channel.close()

    async def aio() -> tuple[float, float]:
        achannel = pymesh.grpc.aio.insecure_channel(target, xds_client=client)
        acall = achannel.unary_unary(METHOD, None, None)
        for _ in range(50):
            await acall(b"hi", timeout=20)
        aspec = acall._spec  # type: ignore[attr-defined]
        for key in list(aspec.mcs):
            aspec.mcs[key] = astub
        best = math.inf
        for _ in range(5):
            t = time.thread_time()
            for _ in range(OVERHEAD_CALLS):
                await acall(b"hi", timeout=10)
            best = min(best, (time.thread_time() - t) / OVERHEAD_CALLS)
        plain_channel = grpc.aio.insecure_channel(plain_target)
        plain = plain_channel.unary_unary(METHOD, None, None)

        async def both() -> None:
            await acall(b"hi", timeout=10)
            await plain(b"hi", timeout=10)

        async def batch(one: Callable[[], Any]) -> float:
            left = SITU_CALLS

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await one()

            t = time.thread_time()
            await asyncio.gather(*(worker() for _ in range(16)))
            return (time.thread_time() - t) / SITU_CALLS

        await batch(lambda: plain(b"hi", timeout=10))  # warm up
        diffs = []
        for _ in range(SITU_ROUNDS):
            alone = await batch(lambda: plain(b"hi", timeout=10))
            diffs.append(await batch(both) - alone)
        await plain_channel.close(None)
        await achannel.close(None)
        return best * 1e6, statistics.median(diffs) * 1e6

    aio_us, aio_situ = asyncio.run(aio())
    print(
        "pymesh per call, grpcio attempt stubbed (thread CPU, best of 5 x "
        f"{OVERHEAD_CALLS}): sync {sync_us:.1f} us, aio {aio_us:.1f} us, "
        f"flow alone {flow_us:.1f} us"
    )
    print(
        "the same between real grpcio calls (paired median of "
        f"{SITU_ROUNDS} rounds x {SITU_CALLS}): sync +{sync_situ:.1f} us, "
        f"aio 16 in flight +{aio_situ:.1f} us"
    )


async def count_calls(target: str, client: Any, calls: int = 1000) -> None:
    """Print the function calls per awaited aio call (Python functions, and built-ins
    called from pymesh's code), counted with ``sys.setprofile`` around each call."""
    import collections

    import pymesh
    import pymesh.grpc.aio

    root = str(Path(pymesh.__file__).resolve().parent.parent) + "/"
    this = __file__
    channel = pymesh.grpc.aio.insecure_channel(target, xds_client=client)
    call = channel.unary_unary(METHOD, None, None)
    for _ in range(200):
        await call(b"hi", timeout=20)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        name = frame.f_code.co_filename
        if name == this:
            return  # the counting coroutines themselves
        mine = name.startswith(root + "pymesh/")
        if event == "call":
            where = name.removeprefix(root) if mine else "python"
            counts[(where, frame.f_code.co_name)] += 1
        elif event == "c_call":
            counts[("built-in, from pymesh" if mine else "built-in", arg.__qualname__)] += 1

    async def one() -> None:
        sys.setprofile(profile)
        await call(b"hi", timeout=10)
        sys.setprofile(None)

    for _ in range(calls):
        await one()
    total = sum(counts.values()) / calls
    own = sum(v for k, v in counts.items() if k[0].startswith("pymesh/")) / calls
    own_c = sum(v for k, v in counts.items() if k[0] == "built-in, from pymesh") / calls
    print(f"{root}: per aio call {total:.1f} function calls in all (asyncio, grpc.aio included);")
    print(f"pymesh's own: {own:.1f} Python functions, {own_c:.1f} built-in calls from its code")
    for (where, name), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        if where.startswith("pymesh/") or where == "built-in, from pymesh":
            print(f"  {n / calls:5.2f}  {where}: {name}")
    await channel.close(None)


SITU_CALLS = 2000
SITU_ROUNDS = 9


def _paired(alone: Callable[[], None], both: Callable[[], None]) -> float:
    """Median over rounds of (thread CPU per call of ``both`` - of ``alone``), us."""
    diffs = []
    for _ in range(SITU_ROUNDS):
        t = time.thread_time()
        alone()
        a = time.thread_time() - t
        t = time.thread_time()
        both()
        diffs.append((time.thread_time() - t - a) / SITU_CALLS)
    return statistics.median(diffs) * 1e6


_FIGURES = (
    ("sync", r"sync ([0-9.]+) us"),
    ("aio", r"aio ([0-9.]+) us"),
    ("flow", r"flow alone ([0-9.]+) us"),
    ("sync situ", r"sync \+([-0-9.]+) us"),
    ("aio situ", r"aio 16 in flight \+([-0-9.]+) us"),
)


def _overhead_ab(baseline: str, runs: int) -> None:
    """``--overhead`` of this tree and of ``baseline``'s pymesh, alternated in fresh
    processes; prints every run and the ratios of the medians (new / base)."""
    import re

    figures: dict[str, dict[str, list[float]]] = {"new": {}, "base": {}}
    for i in range(runs):
        order = ("new", "base") if i % 2 == 0 else ("base", "new")
        for tree in order:
            env = dict(os.environ)
            if tree == "base":
                env["PYTHONPATH"] = baseline
            out = subprocess.run(
                [sys.executable, __file__, "--overhead"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            print(f"run {i + 1} {tree}: " + " | ".join(out.strip().splitlines()), flush=True)
            for name, pattern in _FIGURES:
                found = re.search(pattern, out)
                if found:
                    figures[tree].setdefault(name, []).append(float(found.group(1)))
    print("\nmedians (us per call) new / base, ratio new/base:")
    for name, _ in _FIGURES:
        new, base = figures["new"].get(name), figures["base"].get(name)
        if new and base:
            n, b = statistics.median(new), statistics.median(base)
            print(f"  {name:10} {n:7.1f} / {b:7.1f}  {n / b if b else math.nan:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--overhead", action="store_true", help="only pymesh's own CPU per call (see above)"
    )
    parser.add_argument(
        "--baseline",
        help="with --overhead: A/B against pymesh imported from this directory (a copy of"
        " another tree's pymesh/ package): --ab-runs runs of each, alternated, in fresh"
        " processes, and the ratios new/base",
    )
    parser.add_argument("--ab-runs", type=int, default=3)
    parser.add_argument(
        "--count-calls",
        action="store_true",
        help="count the function calls of 1,000 awaited aio calls (sys.setprofile): per call,"
        " in all and pymesh's own, with the list of pymesh's",
    )
    args = parser.parse_args()
    if args.overhead and args.baseline:
        _overhead_ab(str(Path(args.baseline).resolve()), args.ab_runs)
        return

    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None and server.stdin is not None
    backend_port = int(server.stdout.readline())
    tmp = Path(tempfile.mkdtemp(prefix="grpc-bench-"))
    (tmp / "mesh").mkdir()
    (tmp / "mesh" / "echo.yaml").write_text(MESH.replace("BACKEND_PORT", str(backend_port)))

    import grpc
    import grpc.aio

    import pymesh.grpc
    import pymesh.grpc.aio
    from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
    from pymesh.controlplane import ControlPlane
    from pymesh.xds.client import XdsClient

    cp = ControlPlane([tmp / "mesh"], xds_address="127.0.0.1:0", admin_port=None).start()
    bootstrap = generate_bootstrap(xds_address=cp.address, namespace="default")
    (tmp / "bootstrap.json").write_text(json.dumps(bootstrap))
    # grpcio's xDS client reads the bootstrap when its first xds: channel is created.
    os.environ["GRPC_XDS_BOOTSTRAP"] = str(tmp / "bootstrap.json")
    client = XdsClient(parse_bootstrap(json.dumps(bootstrap), source="bench"))
    target = f"xds:///{HOST}:{PORT}"
    try:
        if args.overhead:
            overhead(target, client, f"127.0.0.1:{backend_port}")
            return
        if args.count_calls:
            asyncio.run(count_calls(target, client))
            return
        channels = {
            "plain": grpc.insecure_channel(f"127.0.0.1:{backend_port}"),
            "cxds": grpc.insecure_channel(target),
            "pymesh": pymesh.grpc.insecure_channel(target, xds_client=client),
        }
        calls = {n: c.unary_unary(METHOD, None, None) for n, c in channels.items()}
        for call in calls.values():  # warm up (config, connections)
            for _ in range(200):
                call(b"hi", timeout=20)
        results: Results = {n: ([], [], []) for n in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                rate, cpu, lats = sync_round(call, args.calls)
                results[name][0].append(rate)
                results[name][1].append(cpu)
                results[name][2].extend(lats)
        report(f"sync sequential unary ({args.rounds} rounds x {args.calls} calls)", results)
        for ch in channels.values():
            ch.close()

        async def aio_main() -> None:
            achannels = {
                "plain": grpc.aio.insecure_channel(f"127.0.0.1:{backend_port}"),
                "cxds": grpc.aio.insecure_channel(target),
                "pymesh": pymesh.grpc.aio.insecure_channel(target, xds_client=client),
            }
            acalls = {n: c.unary_unary(METHOD, None, None) for n, c in achannels.items()}
            for call in acalls.values():
                for _ in range(200):
                    await call(b"hi", timeout=20)
            res: Results = {n: ([], [], []) for n in acalls}
            for _ in range(args.rounds):
                for name, call in acalls.items():
                    rate, cpu, lats = await aio_round(call, args.calls, args.concurrency)
                    res[name][0].append(rate)
                    res[name][1].append(cpu)
                    res[name][2].extend(lats)
            report(
                f"aio unary, {args.concurrency} in flight "
                f"({args.rounds} rounds x {args.calls} calls)",
                res,
            )
            for ch in achannels.values():
                await ch.close(None)

        asyncio.run(aio_main())
    finally:
        client.close()
        cp.stop()
        server.stdin.close()
        server.wait(10)


if __name__ == "__main__":
    main()
