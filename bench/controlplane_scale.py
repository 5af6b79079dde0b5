"""Control-plane scale benchmark (a script, not a test).

1,000 services x 10 endpoints (ServiceEntry, STATIC) and 200 simulated ADS clients, by default:
most are proxyless gRPC nodes (each subscribes by name to the LDS/RDS/CDS/EDS resources of 5
services, together covering every service), some are Envoy-like (wildcard CDS, EDS for every
cluster). The clients run in a separate process (grpc.aio, one event loop), the control plane
in this one, so CPU figures are the control plane's own.

Each round rewrites the config so that every service's endpoints change (a full EDS push to
every client; ``--change one``: one service's, measured on the clients it concerns) and
measures, per client, the time from the file write to that client's last ACK
of the new version: p50/p99/max over clients and rounds. Also reported: control-plane CPU
seconds per full push (process CPU time from the write to the last ACK: file reload, YAML
parsing, translation, pushes), the wall time of each phase (reload = read + validate the
files, build = derive config + generator, push = generate + send to every client), and RSS.

    /work/venv/bin/python bench/controlplane_scale.py [--services 1000] [--endpoints 10]
        [--clients 200] [--wildcard 10] [--rounds 5] [--change all|one] [--watch inotify|poll]
        [--gc-pause on|off] [--ab FLAG[,FLAG]]

``--ab preload`` (or any of the hub's switches below, comma-separated) interleaves two
variants round by round in the same run: "new" (every switch on) and "old" (the named
switches off), and prints each variant's figures and the new/old ratios. Switches:
``preload`` (read and validate a changed file while the debounce waits), ``plain_reader``
(documents in the plain YAML subset read without PyYAML), ``trim_memory`` (the C heap's free
pages handed back after a push).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
PORT = 8080
PER_CLIENT = 5


def host(i: int) -> str:
    return f"svc-{i}.bench.svc.cluster.local"


def write_config(
    path: Path, services: int, endpoints: int, generation: int, only: int | None = None
) -> None:
    """All services in one multi-document file; ``generation`` shifts every endpoint port
    (only service ``only``'s when given: the others keep the initial port)."""
    write_text(path, config_text(services, endpoints, generation, only))


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a new file renamed in place)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def config_text(services: int, endpoints: int, generation: int, only: int | None = None) -> str:
    """The text :func:`write_config` writes."""
    docs = []
    for i in range(services):
        shift = generation if only is None or i == only else 0
        eps = "\n".join(
            f"  - {{address: 10.{1 + i // 250}.{i % 250}.{e + 1}, "
            f"ports: {{http: {9000 + shift}}}, labels: {{version: v{e % 2}}}}}"
            for e in range(endpoints)
        )
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: svc-{i}, namespace: bench}}\n"
            f"spec:\n  hosts: [{host(i)}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n"
            f"  ports: [{{number: {PORT}, name: http, protocol: HTTP}}]\n"
            f"  endpoints:\n{eps}\n"
        )
    return "---\n".join(docs)


# -- the clients' process --------------------------------------------------------------------


def _client_main(address: str, clients: int, wildcard: int, services: int, conn: Any) -> None:
    asyncio.run(_clients(address, clients, wildcard, services, conn))


