"""Control plane and xDS client scale, each measurement in its own process.

- ``controlplane``: ``bench/controlplane_scale.py --json`` (its own doc: N simulated ADS
  clients, mostly proxyless, 1,000 services; time from a config write to each client's
  ACK of the new version).
- ``apply`` (``python -m bench.suite.scale apply``): the real ``XdsClient`` against
  ``tests/xdsserver.py``, the Istio-shaped resources of ``bench/decode_bench.py`` (a
  10,000-endpoint ClusterLoadAssignment over 10 zones with Istio metadata; a 1,000-route
  RouteConfiguration with header matches, weighted clusters, retries): time from the server's
  push of a changed version to the watcher's callback (median over rounds), plus
  ``decode_bench.measure`` (decode + publish: wall and CPU medians, tracemalloc peak) and
  the process's RSS growth when the first value arrived.
- ``memory`` (``python -m bench.suite.scale memory``): a control plane with 1,000 services
  (10 endpoints each, ``controlplane_scale.write_config``); a bare interpreter that imports
  httpx and grpcio (and asyncio, ssl) and creates an ``httpx.Client`` (as any httpx
  application does; that loads httpcore), and a pymesh workload with the same imports plus
  ``pymesh.httpx``/``pymesh.grpc``, an ``XdsClient``, a ``pymesh.httpx.Client``, following
  (``MeshRuntime.watch``: LDS, RDS, CDS, EDS, load balancers) 10 services and then all 1,000.
  pymesh's own memory is the workload's VmRSS minus the bare interpreter's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.suite.procs import rss_mb

REPO = Path(__file__).resolve().parents[2]


def _python(args: list[str], timeout: float) -> dict[str, Any]:
    env_cmd = [sys.executable, *args]
    out = subprocess.run(
        env_cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("GRPC_")},
            "PYTHONPATH": str(REPO),
        },
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {out.returncode}\n{out.stderr[-3000:]}")
    text = out.stdout
    result: dict[str, Any] = json.loads(text[text.index("{") :])
    return result


def controlplane(
    clients: int, services: int, rounds: int, change: str, timeout: float = 900
) -> dict[str, Any]:
    return _python(
        [str(REPO / "bench" / "controlplane_scale.py"), "--json", "--clients", str(clients),
         "--services", str(services), "--rounds", str(rounds), "--change", change,
         "--wildcard", str(min(10, clients))],
        timeout,
    )  # fmt: skip


def apply(endpoints: int, routes: int, rounds: int, timeout: float = 600) -> dict[str, Any]:
    return _python(
        ["-m", "bench.suite.scale", "apply", "--endpoints", str(endpoints),
         "--routes", str(routes), "--rounds", str(rounds)],
        timeout,
    )  # fmt: skip


def memory(services: int, runs: int = 3, timeout: float = 600) -> dict[str, Any]:
    return _python(
        ["-m", "bench.suite.scale", "memory", "--services", str(services), "--runs", str(runs)],
        timeout,
    )


# -- apply -----------------------------------------------------------------------------------


def _apply_main(args: argparse.Namespace) -> dict[str, Any]:
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.route.v3 import route_pb2

    from bench import decode_bench
    from pymesh.xds.client import XdsClient
    from pymesh.xds.resource_types import ResourceType
    from tests.xdsserver import EDS, RDS, WatchRecorder, XdsTestServer

    cla = endpoint_pb2.ClusterLoadAssignment.FromString(decode_bench.build_cla(args.endpoints))
    rds_bytes = decode_bench.build_rds(args.routes)
    assert rds_bytes is not None
    rc = route_pb2.RouteConfiguration.FromString(rds_bytes)
    out: dict[str, Any] = {}
    cases: list[tuple[str, str, Any, ResourceType, Any]] = [
        ("eds", EDS, cla, ResourceType.CLUSTER_LOAD_ASSIGNMENT, None),
        ("rds", RDS, rc, ResourceType.ROUTE_CONFIGURATION, None),
    ]
    for key, type_url, msg, rtype, _ in cases:
        name = msg.cluster_name if key == "eds" else msg.name
        data = msg.SerializeToString()
        times, cpu, peak, size = decode_bench.measure(rtype.type_url, data, args.rounds)

        def changed(r: int, m: Any = msg, k: str = key) -> bytes:
            m2 = type(m)()
            m2.CopyFrom(m)
            if k == "eds":
                sa = m2.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
                sa.port_value = 20000 + r
            else:
                m2.virtual_hosts[0].routes[0].route.timeout.seconds = 20 + r
            return bytes(m2.SerializeToString())

        with XdsTestServer() as server:
            server.set_resources(type_url, {name: data})
            with XdsClient(server.bootstrap()) as client:
                rec = WatchRecorder()
                gc.collect()
                rss0 = rss_mb_self()
                t0 = time.perf_counter()
                client.watch(rtype, name, rec)
                rec.wait_for(lambda e: e[0] == "changed", timeout=120)
                first = time.perf_counter() - t0
                gc.collect()
                rss1 = rss_mb_self()
                pushes = []
                for r in range(args.rounds):
                    payload = changed(r)
                    n = len(rec.events)
                    t = time.perf_counter()
                    server.set_resources(type_url, {name: payload})
                    rec.wait_for(lambda e: e[0] == "changed", start=n, timeout=120)
                    pushes.append(time.perf_counter() - t)
        out[key] = {
            "size": size,
            "first_value_ms": round(first * 1e3, 1),
            "push_to_callback_ms_median": round(statistics.median(pushes) * 1e3, 1),
            "push_to_callback_ms_min": round(min(pushes) * 1e3, 1),
            "push_to_callback_ms_max": round(max(pushes) * 1e3, 1),
            "decode_publish_ms_median": round(statistics.median(times), 1),
            "decode_publish_cpu_ms_median": round(statistics.median(cpu), 1),
            "decode_tracemalloc_peak_mb": round(peak / 1e6, 1),
            "rss_growth_first_value_mb": round(rss1 - rss0, 1),
            "rounds": args.rounds,
        }
    out["endpoints"] = args.endpoints
    out["routes"] = args.routes
    return out


def rss_mb_self() -> float:
    return rss_mb(os.getpid())


# -- memory ----------------------------------------------------------------------------------

COMMON_IMPORTS = (
    "import asyncio, json, os, ssl, sys, gc\nimport httpx\nimport grpc, grpc.aio\n"
    # What a plain httpx application has loaded: a client's transport imports httpcore
    # (h11, h2, ...), which httpx itself only imports when the first client is created.
    "httpx.Client().close()\n"
)

RSS = textwrap.dedent(
    """
    def rss():
        gc.collect()
        for line in open(f"/proc/{os.getpid()}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    """
)

