"""pymesh.grpc with telemetry on vs off, side by side (not a timed test).

"On" is issue 7's budget, as ``bench/telemetry_bench.py`` defines it (its
``make_telemetry``): Istio's request metrics, access logs (Envoy's text format, every
call, written to a file by telemetry's writer thread), traces sampled at 1% (spans to an
in-memory exporter), and the metadata exchange. The mesh, backend and workloads are
``bench/grpc_bench.py``'s (embedded control plane, one endpoint, unary calls; sync
sequential, and grpc.aio with 16 in flight), except that the backend (grpcio, in a
subprocess) answers a caller that sent ``x-envoy-peer-metadata-id`` with an exchange in
its initial metadata, as a pymesh or Envoy server does, so the client's reading of the
answer is paid for too.

One channel per workload; telemetry is installed / uninstalled between rounds, which are
interleaved (off, on, off, on, ...: both see the same machine noise). Printed: medians
over rounds of throughput and of process CPU per call (every thread: grpcio's, the access
log writer's), and the on/off ratios: of the medians and the median of per-round ratios
(each pair of rounds ran back to back). ``--parts`` adds variants with one part of "on"
switched off each, to attribute the cost.

The server side: ``--server`` runs two pymesh gRPC servers (sync, xDS-managed) in
subprocesses, one with that telemetry installed, one without, each called by a plain
grpcio client in interleaved rounds; server CPU per call is read from ``/proc``.

    python bench/grpc_telemetry_bench.py [--rounds 7] [--calls 2000] [--parts] [--server]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from grpc_bench import HOST, MESH, METHOD, PORT, SERVER, aio_round, sync_round
from telemetry_bench import make_telemetry, make_variants

from pymesh import telemetry
from pymesh.telemetry import _grpc

ASK_EVERY_CALL = "on, ask every call"
"""Variant: "on" with the exchange asking the server on every call (before 2698cad)."""
LEARNED_FOR = getattr(_grpc, "LEARNED_FOR", 10.0)


def use(name: str, tel: telemetry.Telemetry | None) -> None:
    """Install variant ``name``'s telemetry (``None``: off)."""
    _grpc.LEARNED_FOR = 0.0 if name == ASK_EVERY_CALL else LEARNED_FOR
    getattr(_grpc, "_LEARNED", {}).clear()
    if tel is None:
        telemetry.uninstall()
    else:
        telemetry.install(tel)


_WHO = """def who(request, context):
    return b"ok"
"""
assert _WHO in SERVER
BACKEND = SERVER.replace(
    _WHO,
    """ANSWER = (("x-envoy-peer-metadata-id", "sidecar~127.0.0.1~echo-0.default~default.svc"),
          ("baggage", "k8s.namespace.name=default,k8s.deployment.name=echo-v1"))
def who(request, context):
    for key, _ in context.invocation_metadata():
        if key == "x-envoy-peer-metadata-id":
            context.send_initial_metadata(ANSWER)
            break
    return b"ok"
""",
)
"""grpc_bench's backend, answering the metadata exchange (see the module docstring)."""

MESH_SERVER = textwrap.dedent(
    """
    import json, sys, grpc
    from concurrent import futures
    import pymesh.grpc
    from pymesh.bootstrap import parse_bootstrap
    from pymesh.xds.client import XdsClient
    sys.path.insert(0, sys.argv[3])
    from telemetry_bench import make_telemetry, make_variants
    from pymesh import telemetry
    xds = XdsClient(parse_bootstrap(open(sys.argv[1]).read(), source="bench"))
    if sys.argv[2] == "on":
        telemetry.install(make_telemetry(xds, open(sys.argv[1] + ".log", "w")))
    def who(request, context):
        return b"ok"
    server = pymesh.grpc.server(futures.ThreadPoolExecutor(max_workers=16), xds_client=xds,
        handlers=[grpc.method_handlers_generic_handler(
            "echo.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    assert server.wait_for_serving(60)
    print("serving", flush=True)
    sys.stdin.read()
    server.stop(None)
    """
)
"""A pymesh sync gRPC server (argv: bootstrap file, telemetry "on"/"off", bench dir)."""

