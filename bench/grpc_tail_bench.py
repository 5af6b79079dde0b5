"""Benchmark: the tail latency of plain grpc.aio vs pymesh's aio channel at a fixed rate.

Run: ``nice -n 10 /work/venv/bin/python bench/grpc_tail_bench.py [--rounds 7] [--calls 3000]``

The suite's "aio 16 conns at 1000 rps" shape (``bench/suite/worker.py``'s ``timed_rate``,
fortio ``-qps 1000 -c 16``: each of 16 connections sends every 16 ms and waits for its
answer), one grpcio upstream in a subprocess behind the embedded control plane, every client
in its own process built by the suite's own ``Variant`` (so each is exactly the suite's
client: a sync call first, then the aio channel). Variants:

- ``grpcio``: plain ``grpc.aio.insecure_channel("127.0.0.1:PORT")``;
- ``grpcio+bg``: the same plain aio channel in a process that also runs pymesh's
  background (an ``XdsClient`` and the sync mesh channel of the readiness call): what the
  mesh's threads alone cost the plain channel's tail;
- ``pymesh``: ``pymesh.grpc.aio.insecure_channel("xds:///...")`` (no telemetry, as the suite);
- ``grpcio+cpu``: the plain channel, each call preceded by ``--busy-us`` of pure-Python work
  on the loop's thread: the tail that this much per-call CPU alone adds (queueing).

Rounds are interleaved (the order rotates each round). Per variant the report gives the
median over rounds of p50/p90/p99/p99.9 (and each percentile minus grpcio's in the same
round, then the median: the *added* latency), client CPU per call, the event loop's lateness
when a send was due (a stall of the loop shows there whatever the call does), and per 10,000
calls: garbage collections by generation and their time, and the CPU time of every other
thread of the process (by thread name, from /proc/self/task).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QPS = 1000
CONCURRENCY = 16
_TICKS = os.sysconf("SC_CLK_TCK")


# -- the worker (one client process) -------------------------------------------------------


def _thread_cpu() -> dict[str, float]:
    """CPU seconds so far of every thread of this process but the main one, by name."""
    import threading

    named = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    me = os.getpid()
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me:
            continue
        try:
            text = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = named.get(int(tid)) or text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICKS
    return out


class _GcStats:
    """Collections by generation and their wall time, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.time = [0.0, 0.0, 0.0]
        self.max = 0.0
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
            return
        took = time.perf_counter() - self._t
        gen = info["generation"]
        self.count[gen] += 1
        self.time[gen] += took
        self.max = max(self.max, took)


async def _rate(call: Callable[[], Awaitable[Any]], n: int) -> tuple[list[float], list[float]]:
    """The suite's ``timed_rate`` (latencies), also recording how late each send was."""
    from bench.suite.worker import timed_rate

    late: list[float] = []
    _, lat = await timed_rate(call, n, CONCURRENCY, QPS, late)
    return lat, late


def _calibrate(seconds: float) -> int:
    """Iterations of an empty ``for`` loop that take ``seconds`` of this thread's CPU."""
    k = 100_000
    best = min(_spin_time(k) for _ in range(5))
    return max(1, round(k * seconds / best))


def _spin_time(k: int) -> float:
    t = time.thread_time()
    for _ in range(k):
        pass
    return time.thread_time() - t