async def _clients(address: str, clients: int, wildcard: int, services: int, conn: Any) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
    from google.protobuf import struct_pb2

    acks: list[dict[str, float]] = [{} for _ in range(clients)]
    ready = [asyncio.Event() for _ in range(clients)]
    channels = []

    async def run(i: int) -> None:
        envoy_like = i < wildcard
        if envoy_like:
            names = {
                CDS: [],
                EDS: [f"outbound|{PORT}||{host(s)}" for s in range(services)],
            }
            md = {"NAMESPACE": "bench"}
        else:
            mine = [(i * PER_CLIENT + k) % services for k in range(PER_CLIENT)]
            names = {
                LDS: [f"{host(s)}:{PORT}" for s in mine],
                RDS: [f"outbound|{PORT}||{host(s)}" for s in mine],
                CDS: [f"outbound|{PORT}||{host(s)}" for s in mine],
                EDS: [f"outbound|{PORT}||{host(s)}" for s in mine],
            }
            md = {"NAMESPACE": "bench", "GENERATOR": "grpc"}
        meta = struct_pb2.Struct()
        meta.update(md)
        node = base_pb2.Node(
            id=f"sidecar~10.200.{i // 250}.{i % 250}~client-{i}.bench~bench.svc.cluster.local",
            metadata=meta,
        )
        channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        )
        channels.append(channel)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for n, (type_url, rn) in enumerate(names.items()):
            queue.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    node=node if n == 0 else None, type_url=type_url, resource_names=rn
                )
            )

        async def requests() -> Any:
            while True:
                yield await queue.get()

        seen: set[str] = set()
        call = stub.StreamAggregatedResources(requests())
        async for resp in call:
            queue.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                    resource_names=names[resp.type_url],
                )
            )
            acks[i][resp.version_info] = time.time()
            seen.add(resp.type_url)
            if len(seen) == len(names):
                ready[i].set()

    tasks = [asyncio.create_task(run(i)) for i in range(clients)]
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 600)
    conn.send("ready")
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd == "stop":
            break
        # cmd = version: report each client's last ACK time for it.
        conn.send([a.get(cmd) for a in acks])
    for t in tasks:
        t.cancel()
    for ch in channels:
        await ch.close()


# -- the control plane's side ------------------------------------------------------------------


def set_switch(plane: Any, name: str, on: bool) -> None:
    """Turn one of the control plane's fast paths on or off (see ``--ab``)."""
    if name == "plain_reader":
        from pymesh.controlplane.config import _load

        _load.PLAIN_READER = on
    elif hasattr(plane.hub, name):
        setattr(plane.hub, name, on)
    else:
        raise SystemExit(f"unknown switch {name!r}")