BARE = COMMON_IMPORTS + RSS + "print(json.dumps({'bare': rss()}))\n"

DEPS = COMMON_IMPORTS + textwrap.dedent(
    """
    before = set(sys.modules)
    import pymesh.bootstrap, pymesh.core.runtime, pymesh.grpc, pymesh.grpc.aio, pymesh.httpx
    import pymesh.xds.client
    print(json.dumps({"deps": [m for m in sys.modules
                               if m not in before and m.split(".")[0] != "pymesh"]}))
    """
)

WORKLOAD = (
    COMMON_IMPORTS
    + RSS
    + textwrap.dedent(
        """
        out = {"before_pymesh": rss()}
        import importlib
        for name in json.load(open(sys.argv[3])):
            try:
                importlib.import_module(name)
            except Exception:
                pass
        out["imported_deps"] = rss()
        from pymesh.xds.client import XdsClient
        out["imported_xds_client"] = rss()
        import pymesh.httpx
        out["imported_httpx"] = rss()
        import pymesh.grpc, pymesh.grpc.aio
        from pymesh.bootstrap import parse_bootstrap
        from pymesh.core.runtime import MeshRuntime
        from pymesh.xds.client import XdsClient
        out["imported"] = rss()
        services, bootstrap = int(sys.argv[1]), sys.argv[2]
        xds = XdsClient(parse_bootstrap(open(bootstrap).read(), source=bootstrap))
        client = pymesh.httpx.Client(xds_client=xds)
        runtime = MeshRuntime.for_client(xds)
        out["created"] = rss()
        host = lambda i: f"svc-{i}.bench.svc.cluster.local:8080"
        handles = []
        for stop in (1, 10, services):
            for i in range(len(handles), stop):
                handles.append(runtime.watch(host(i)))
            for h in handles:
                h.wait_ready(120)
            out[f"following_{stop}"] = rss()
        print(json.dumps(out))
        client.close()
        xds.close()
        """
    )
)


def _memory_main(args: argparse.Namespace) -> dict[str, Any]:
    from bench import controlplane_scale
    from pymesh.bootstrap import generate_bootstrap
    from pymesh.controlplane import ControlPlane

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        config = tmp / "mesh.yaml"
        controlplane_scale.write_config(config, args.services, 10, 0)
        plane = ControlPlane([config], xds_address="127.0.0.1:0", admin_port=None).start()
        try:
            bs = tmp / "bootstrap.json"
            bs.write_text(json.dumps(generate_bootstrap(xds_address=plane.address,
                                                        namespace="bench")))  # fmt: skip
            deps = _python(["-c", DEPS], 120)["deps"]
            (tmp / "deps.json").write_text(json.dumps(deps))
            tops: dict[str, int] = {}
            for name in deps:
                tops[name.split(".")[0]] = tops.get(name.split(".")[0], 0) + 1
            runs: list[dict[str, float]] = []
            for _ in range(args.runs):  # interleaved, median
                bare = _python(["-c", BARE], 120)
                work = _python(
                    ["-c", WORKLOAD, str(args.services), str(bs), str(tmp / "deps.json")], 300
                )
                runs.append({**bare, **work})
        finally:
            plane.stop()
    med = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
    return {
        "services": args.services,
        "rss_mb": med,
        "pymesh_imports_mb": round(med["imported"] - med["bare"], 1),
        "imports_breakdown_mb": {
            "third-party modules pymesh imports ("
            + ", ".join(f"{k} {v}" for k, v in sorted(tops.items(), key=lambda kv: -kv[1])[:8])
            + ", ... modules)": round(med["imported_deps"] - med["before_pymesh"], 1),
            "pymesh.xds.client": round(med["imported_xds_client"] - med["imported_deps"], 1),
            "+ pymesh.httpx": round(med["imported_httpx"] - med["imported_xds_client"], 1),
            "+ pymesh.grpc, pymesh.grpc.aio": round(med["imported"] - med["imported_httpx"], 1),
        },
        "pymesh_following_10_mb": round(med["following_10"] - med["bare"], 1),
        f"pymesh_following_{args.services}_mb": round(
            med[f"following_{args.services}"] - med["bare"], 1
        ),
        "runs": args.runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply")
    a.add_argument("--endpoints", type=int, default=10_000)
    a.add_argument("--routes", type=int, default=1_000)
    a.add_argument("--rounds", type=int, default=5)
    m = sub.add_parser("memory")
    m.add_argument("--services", type=int, default=1_000)
    m.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    result = _apply_main(args) if args.cmd == "apply" else _memory_main(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
