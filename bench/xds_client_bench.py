"""End-to-end xDS client benchmark over loopback (a script, not a test).

    /work/venv/bin/python bench/xds_client_bench.py [--endpoints 10000] [--watches 2000]
        [--rounds 5]

Uses the real ``XdsClient`` (real decoders, SotW) against ``tests/xdsserver.py``:

1. one ClusterLoadAssignment of ``--endpoints`` endpoints: time from ``watch()`` to the
   watcher's first value, then from a server push of a changed version to the callback
   (median of ``--rounds``);
2. ``--watches`` EDS resources watched in one serializer task: time until every watcher
   has its value, and the number of requests that took;
3. then 50 pushes that each change one of them (the server resends all ``--watches``, as a
   SotW server does): total time until the last change reached its watcher;
4. the whole client stack: a target (LDS, RDS, CDS) whose cluster has ``--endpoints``
   Istio-shaped endpoints over 10 zones (``decode_bench.build_cla``) followed by a
   ``MeshRuntime``; each round moves one endpoint of another zone and times the push until
   the runtime's hosts hold it (decode, dependency manager, snapshot, hosts and load
   balancer rebuilt), with the work thread's CPU per update by stage.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.config.endpoint.v3 import endpoint_pb2

from bench import decode_bench
from pymesh.core import runtime as core_runtime
from pymesh.core.runtime import MeshRuntime
from pymesh.xds import client as xds_client
from pymesh.xds import pacing
from pymesh.xds.client import XdsClient
from pymesh.xds.resource_types import ResourceType
from tests.integration.xds.test_snapshots import (
    RDS_NAME,
    TARGET,
    cluster_proto,
    listener_proto,
    route_proto,
)
from tests.xdsserver import CDS, EDS, LDS, RDS, WatchRecorder, XdsTestServer

CLA = ResourceType.CLUSTER_LOAD_ASSIGNMENT


def cla(name: str, endpoints: int, port: int) -> bytes:
    msg = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    loc = msg.endpoints.add()
    loc.locality.zone = "z1"
    loc.load_balancing_weight.value = 1
    for i in range(endpoints):
        lb = msg.endpoints[0].lb_endpoints.add()
        address = lb.endpoint.address.socket_address
        address.address = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
        address.port_value = port
    return bytes(msg.SerializeToString())


def port_of(event: tuple[object, ...]) -> int:
    value = event[2]
    return int(value.localities[0].endpoints[0].address.port)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--watches", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with XdsTestServer() as server:
        server.set_resources(EDS, {"big": cla("big", args.endpoints, 80)})
        with XdsClient(server.bootstrap()) as client:
            rec = WatchRecorder()
            start = time.perf_counter()
            client.watch(CLA, "big", rec)
            rec.wait_for(lambda e: e[0] == "changed", timeout=120)
            first = (time.perf_counter() - start) * 1000
            updates = []
            for r in range(args.rounds):
                data = cla("big", args.endpoints, 81 + r)
                n = len(rec.events)
                start = time.perf_counter()
                server.set_resources(EDS, {"big": data})
                rec.wait_for(lambda e, p=81 + r: port_of(e) == p, start=n, timeout=120)
                updates.append((time.perf_counter() - start) * 1000)
            print(
                f"CLA of {args.endpoints} endpoints: first value {first:.0f} ms, push to "
                f"callback median {statistics.median(updates):.0f} ms "
                f"(min {min(updates):.0f}, max {max(updates):.0f})"
            )

        names = [f"e{i}" for i in range(args.watches)]
        server.set_resources(EDS, {n: cla(n, 1, 80) for n in names})
        with XdsClient(server.bootstrap()) as client:
            recs = [WatchRecorder() for _ in names]
            requests_before = len(server.requests)

            def watch_all() -> None:
                for name, r in zip(names, recs, strict=True):
                    client.watch(CLA, name, r)

            start = time.perf_counter()
            client.run_in_serializer(watch_all)
            for r in recs:
                r.wait_for(lambda e: e[0] == "changed", timeout=120)
            elapsed = (time.perf_counter() - start) * 1000
            subs = [q for q in server.requests[requests_before:] if not q.request.response_nonce]
            print(
                f"{args.watches} EDS watches: all values in {elapsed:.0f} ms "
                f"({len(subs)} subscription request)"
            )
            start = time.perf_counter()
            for i in range(50):
                server.set_resources(EDS, {names[i]: cla(names[i], 1, 81)})
            for r in recs[:50]:
                r.wait_for(lambda e: e[0] == "changed" and port_of(e) == 81, timeout=120)
            elapsed = (time.perf_counter() - start) * 1000
            print(f"50 pushes of all {args.watches} (one changed each): {elapsed:.0f} ms")

    full_stack(args.endpoints, max(args.rounds, 5))


class _StageTimer:
    """Work-thread CPU (``time.thread_time``) of named functions, per call."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        samples = self.samples.setdefault(label, [])

        def timed(*args: object, **kwargs: object) -> object:
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                samples.append((time.thread_time() - start) * 1000)

        self._undo.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)