def worker_main(spec: dict[str, Any]) -> None:
    sys.path.insert(0, str(REPO))
    if spec.get("tree"):  # pymesh from another source tree (--baseline), the rest from here
        sys.path.insert(0, spec["tree"])
    from bench.suite.worker import Variant

    variant = Variant(spec)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    for _ in range(600):  # the first request may wait for config / connections
        try:
            variant.sync_call()()
            break
        except Exception:
            time.sleep(0.1)
    if spec.get("plain_aio"):  # the plain aio channel in a process running the mesh
        import grpc.aio

        async def make() -> Callable[[], Awaitable[Any]]:
            channel = grpc.aio.insecure_channel(spec["plain_aio"])
            variant._closers.append(lambda: channel.close(None))
            stub = channel.unary_unary(spec["method"], None, None)
            return lambda: stub(b"hi", timeout=10)

        acall = loop.run_until_complete(make())
    else:
        acall = loop.run_until_complete(variant.async_call(CONCURRENCY))
    busy = spec.get("busy_us", 0) / 1e6
    if busy:  # the plain call after this much pure-Python work on the loop's thread
        plain_call = acall

        spins = _calibrate(busy)

        def acall() -> Awaitable[Any]:
            for _ in range(spins):
                pass
            return plain_call()

    stats = _GcStats()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("stop"):
            break
        n = cmd["n"]
        stats.__init__()  # type: ignore[misc]
        gc.callbacks.append(stats)
        threads = _thread_cpu()
        cpu = time.process_time()
        main_cpu = time.thread_time()
        lat, late = loop.run_until_complete(_rate(acall, n))
        main_cpu = time.thread_time() - main_cpu
        cpu = time.process_time() - cpu
        after = _thread_cpu()
        gc.callbacks.remove(stats)
        others = {k: v - threads.get(k, 0.0) for k, v in after.items()}
        reply = {
            "lat": lat,
            "late": late,
            "cpu": cpu,
            "main_cpu": main_cpu,
            "gc_count": stats.count,
            "gc_time": stats.time,
            "gc_max": stats.max,
            "threads": {k: v for k, v in others.items() if v > 0},
            "nthreads": len(after) + 1,
        }
        print(json.dumps(reply), flush=True)
    loop.run_until_complete(variant.aclose())
    loop.close()


# -- the driver ------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


