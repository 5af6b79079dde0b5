"""Benchmark: time to publish a new target snapshot after a big EDS or RDS update.

Run from the repository root::

    /work/venv/bin/python bench/snapshot_bench.py [--rounds 7] [--endpoints 10000] [--routes 1000]

Two measurements per update kind, each the median over ``--rounds`` rounds:

``in-process``
    The real decoder (``decode_resource`` on the serialized proto) followed by the dependency
    manager recomputing and publishing the snapshot: what the xDS client's work thread spends
    per update. The watch API is driven by the deterministic double used by the unit tests.
    Peak memory is measured with tracemalloc in a separate round (tracing slows things down).

``end-to-end``
    A real ``XdsClient`` talking to the in-process ADS test server over loopback gRPC: from
    ``set_resources`` on the server to the new snapshot seen by a subscriber (server-side
    serialization, the network, the ADS state machine, decoding, the dependency manager).

Columns: wall-clock median and max, median CPU time of the process (in-process only: less
sensitive to other load on a shared machine), the decode and publish parts of the wall time,
and peak traced memory. A script, not a test: it prints a table. Target (issue 2): under
100 ms each.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from pymesh.bootstrap import parse_bootstrap
from pymesh.model.snapshot import TargetSnapshot
from pymesh.xds.client import XdsClient
from pymesh.xds.codec import decode_resource
from pymesh.xds.resource_types import ResourceType
from pymesh.xds.watch import watch_target
from tests.unit.xds.fake_xds_client import FakeXdsClient
from tests.xdsserver import CDS, EDS, LDS, RDS, XdsTestServer

TARGET = "reviews.default.svc.cluster.local:9080"
RDS_NAME = "outbound|9080||reviews.default.svc.cluster.local"
N_CLUSTERS = 10


def cluster_name(i: int) -> str:
    return f"outbound|9080|v{i}|reviews.default.svc.cluster.local"


def _any(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def listener_proto() -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(
            route_config_name=RDS_NAME,
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource()
            ),
        ),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=TARGET, api_listener=api_listener_pb2.ApiListener(api_listener=_any(hcm))
    )


def route_proto(n_routes: int, salt: int = 0) -> route_pb2.RouteConfiguration:
    """``n_routes`` routes as a VirtualService produces them: path prefix + header match,
    weighted over two of the ``N_CLUSTERS`` clusters, with a timeout and a retry policy."""
    routes = []
    for i in range(n_routes):
        action = route_components_pb2.RouteAction(timeout={"seconds": 10 + salt})
        a, b = cluster_name(i % N_CLUSTERS), cluster_name((i + 1) % N_CLUSTERS)
        action.weighted_clusters.clusters.add(name=a, weight={"value": 80})
        action.weighted_clusters.clusters.add(name=b, weight={"value": 20})
        action.retry_policy.retry_on = "connect-failure,refused-stream,unavailable,503"
        action.retry_policy.num_retries.value = 2
        routes.append(
            route_components_pb2.Route(
                name=f"route-{i}",
                match=route_components_pb2.RouteMatch(
                    prefix=f"/api/v{salt}/r{i}/",
                    headers=[
                        route_components_pb2.HeaderMatcher(
                            name="x-user", string_match={"exact": f"user-{i}"}
                        )
                    ],
                ),
                route=action,
            )
        )
    routes.append(
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster=cluster_name(0)),
        )
    )
    return route_pb2.RouteConfiguration(
        name=RDS_NAME,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="reviews", domains=["reviews.default.svc.cluster.local", TARGET], routes=routes
            )
        ],
    )


def cluster_proto(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource()
            ),
            service_name=name,
        ),
    )


def endpoints_proto(name: str, n: int, salt: int = 0) -> endpoint_pb2.ClusterLoadAssignment:
    """``n`` endpoints in 10 zones, each with Istio-style metadata."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    per_zone = max(1, n // 10)
    for z in range(10):
        loc = cla.endpoints.add(
            locality=base_pb2.Locality(region="us-central1", zone=f"us-central1-{z}"),
            load_balancing_weight={"value": 1},
        )
        for j in range(per_zone):
            k = z * per_zone + j + salt
            ep = loc.lb_endpoints.add(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(
                            address=f"10.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}",
                            port_value=9080,
                        )
                    )
                ),
                load_balancing_weight={"value": 1},
            )
            ep.metadata.filter_metadata["istio"].update(
                {"workload": f"reviews-v1-{k};default;reviews;v1;Kubernetes"}
            )
    return cla


# -- in-process: decode + dependency manager --------------------------------------------------