def full_stack(endpoints: int, rounds: int) -> None:
    name = "outbound|9080||reviews.default.svc.cluster.local"
    cla_msg = endpoint_pb2.ClusterLoadAssignment.FromString(decode_bench.build_cla(endpoints))
    cla_msg.cluster_name = name
    stages = _StageTimer()
    stages.wrap(xds_client.XdsClient, "_on_response", "response task (all below)")
    stages.wrap(core_runtime.MeshRuntime, "on_target_state", "runtime update")
    stages.wrap(core_runtime, "build_hosts", "  build_hosts")
    stages.wrap(core_runtime, "build_load_balancer", "  build_load_balancer")
    try:
        with XdsTestServer() as server:
            server.set_resources(LDS, {TARGET: listener_proto()})
            server.set_resources(RDS, {RDS_NAME: route_proto((name, 1))})
            server.set_resources(CDS, {name: cluster_proto(name)})
            server.set_resources(EDS, {name: cla_msg.SerializeToString()})
            with XdsClient(server.bootstrap()) as client:
                runtime = MeshRuntime.for_client(client)
                handle = runtime.watch(TARGET)
                handle.wait_ready(120)
                arrived = threading.Event()
                wanted = [""]

                def on_state(state: object) -> None:
                    cluster = runtime.clusters().get(name)
                    if cluster is not None and wanted[0] in cluster.hosts:
                        arrived.set()

                cancel = handle.subscribe(on_state)
                for label in stages.samples:
                    stages.samples[label].clear()
                pushes = []
                by_pacing: dict[bool, list[float]] = {True: [], False: []}
                zones = len(cla_msg.endpoints)
                for r in range(2 * rounds):
                    # Interleaved: even rounds with the work thread paced (the default),
                    # odd rounds without (pymesh.xds.pacing): what pacing costs an update.
                    paced = r % 2 == 0
                    client.run_in_serializer(
                        lambda paced=paced: pacing.pace_current_thread(
                            pacing.SLICE if paced else None
                        )
                    )
                    msg = endpoint_pb2.ClusterLoadAssignment()
                    msg.CopyFrom(cla_msg)
                    sa = msg.endpoints[r % zones].lb_endpoints[0].endpoint.address.socket_address
                    sa.port_value = 20000 + r
                    wanted[0] = f"{sa.address}:{sa.port_value}"
                    data = msg.SerializeToString()
                    arrived.clear()
                    start = time.perf_counter()
                    server.set_resources(EDS, {name: data})
                    if not arrived.wait(120):
                        raise RuntimeError("the update never reached the runtime")
                    pushes.append((time.perf_counter() - start) * 1000)
                    by_pacing[paced].append(pushes[-1])
                client.run_in_serializer(pacing.pace_current_thread)
                cancel()
                runtime.unwatch(TARGET)
    finally:
        stages.restore()
    paced_pushes = by_pacing[True]
    print(
        f"full stack, {endpoints} endpoints over 10 zones, one moved per round: push to "
        f"runtime hosts+LB median {statistics.median(paced_pushes):.0f} ms "
        f"(min {min(paced_pushes):.0f}, max {max(paced_pushes):.0f})"
    )
    on, off = statistics.median(by_pacing[True]), statistics.median(by_pacing[False])
    print(f"  paced {on:.0f} ms vs unpaced {off:.0f} ms (median, interleaved): {on / off:.2f}x")
    for label, samples in stages.samples.items():
        if samples:
            print(f"  work-thread CPU, {label}: median {statistics.median(samples):.1f} ms")


if __name__ == "__main__":
    main()