QS = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3000, help="calls per batch (3 s)")
    parser.add_argument(
        "--variants", default="grpcio,grpcio+bg,pymesh,grpcio+cpu", help="comma-separated subset"
    )
    parser.add_argument(
        "--busy-us",
        type=float,
        default=40.0,
        help="grpcio+cpu: pure-Python work per call on the loop's thread, us (pymesh's own"
        " Python per call between real calls is about this: grpc_bench.py --overhead)",
    )
    parser.add_argument(
        "--baseline",
        help="A/B: also run variant 'pymesh@base', pymesh imported from this directory (a"
        " copy of another tree's pymesh/ package, e.g. `git archive REV pymesh | tar -x -C"
        " DIR`), interleaved with the others",
    )
    parser.add_argument("--save", help="write every round's raw figures to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return

    sys.path.insert(0, str(REPO))
    from bench import grpc_bench
    from pymesh.bootstrap import generate_bootstrap
    from pymesh.controlplane import ControlPlane

    server = subprocess.Popen(
        [sys.executable, "-c", grpc_bench.SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdin is not None
    port = int(server.stdout.readline())
    tmp = Path(tempfile.mkdtemp(prefix="grpc-tail-"))
    (tmp / "mesh").mkdir()
    (tmp / "mesh" / "echo.yaml").write_text(grpc_bench.MESH.replace("BACKEND_PORT", str(port)))
    cp = ControlPlane([tmp / "mesh"], xds_address="127.0.0.1:0", admin_port=None).start()
    bootstrap = tmp / "bootstrap.json"
    bootstrap.write_text(
        json.dumps(generate_bootstrap(xds_address=cp.address, namespace="default"))
    )
    base = {"kind": "grpc", "method": grpc_bench.METHOD}
    mesh_target = f"xds:///{grpc_bench.HOST}:{grpc_bench.PORT}"
    plain = f"127.0.0.1:{port}"
    specs = {
        "grpcio": {**base, "target": plain},
        "grpcio+bg": {
            **base,
            "target": mesh_target,
            "bootstrap": str(bootstrap),
            "plain_aio": plain,
        },
        "pymesh": {**base, "target": mesh_target, "bootstrap": str(bootstrap)},
        "grpcio+cpu": {**base, "target": plain, "busy_us": args.busy_us},
    }
    names = [v for v in args.variants.split(",") if v]
    if args.baseline:
        specs["pymesh@base"] = {**specs["pymesh"], "tree": str(Path(args.baseline).resolve())}
        names.append("pymesh@base")
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for name in names:
            procs[name] = subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(specs[name])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=str(REPO),
            )
        for name, proc in procs.items():
            assert proc.stdout is not None
            if not json.loads(proc.stdout.readline()).get("ready"):
                raise RuntimeError(f"{name}: not ready")

        def run(name: str, n: int) -> dict[str, Any]:
            proc = procs[name]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps({"n": n}) + "\n")
            proc.stdin.flush()
            reply: dict[str, Any] = json.loads(proc.stdout.readline())
            return reply

        for name in names:  # warm-up
            run(name, 1000)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for r in range(args.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                rounds[name].append(run(name, args.calls))
            print(f"round {r + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f})", flush=True)
        _report(rounds, args.calls)
        if args.save:
            Path(args.save).write_text(json.dumps(rounds))
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                try:
                    proc.stdin.write(json.dumps({"stop": True}) + "\n")
                    proc.stdin.close()
                except OSError:
                    pass
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        cp.stop()
        server.stdin.close()
        server.wait(10)


def _report(rounds: dict[str, list[dict[str, Any]]], calls: int) -> None:
    med = statistics.median
    base = rounds.get("grpcio")
    print(
        f"\naio, {CONCURRENCY} conns at {QPS} rps, {len(next(iter(rounds.values())))} rounds "
        f"x {calls} calls; latency ms: median over rounds (added: median of per-round "
        "differences to grpcio)"
    )
    header = f"{'variant':10}" + "".join(f"{q:>8}" for q, _ in QS)
    header += "".join(f"{'+' + q:>9}" for q, _ in QS) + f"{'cpu us':>8}{'main us':>8}"
    header += f"{'late99':>8}{'late999':>8}"
    print(header)
    for name, rs in rounds.items():
        line = f"{name:10}"
        for _, q in QS:
            line += f"{med(_pct(r['lat'], q) for r in rs) * 1e3:8.3f}"
        for _, q in QS:
            if base is None:
                line += f"{'':>9}"
                continue
            diffs = [_pct(r["lat"], q) - _pct(b["lat"], q) for r, b in zip(rs, base, strict=True)]
            line += f" {med(diffs) * 1e3:+8.3f}"
        line += f"{med(r['cpu'] / calls for r in rs) * 1e6:8.0f}"
        line += f"{med(r['main_cpu'] / calls for r in rs) * 1e6:8.0f}"
        line += f"{med(_pct(r['late'], 0.99) for r in rs) * 1e3:8.3f}"
        line += f"{med(_pct(r['late'], 0.999) for r in rs) * 1e3:8.3f}"
        print(line)
    if "pymesh@base" in rounds and "pymesh" in rounds:
        print("\nA/B, pymesh vs pymesh@base (median of per-round differences, ms):", end="")
        for q, v in QS:
            diffs = [
                _pct(r["lat"], v) - _pct(b["lat"], v)
                for r, b in zip(rounds["pymesh"], rounds["pymesh@base"], strict=True)
            ]
            print(f" {q} {med(diffs) * 1e3:+.3f}", end="")
        ratio = med(r["main_cpu"] for r in rounds["pymesh"]) / med(
            b["main_cpu"] for b in rounds["pymesh@base"]
        )
        print(f"; loop CPU per call pymesh/base = {ratio:.3f}")
    print("\nper 10,000 calls (median over rounds): GC gen0/gen1/gen2 count, GC ms, max GC ms;")
    print("other threads' CPU ms by name")
    for name, rs in rounds.items():
        scale = 10_000 / calls
        counts = "/".join(f"{med(r['gc_count'][g] for r in rs) * scale:.0f}" for g in range(3))
        gc_ms = med(sum(r["gc_time"]) for r in rs) * scale * 1e3
        gc_max = med(r["gc_max"] for r in rs) * 1e3
        threads: dict[str, list[float]] = {}
        for r in rs:
            for t, v in r["threads"].items():
                threads.setdefault(t, []).append(v)
        tcpu = ", ".join(
            f"{t} {sum(v) / len(rs) * scale * 1e3:.0f}"
            for t, v in sorted(threads.items(), key=lambda kv: -sum(kv[1]))
        )
        print(
            f"{name:10} gc {counts} {gc_ms:.1f} ms (max {gc_max:.2f}); "
            f"threads {rs[0]['nthreads']}: {tcpu}"
        )


if __name__ == "__main__":
    main()
