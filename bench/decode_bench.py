"""Decode-and-publish benchmark for large xDS resources (a script, not a test).

    /work/venv/bin/python bench/decode_bench.py [--rounds N] [--endpoints N] [--routes N]

Builds an Istio-shaped ``ClusterLoadAssignment`` (10,000 endpoints over 10 zones, each with
``istio`` workload metadata and ``tlsMode: istio``) and, when the RDS decoder exists, a
``RouteConfiguration`` of 1,000 routes; serializes each once, then times
``decode_resource`` plus publication (one reference swap into a snapshot holder, as the xDS
client does) over several rounds. Prints median/min/max ms and the tracemalloc peak of one
extra round (measured separately: tracemalloc slows the code it watches). Target: < 100 ms.

Every EDS round is a *cold* decode (the decoder's cache of unchanged localities is emptied
first). A second EDS line, *update*, decodes the assignment with one endpoint moved while
the previous value is still held, as the client does on an update: only the locality that
changed is decoded again.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import struct_pb2

from pymesh.xds.codec import decode_resource
from pymesh.xds.codec import endpoint as eds_codec
from pymesh.xds.codec.endpoint import clear_locality_cache
from pymesh.xds.resource_types import ResourceType


@dataclass
class _Holder:
    """Stands in for the client's snapshot holder: publication is one reference swap."""

    current: object = None


def build_cla(n: int) -> bytes:
    cla = endpoint_pb2.ClusterLoadAssignment(
        cluster_name="outbound|9080||reviews.default.svc.cluster.local"
    )
    zones = 10
    per_zone = n // zones
    for z in range(zones):
        loc = cla.endpoints.add()
        loc.locality.region = "us-central1"
        loc.locality.zone = f"us-central1-{chr(ord('a') + z)}"
        loc.load_balancing_weight.value = per_zone
        for k in range(per_zone):
            idx = z * per_zone + k
            lbe = loc.lb_endpoints.add()
            sa = lbe.endpoint.address.socket_address
            sa.address = f"10.{z}.{k // 250}.{k % 250 + 1}"
            sa.port_value = 9080
            lbe.health_status = 1
            lbe.load_balancing_weight.value = 1
            md = lbe.metadata.filter_metadata
            istio = struct_pb2.Struct()
            istio.update({"workload": f"reviews-v{idx % 50};default;reviews;v{idx % 3};Kubernetes"})
            md["istio"].CopyFrom(istio)
            md["envoy.transport_socket_match"].update({"tlsMode": "istio"})
    return cla.SerializeToString()


def build_rds(n: int) -> bytes | None:
    if importlib.util.find_spec("pymesh.xds.codec.route") is None:
        return None
    from envoy.config.route.v3 import route_pb2

    rc = route_pb2.RouteConfiguration(name="9080")
    vh = rc.virtual_hosts.add(name="reviews.default.svc.cluster.local:9080")
    vh.domains.extend(["reviews.default.svc.cluster.local", "reviews", "reviews:9080"])
    for i in range(n):
        r = vh.routes.add(name=f"r{i}")
        if i % 3 == 0:
            r.match.prefix = f"/api/v{i}/"
        elif i % 3 == 1:
            r.match.path = f"/api/item/{i}"
        else:
            r.match.safe_regex.regex = f"/api/re{i}/[0-9]+"
        h = r.match.headers.add(name="x-user")
        h.string_match.exact = f"user{i}"
        wc = r.route.weighted_clusters
        for s, w in (("v1", 80), ("v2", 20)):
            c = wc.clusters.add(name=f"outbound|9080|{s}|reviews.default.svc.cluster.local")
            c.weight.value = w
        r.route.timeout.seconds = 10
        r.route.retry_policy.retry_on = "connect-failure,refused-stream,unavailable"
        r.route.retry_policy.num_retries.value = 2
    return rc.SerializeToString()