SERVER_MESH = textwrap.dedent(
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: NAME, namespace: default}
    spec:
      hosts: [NAME.default.svc.cluster.local]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 7070, name: grpc, protocol: GRPC}]
      endpoints:
      - {address: 127.0.0.1, ports: {grpc: BACKEND_PORT}, labels: {app: NAME}}
    """
)

Rounds = dict[str, tuple[list[float], list[float]]]  # variant: (calls/s, CPU s per call)


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(title: str, rounds: Rounds) -> list[str]:
    off_rate, off_cpu = rounds["off"]
    lines = [
        title,
        f"{'variant':18} {'calls/s':>8} {'CPU us/call':>12} {'rate on/off':>12} "
        f"{'paired':>7} {'CPU on/off':>11}",
    ]
    for name, (rate, cpu) in rounds.items():
        paired = statistics.median(a / b for a, b in zip(rate, off_rate, strict=True))
        lines.append(
            f"{name:18} {statistics.median(rate):8.0f} {statistics.median(cpu) * 1e6:12.1f} "
            f"{statistics.median(rate) / statistics.median(off_rate):12.3f} {paired:7.3f} "
            f"{statistics.median(cpu) / statistics.median(off_cpu):11.3f}"
        )
    return lines


def variants(xds: Any, log: Any, parts: bool) -> dict[str, telemetry.Telemetry | None]:
    """off, on, on asking every call; with ``parts``: telemetry_bench's variants too (one
    part of "on" off at a time)."""
    out: dict[str, telemetry.Telemetry | None] = {
        "off": None,
        "on": make_telemetry(xds, log),
        ASK_EVERY_CALL: make_telemetry(xds, log),
    }
    if parts:
        for name, tel in make_variants(xds, log).items():
            if name in out:
                if tel is not None:
                    tel.close()
            else:
                out[name] = tel
    return out


def client_side(args: argparse.Namespace, tmp: Path) -> list[str]:
    import grpc  # noqa: F401 - grpcio first, as the application would

    import pymesh.grpc
    import pymesh.grpc.aio

    stack = contextlib.ExitStack()
    xds, log, tels = stack.enter_context(_bench_mesh(tmp, "client", args.parts))
    target = f"xds:///{HOST}:{PORT}"
    lines: list[str] = []

    def run(one: Callable[[], tuple[float, float, list[float]]]) -> Rounds:
        out: Rounds = {name: ([], []) for name in tels}
        for _ in range(args.rounds):
            for name, tel in tels.items():
                use(name, tel)
                cpu = time.process_time()
                rate, _, _ = one()
                n = args.calls
                out[name][0].append(rate)
                out[name][1].append((time.process_time() - cpu) / n)
            log.flush()
        telemetry.uninstall()
        return out

    try:
        channel = pymesh.grpc.insecure_channel(target, xds_client=xds)
        call = channel.unary_unary(METHOD, None, None)
        for name, tel in tels.items():  # warm up each variant (config, connection, caches)
            use(name, tel)
            for _ in range(300):
                call(b"hi", timeout=20)
        if not args.aio_only:
            rounds = run(lambda: sync_round(call, args.calls))
            title = f"sync sequential ({args.rounds} rounds x {args.calls} calls)"
            lines += summarize(title, rounds)
        channel.close()

        async def aio_main() -> Rounds:
            achannel = pymesh.grpc.aio.insecure_channel(target, xds_client=xds)
            acall = achannel.unary_unary(METHOD, None, None)
            for name, tel in tels.items():
                use(name, tel)
                for _ in range(300):
                    await acall(b"hi", timeout=20)
            out: Rounds = {name: ([], []) for name in tels}
            for _ in range(args.rounds):
                for name, tel in tels.items():
                    use(name, tel)
                    cpu = time.process_time()
                    rate, _, _ = await aio_round(acall, args.calls, args.concurrency)
                    n = (args.calls // args.concurrency) * args.concurrency
                    out[name][0].append(rate)
                    out[name][1].append((time.process_time() - cpu) / n)
                log.flush()
            telemetry.uninstall()
            await achannel.close(None)
            return out

        lines.append("")
        lines += summarize(
            f"aio, {args.concurrency} in flight ({args.rounds} rounds x {args.calls} calls)",
            asyncio.run(aio_main()),
        )
    finally:
        stack.close()
    return lines


@contextlib.contextmanager
def _bench_mesh(
    tmp: Path, name: str, parts: bool
) -> Iterator[tuple[Any, Any, dict[str, telemetry.Telemetry | None]]]:
    """The backend (a subprocess), the embedded control plane, this workload's xDS client,
    an access log file and the telemetry variants; all stopped after."""
    from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
    from pymesh.controlplane import ControlPlane
    from pymesh.xds.client import XdsClient

    server = subprocess.Popen(
        [sys.executable, "-c", BACKEND], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None and server.stdin is not None
    mesh = tmp / f"{name}-mesh"
    mesh.mkdir()
    (mesh / "echo.yaml").write_text(MESH.replace("BACKEND_PORT", server.stdout.readline()))
    cp = ControlPlane([mesh], xds_address="127.0.0.1:0", admin_port=None).start()
    data = generate_bootstrap(
        xds_address=cp.address,
        namespace="default",
        workload="bench-client",
        labels={"app": "bench-client", "version": "v1"},
    )
    xds = XdsClient(parse_bootstrap(json.dumps(data), source="bench"))
    log = open(tmp / f"{name}-access.log", "w")  # noqa: SIM115 - closed below
    tels = variants(xds, log, parts)
    try:
        yield xds, log, tels
    finally:
        telemetry.uninstall()
        for tel in tels.values():
            if tel is not None:
                tel.close()
        log.close()
        xds.close()
        cp.stop()
        server.stdin.close()
        server.wait(10)


ISOLATED_CALLS = 10_000


def isolated(args: argparse.Namespace, tmp: Path) -> list[str]:
    """pymesh's own Python per call, the grpcio attempt replaced by a stub answering at
    once (as ``grpc_bench.py --overhead``), telemetry off vs on: thread CPU, the best of
    ``--rounds`` interleaved batches each."""
    import pymesh.grpc
    import pymesh.grpc.aio

    class Call:  # a finished grpcio call (no exchange answer)
        def initial_metadata(self) -> Any:
            return ()

    class Stub:
        def __call__(self, request: Any, **kwargs: Any) -> Any:
            return b"ok"

        def with_call(self, request: Any, **kwargs: Any) -> Any:
            return b"ok", Call()

    class Done:
        def __await__(self) -> Any:
            return b"ok"
            yield  # a generator: an awaitable that is done at once

    def astub(request: Any, **kwargs: Any) -> Any:
        return Done()

    stack = contextlib.ExitStack()
    xds, _, all_tels = stack.enter_context(_bench_mesh(tmp, "isolated", False))
    tels = {name: all_tels[name] for name in ("off", "on")}
    target = f"xds:///{HOST}:{PORT}"
    lines = [f"pymesh's Python per call, grpcio stubbed (thread CPU us, best of {args.rounds})"]
    try:
        channel = pymesh.grpc.insecure_channel(target, xds_client=xds)
        call = channel.unary_unary(METHOD, None, None)
        for _ in range(50):  # config, subchannel, multicallable
            call(b"hi", timeout=20)
        spec = call._spec  # type: ignore[attr-defined]
        stub = Stub()
        for key in list(spec.mcs):
            spec.mcs[key] = stub

        def sync_batch() -> float:
            t = time.thread_time()
            for _ in range(ISOLATED_CALLS):
                call(b"hi", timeout=10)
            return (time.thread_time() - t) / ISOLATED_CALLS

        best = {name: float("inf") for name in tels}
        for _ in range(args.rounds):
            for name, tel in tels.items():
                use(name, tel)
                best[name] = min(best[name], sync_batch())
        lines.append(
            f"sync: off {best['off'] * 1e6:.1f}, on {best['on'] * 1e6:.1f} "
            f"(+{(best['on'] - best['off']) * 1e6:.1f})"
        )
        channel.close()

        async def aio() -> dict[str, float]:
            achannel = pymesh.grpc.aio.insecure_channel(target, xds_client=xds)
            acall = achannel.unary_unary(METHOD, None, None)
            for _ in range(50):
                await acall(b"hi", timeout=20)
            aspec = acall._spec  # type: ignore[attr-defined]
            for key in list(aspec.mcs):
                aspec.mcs[key] = astub
            out = {name: float("inf") for name in tels}
            for _ in range(args.rounds):
                for name, tel in tels.items():
                    use(name, tel)
                    t = time.thread_time()
                    for _ in range(ISOLATED_CALLS):
                        await acall(b"hi", timeout=10)
                    out[name] = min(out[name], (time.thread_time() - t) / ISOLATED_CALLS)
            await achannel.close(None)
            return out

        best = asyncio.run(aio())
        lines.append(
            f"aio:  off {best['off'] * 1e6:.1f}, on {best['on'] * 1e6:.1f} "
            f"(+{(best['on'] - best['off']) * 1e6:.1f})"
        )
    finally:
        stack.close()
    return lines


def server_side(args: argparse.Namespace, tmp: Path) -> list[str]:
    import grpc

    from pymesh.bootstrap import generate_bootstrap
    from pymesh.controlplane import ControlPlane

    mesh = tmp / "server-mesh"
    mesh.mkdir()
    cp = ControlPlane([mesh], xds_address="127.0.0.1:0", admin_port=None).start()
    procs: dict[str, tuple[subprocess.Popen[str], int]] = {}
    try:
        for name in ("off", "on"):
            boot = tmp / f"server-{name}.json"
            boot.write_text(
                json.dumps(
                    generate_bootstrap(
                        xds_address=cp.address,
                        namespace="default",
                        workload=f"srv-{name}",
                        labels={"app": f"srv-{name}"},
                    )
                )
            )
            proc = subprocess.Popen(
                [sys.executable, "-c", MESH_SERVER, str(boot), name, str(Path(__file__).parent)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            text = SERVER_MESH.replace("NAME", f"srv-{name}").replace("BACKEND_PORT", str(port))
            (mesh / f"srv-{name}.yaml").write_text(text)
            procs[name] = (proc, port)
        for proc, _ in procs.values():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "serving"
        # A mesh caller's exchange: with its id the "on" server answers (a caller asking
        # every call, as Envoy's sidecar); without it, as a pymesh client once it learned
        # the endpoint's workload, the server reads the caller but does not answer.
        told = (("baggage", "k8s.namespace.name=default,k8s.deployment.name=client"),)
        asking = (("x-envoy-peer-metadata-id", "sidecar~127.0.0.1~client-0.default~svc"), *told)
        channels = {n: grpc.insecure_channel(f"127.0.0.1:{p}") for n, (_, p) in procs.items()}
        calls = {n: c.unary_unary(METHOD, None, None) for n, c in channels.items()}
        plan = {  # variant: (server, caller's metadata)
            "off": ("off", asking),
            "on": ("on", told),
            "on, asked": ("on", asking),
        }

        def call_with(c: Any, md: Any) -> Callable[..., Any]:
            return lambda req, timeout: c(req, timeout=timeout, metadata=md)

        for c in calls.values():
            for _ in range(300):
                c(b"hi", timeout=20, metadata=asking)
        rounds: Rounds = {n: ([], []) for n in plan}
        for _ in range(args.rounds):
            for name, (server, md) in plan.items():
                pid = procs[server][0].pid
                before = _cpu_of(pid)
                rate, _, _ = sync_round(call_with(calls[server], md), args.calls)
                rounds[name][0].append(rate)
                rounds[name][1].append((_cpu_of(pid) - before) / args.calls)
        for ch in channels.values():
            ch.close()
        return summarize(
            f"server: pymesh sync server, plain sync caller ({args.rounds} rounds x "
            f"{args.calls} calls; CPU: the server process's)",
            rounds,
        )
    finally:
        for proc, _ in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)
        cp.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--parts", action="store_true", help="also one part of 'on' off at a time")
    ap.add_argument("--server", action="store_true", help="also the server side")
    ap.add_argument("--server-only", action="store_true")
    ap.add_argument("--isolated", action="store_true", help="only Python per call, stubbed")
    ap.add_argument("--aio-only", action="store_true", help="only the grpc.aio workload")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        lines: list[str] = []
        if args.isolated:
            print("\n".join(isolated(args, tmp)))
            return
        if not args.server_only:
            lines += client_side(args, tmp)
        if args.server or args.server_only:
            lines += ["", *server_side(args, tmp)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
