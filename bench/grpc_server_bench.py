"""Server-side cost of the mesh: plain grpcio servers vs pymesh xDS servers, side by side.

Not a timed test. One run starts the embedded control plane (a ServiceEntry for the
server's workload, and optionally Istio AuthorizationPolicies so that two RBAC filters run on
every RPC), then measures, interleaved:

- sync: ``grpc.server`` vs ``pymesh.grpc.server``, one client calling unary RPCs in sequence;
- aio: ``grpc.aio.server`` vs ``pymesh.grpc.aio.server``, 16 RPCs in flight.

Usage: ``python bench/grpc_server_bench.py [--calls 3000] [--rounds 3]``. Prints RPS, p50
and p99 per variant and the pymesh/plain ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

import pymesh.grpc
import pymesh.grpc.aio
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.xds.client import XdsClient

MESH = textwrap.dedent(
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: echo, namespace: default}
    spec:
      hosts: [echo.default.svc.cluster.local]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 7070, name: grpc, protocol: GRPC}]
      workloadSelector: {labels: {app: echo}}
    """
)
POLICIES = textwrap.dedent(
    """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-admin, namespace: default}
    spec:
      selector: {matchLabels: {app: echo}}
      action: DENY
      rules:
      - to: [{operation: {paths: ["/echo.Echo/Admin"]}}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-echo, namespace: default}
    spec:
      selector: {matchLabels: {app: echo}}
      action: ALLOW
      rules:
      - to: [{operation: {paths: ["/echo.Echo/*"]}}]
    """
)


def _handler_sync(request: bytes, context: Any) -> bytes:
    return request


async def _handler_aio(request: bytes, context: Any) -> bytes:
    return request


def _generic(fn: Callable[..., Any]) -> grpc.GenericRpcHandler[Any, Any]:
    return grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(fn)}
    )


def _summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "rps": len(ordered) / elapsed,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[int(len(ordered) * 0.99) - 1],
    }


def run_sync(port: int, calls: int) -> dict[str, float]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        say = channel.unary_unary(
            "/echo.Echo/Say", request_serializer=None, response_deserializer=None
        )
        for _ in range(50):
            say(b"warm", timeout=5)
        latencies = []
        started = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            say(b"x" * 64, timeout=5)
            latencies.append(time.perf_counter() - t)
        return _summary(latencies, time.perf_counter() - started)


async def run_aio(port: int, calls: int, in_flight: int = 16) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        say = channel.unary_unary(
            "/echo.Echo/Say", request_serializer=None, response_deserializer=None
        )
        for _ in range(50):
            await say(b"warm", timeout=5)
        latencies: list[float] = []
        per_worker = calls // in_flight

        async def worker() -> None:
            for _ in range(per_worker):
                t = time.perf_counter()
                await say(b"x" * 64, timeout=5)
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return _summary(latencies, time.perf_counter() - started)


def bench(client: XdsClient, calls: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(rounds):
        # sync, interleaved
        for name in ("sync plain", "sync pymesh"):
            pool = futures.ThreadPoolExecutor(max_workers=8)
            if name == "sync plain":
                srv: Any = grpc.server(pool, handlers=[_generic(_handler_sync)])
            else:
                srv = pymesh.grpc.server(
                    pool, handlers=[_generic(_handler_sync)], xds_client=client
                )
            port = srv.add_insecure_port("127.0.0.1:0")
            srv.start()
            if name == "sync pymesh":
                assert srv.wait_for_serving(15), srv.serving_status
            results.setdefault(name, []).append(run_sync(port, calls))
            srv.stop(None).wait(5)

        async def aio_round() -> None:
            for name in ("aio plain", "aio pymesh"):
                if name == "aio plain":
                    srv: Any = grpc.aio.server(handlers=[_generic(_handler_aio)])
                else:
                    srv = pymesh.grpc.aio.server(
                        handlers=[_generic(_handler_aio)], xds_client=client
                    )
                port = srv.add_insecure_port("127.0.0.1:0")
                await srv.start()
                if name == "aio pymesh":
                    assert await srv.wait_for_serving(15), srv.serving_status
                results.setdefault(name, []).append(await run_aio(port, calls))
                await srv.stop(None)

        asyncio.run(aio_round())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-policies", action="store_true", help="no AuthorizationPolicy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Path(tmp) / "mesh"
        mesh.mkdir()
        (mesh / "mesh.yaml").write_text(MESH if args.no_policies else MESH + "---\n" + POLICIES)
        with ControlPlane([mesh], xds_address="127.0.0.1:0", admin_port=None) as cp:
            data = generate_bootstrap(
                xds_address=cp.address, namespace="default", labels={"app": "echo"}
            )
            client = XdsClient(parse_bootstrap(json.dumps(data), source="bench"))
            try:
                results = bench(client, args.calls, args.rounds)
            finally:
                client.close()
    print(
        f"calls per variant per round: {args.calls}, rounds: {args.rounds}, "
        f"RBAC policies: {not args.no_policies}"
    )
    medians: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        medians[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        m = medians[name]
        print(f"{name:12s} {m['rps']:8.0f} rps  p50 {m['p50_ms']:.3f} ms  p99 {m['p99_ms']:.3f} ms")
    for kind in ("sync", "aio"):
        ratio = medians[f"{kind} pymesh"]["rps"] / medians[f"{kind} plain"]["rps"]
        print(f"{kind}: pymesh / plain throughput = {ratio:.2f}")


if __name__ == "__main__":
    main()