def measure(
    type_url: str, data: bytes, rounds: int, *, previous: bytes | None = None
) -> tuple[list[float], list[float], int, str]:
    """Decode + publish ``data``: cold (nothing cached) or, with ``previous``, as an update
    of that value (decoded first, untimed, and held, so what did not change is reused)."""
    holder = _Holder()

    def setup() -> None:
        clear_locality_cache()
        holder.current = None
        if previous is not None:
            old = decode_resource(type_url, previous)
            holder.current = {old.name: old.value}
        gc.collect()

    def once() -> None:
        decoded = decode_resource(type_url, data)
        holder.current = {decoded.name: decoded.value}  # publish: one reference swap

    setup()
    once()  # warm up: imports, registry
    times, cpu = [], []
    for _ in range(rounds):
        setup()
        t0, c0 = time.perf_counter(), time.process_time()
        once()
        times.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    setup()
    tracemalloc.start()
    once()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return times, cpu, peak, f"{len(data) / 1e6:.2f} MB"


def runs_ab(data: bytes, rounds: int, previous: bytes | None = None) -> tuple[float, float]:
    """Median wall ms of the EDS decode with every locality over ``endpoint.RUN_BYTES``
    parsed in runs (the default does so only above ``endpoint.RUNS_ABOVE``) and in one
    piece, rounds interleaved."""
    type_url = ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url
    default = eds_codec.RUNS_ABOVE
    out: dict[bool, list[float]] = {True: [], False: []}
    try:
        for r in range(2 * rounds):
            in_runs = r % 2 == 0
            eds_codec.RUNS_ABOVE = eds_codec.RUN_BYTES if in_runs else 1 << 62
            out[in_runs] += measure(type_url, data, 1, previous=previous)[0]
    finally:
        eds_codec.RUNS_ABOVE = default
    return statistics.median(out[True]), statistics.median(out[False])


def moved_endpoint(data: bytes) -> bytes:
    """``data`` (a serialized ClusterLoadAssignment) with its first endpoint's port changed."""
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(data)
    cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value += 1
    return bytes(cla.SerializeToString())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--endpoints", type=int, default=10_000)
    ap.add_argument("--routes", type=int, default=1_000)
    args = ap.parse_args()

    cases: list[tuple[str, str, Callable[[], bytes | None]]] = [
        (f"EDS {args.endpoints} endpoints", ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url,
         lambda: build_cla(args.endpoints)),
        (f"RDS {args.routes} routes", ResourceType.ROUTE_CONFIGURATION.type_url,
         lambda: build_rds(args.routes)),
    ]  # fmt: skip
    print(
        f"{'resource':<24} {'size':>8} {'median ms':>10} {'min ms':>8} {'max ms':>8}"
        f" {'cpu med ms':>10} {'peak MB':>8}"
    )
    for label, type_url, build in cases:
        data = build()
        if data is None:
            print(f"{label:<24} skipped: pymesh.xds.codec.route (RDS decoder) does not exist yet")
            continue
        runs = [(label, measure(type_url, data, args.rounds))]
        if type_url == ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url:
            update = measure(type_url, moved_endpoint(data), args.rounds, previous=data)
            runs.append(("  update (1 moved)", update))
        for name, (times, cpu, peak, size) in runs:
            print(
                f"{name:<24} {size:>8} {statistics.median(times):>10.1f} {min(times):>8.1f}"
                f" {max(times):>8.1f} {statistics.median(cpu):>10.1f} {peak / 1e6:>8.1f}"
            )
        if type_url == ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url:
            for name, previous in (("cold", None), ("update", data)):
                payload = data if previous is None else moved_endpoint(data)
                in_runs, one_shot = runs_ab(payload, args.rounds, previous)
                print(
                    f"  {name}: localities over {eds_codec.RUN_BYTES} B parsed in runs"
                    f" {in_runs:.1f} ms vs in one piece {one_shot:.1f} ms (median,"
                    f" interleaved): {in_runs / one_shot:.2f}x"
                )
    print(
        f"({args.rounds} rounds each; wall-clock ms unless 'cpu' (process time, less sensitive"
        " to other load on a shared machine); target < 100 ms median)"
    )


if __name__ == "__main__":
    main()