def in_process(kind: str, rounds: int, n_endpoints: int, n_routes: int) -> dict[str, float]:
    fake = FakeXdsClient()
    handle = watch_target(fake, TARGET)
    published: list[TargetSnapshot] = []
    handle.subscribe(lambda s: published.append(s) if isinstance(s, TargetSnapshot) else None)

    def put(rtype: ResourceType, data: bytes) -> None:
        decoded = decode_resource(rtype.type_url, data)
        fake.set(rtype, decoded.name, decoded.value)
        fake.drain()

    put(ResourceType.LISTENER, listener_proto().SerializeToString())
    put(ResourceType.ROUTE_CONFIGURATION, route_proto(n_routes).SerializeToString())
    for i in range(N_CLUSTERS):
        put(ResourceType.CLUSTER, cluster_proto(cluster_name(i)).SerializeToString())
        put(
            ResourceType.CLUSTER_LOAD_ASSIGNMENT,
            endpoints_proto(cluster_name(i), 10).SerializeToString(),
        )
    assert handle.current() is not None, "no snapshot: resources did not decode"

    if kind == "eds":
        rtype = ResourceType.CLUSTER_LOAD_ASSIGNMENT
        payloads = [
            endpoints_proto(cluster_name(0), n_endpoints, salt=r).SerializeToString()
            for r in range(rounds + 1)
        ]
    else:
        rtype = ResourceType.ROUTE_CONFIGURATION
        payloads = [route_proto(n_routes, salt=r).SerializeToString() for r in range(rounds + 1)]

    times: list[float] = []
    cpu_times: list[float] = []
    decode_times: list[float] = []
    for data in payloads[:rounds]:
        before = len(published)
        gc.collect()
        cpu_start = time.process_time()
        start = time.perf_counter()
        decoded = decode_resource(rtype.type_url, data)
        decoded_at = time.perf_counter()
        fake.set(rtype, decoded.name, decoded.value)
        fake.drain()
        end = time.perf_counter()
        cpu_times.append((time.process_time() - cpu_start) * 1000)
        times.append((end - start) * 1000)
        decode_times.append((decoded_at - start) * 1000)
        assert len(published) == before + 1, "the update did not publish a snapshot"

    gc.collect()
    tracemalloc.start()
    put(rtype, payloads[rounds])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    handle.close()
    fake.drain()
    return {
        "median_ms": statistics.median(times),
        "max_ms": max(times),
        "cpu_ms": statistics.median(cpu_times),
        "decode_ms": statistics.median(decode_times),
        "publish_ms": statistics.median(t - d for t, d in zip(times, decode_times, strict=True)),
        "peak_mib": peak / 2**20,
    }


# -- end-to-end: real client and ADS server over loopback ---------------------------------------


def end_to_end(kind: str, rounds: int, n_endpoints: int, n_routes: int) -> dict[str, float]:
    with XdsTestServer() as server:
        server.set_resources(LDS, {TARGET: listener_proto()})
        server.set_resources(RDS, {RDS_NAME: route_proto(n_routes)})
        server.set_resources(
            CDS, {cluster_name(i): cluster_proto(cluster_name(i)) for i in range(N_CLUSTERS)}
        )
        server.set_resources(
            EDS, {cluster_name(i): endpoints_proto(cluster_name(i), 10) for i in range(N_CLUSTERS)}
        )
        bootstrap = parse_bootstrap(json.dumps(server.bootstrap_dict()), source="bench")
        with XdsClient(bootstrap) as client:
            handle = watch_target(client, TARGET)
            handle.wait_ready(30)
            cond = threading.Condition()
            seen: list[float] = []

            def on_item(item: object) -> None:
                if isinstance(item, TargetSnapshot):
                    with cond:
                        seen.append(time.perf_counter())
                        cond.notify_all()

            handle.subscribe(on_item)
            # Serialized beforehand: only the push itself is timed.
            if kind == "eds":
                updates = [
                    (EDS, cluster_name(0), endpoints_proto(cluster_name(0), n_endpoints, r))
                    for r in range(1, rounds + 1)
                ]
            else:
                updates = [(RDS, RDS_NAME, route_proto(n_routes, r)) for r in range(1, rounds + 1)]
            payloads = [(t, name, msg.SerializeToString()) for t, name, msg in updates]
            time.sleep(0.2)  # let the initial pushes settle before timing
            times: list[float] = []
            for type_url, name, data in payloads:
                with cond:
                    count = len(seen)
                gc.collect()
                start = time.perf_counter()
                server.set_resources(type_url, {name: data})
                with cond:
                    while len(seen) == count:
                        assert cond.wait(30), "no snapshot within 30 s"
                    times.append((seen[-1] - start) * 1000)
            handle.close()
    nan = float("nan")
    return {
        "median_ms": statistics.median(times),
        "max_ms": max(times),
        "cpu_ms": nan,
        "decode_ms": nan,
        "publish_ms": nan,
        "peak_mib": nan,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--routes", type=int, default=1_000)
    parser.add_argument("--skip-e2e", action="store_true", help="in-process numbers only")
    args = parser.parse_args()

    rows = []
    for kind, label in (
        ("eds", f"EDS {args.endpoints} endpoints"),
        ("rds", f"RDS {args.routes} routes"),
    ):
        rows.append(
            (label, "in-process", in_process(kind, args.rounds, args.endpoints, args.routes))
        )
        if not args.skip_e2e:
            rows.append(
                (label, "end-to-end", end_to_end(kind, args.rounds, args.endpoints, args.routes))
            )

    print(f"snapshot publish after an update, median of {args.rounds} rounds")
    print(
        f"{'update':<24} {'path':<11} {'median ms':>10} {'max ms':>8} {'cpu ms':>7} "
        f"{'decode ms':>10} {'publish ms':>11} {'peak MiB':>9}"
    )

    def fmt(value: float, width: int) -> str:
        return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.1f}"

    for label, path, r in rows:
        print(
            f"{label:<24} {path:<11} {fmt(r['median_ms'], 10)} {fmt(r['max_ms'], 8)} "
            f"{fmt(r['cpu_ms'], 7)} "
            f"{fmt(r['decode_ms'], 10)} {fmt(r['publish_ms'], 11)} {fmt(r['peak_mib'], 9)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