class Run:
    """One variant's measurements over its rounds."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.lasts: list[float] = []
        self.cpu: list[float] = []
        self.phases: list[dict[str, Any]] = []

    def figures(self) -> dict[str, Any]:
        qs = statistics.quantiles(self.latencies, n=100)
        phases = self.phases

        def mean(key: str) -> float:
            return round(statistics.mean(float(p.get(key, 0)) for p in phases), 3)

        return {
            "change_to_ack_p50_seconds": round(qs[49], 3),
            "change_to_ack_p99_seconds": round(qs[98], 3),
            "change_to_last_ack_max_seconds": round(max(self.lasts), 3),
            "cpu_seconds_per_full_push": round(statistics.mean(self.cpu), 3),
            "phase_reload_seconds_mean": mean("load_seconds"),
            "phase_reload_wait_seconds_mean": mean("load_wait_seconds"),
            "phase_build_seconds_mean": mean("build_seconds"),
            "phase_push_seconds_mean": mean("push_seconds"),
            "phase_push_loop_cpu_seconds_mean": mean("push_thread_cpu_seconds"),
            "clients_skipped_per_push_mean": round(mean("clients_skipped"), 1),
        }


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--wildcard", type=int, default=10, help="how many clients are Envoy-like")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--poll-interval", type=float, default=0.2)
    ap.add_argument(
        "--change",
        choices=("all", "one"),
        default="all",
        help="what a round changes: every service's endpoints (a full EDS push), or one "
        "service's (round N changes service N and puts back the one of round N-1)",
    )
    ap.add_argument(
        "--watch",
        choices=("inotify", "poll"),
        default="inotify",
        help="how the control plane notices the write: inotify where available (the "
        "default), or polling alone every --poll-interval seconds",
    )
    ap.add_argument(
        "--gc-pause",
        choices=("on", "off"),
        default="on",
        help="whether the control plane pauses the cyclic GC during a reload and push",
    )
    ap.add_argument(
        "--ab",
        default="",
        help="comma-separated hub switches (e.g. preload): alternate rounds with them on "
        "(new) and off (old), report both and the ratios",
    )
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    from pymesh.controlplane import ControlPlane

    workdir = Path(tempfile.mkdtemp(prefix="pymesh-bench-"))
    config = workdir / "mesh.yaml"
    write_config(config, args.services, args.endpoints, 0)
    rss_before = rss_mb()
    t_load = time.perf_counter()
    plane = ControlPlane(
        [config], xds_address="127.0.0.1:0", admin_port=None, poll_interval=args.poll_interval
    )
    plane.hub.use_inotify = args.watch == "inotify"
    plane.hub.pause_gc = args.gc_pause == "on"
    plane.start()
    load_seconds = time.perf_counter() - t_load
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_client_main,
        args=(plane.address, args.clients, args.wildcard, args.services, child),
        daemon=True,
    )
    t_connect = time.perf_counter()
    proc.start()
    try:
        if not parent.poll(600) or parent.recv() != "ready":
            raise SystemExit("clients did not get their initial config")
        connect_seconds = time.perf_counter() - t_connect
        watching = plane.call(lambda: getattr(plane.hub, "watching", "polling"))

        def concerns(client: int, service: int) -> bool:
            """Whether a change to ``service`` reaches ``client`` (see ``_clients``)."""
            mine = {(client * PER_CLIENT + k) % args.services for k in range(PER_CLIENT)}
            return client < args.wildcard or service in mine

        switches = [s for s in args.ab.split(",") if s]
        variants = ["new", "old"] if switches else [""]
        runs: dict[str, Run] = {v: Run() for v in variants}
        for rnd in range(1, args.rounds * len(variants) + 1):
            variant = variants[rnd % len(variants)]
            run = runs[variant]
            for name in switches:  # off for "old", on for "new"
                on = variant == "new"
                plane.call(lambda name=name, on=on: set_switch(plane, name, on))
            time.sleep(1.0)  # let the previous round settle
            version_before = plane.call(lambda: plane.hub.version)
            only = None if args.change == "all" else rnd % args.services
            text = config_text(args.services, args.endpoints, rnd, only)
            # From the write: the text is ready, the clock starts as the file is written.
            cpu0 = time.process_time()
            t0 = time.time()
            write_text(config, text)
            deadline = time.time() + 120
            version = str(version_before + 1)
            while time.time() < deadline:
                time.sleep(0.05)
                if plane.call(lambda: plane.hub.version) <= version_before:
                    continue
                parent.send(version)
                times = parent.recv()
                if only is not None:
                    times = [t for i, t in enumerate(times) if concerns(i, only)]
                if all(t is not None for t in times):
                    break
            else:
                raise SystemExit(f"round {rnd}: not every client ACKed version {version}")
            run.cpu.append(time.process_time() - cpu0)
            # The last ACK can come before the push to every other client ended.
            for _ in range(600):
                push = dict(plane.call(lambda: plane.hub.last_push))
                if str(push.get("version")) == version:
                    break
                time.sleep(0.05)
            run.phases.append(push)
            lat = [t - t0 for t in times]
            run.latencies.extend(lat)
            run.lasts.append(max(lat))
        parent.send("stop")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rss = rss_mb()
        plane.stop()

    figures: dict[str, Any] = {
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "clients": args.clients,
        "envoy_like_wildcard_clients": args.wildcard,
        "rounds": args.rounds,
        "change": args.change,
        "watch": watching,
        "gc_pause": args.gc_pause if hasattr(plane.hub, "pause_gc") else "n/a",
        "initial_load_seconds": round(load_seconds, 3),
        "all_clients_initial_config_seconds": round(connect_seconds, 3),
    }
    for variant, run in runs.items():
        prefix = f"{variant}_" if variant else ""
        figures.update({prefix + k: v for k, v in run.figures().items()})
    if switches:
        figures["ab_switches"] = ",".join(switches)
        for key in ("change_to_ack_p50_seconds", "change_to_ack_p99_seconds"):
            old = figures["old_" + key]
            figures["ratio_new_old_" + key] = round(figures["new_" + key] / old, 3) if old else 0
    figures |= {
        "rss_mb_before_start": round(rss_before, 1),
        "rss_mb": round(rss, 1),
        "peak_rss_mb": round(peak, 1),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:40s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
