"""The aio channel's fast path (a unary call without metadata on a route whose decisions
are the same for every call: pymesh.core.flow.FastPlan) against the whole flow.

The sync channel always runs :func:`~pymesh.core.flow.call_flow`; the aio channel takes the
fast path and hands a call to :func:`~pymesh.core.flow.resume_flow` on anything but a plain
answer. With the same seeded runtime and the same servers, both must give the same answers
in the same order (picks, retries, previous-hosts exclusions, backoff draws) and leave no
request counted. Then the fast path's own exits: overflow, the caller's deadline, a
cancellation, outlier ejection."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import grpc.aio

import pymesh.grpc
import pymesh.grpc.aio
from pymesh.core.runtime import MeshRuntime
from tests.integration.grpc._client_mesh import (
    HOST,
    TARGET,
    WHO,
    EchoServer,
    GrpcMesh,
    echo_servers,
    grpc_mesh,
    mesh_yaml,
)

__all__ = ["echo_servers", "grpc_mesh"]

ONE_DESTINATION = f"http:\n- route:\n  - destination: {{host: {HOST}}}\n"


def _idle(runtime: MeshRuntime) -> bool:
    """No request counted anywhere (limits, hosts) once every call has ended."""
    for rt in runtime.clusters().values():
        if rt.limits.requests != 0 or any(h.active_requests for h in rt.hosts.values()):
            return False
    return True


def _answer(call: Any) -> str:
    try:
        return str(call())
    except grpc.RpcError as error:
        return f"error {error.code().name}"  # type: ignore[attr-defined]


def test_fast_path_matches_the_flow(grpc_mesh: GrpcMesh, echo_servers: Any) -> None:
    servers: list[EchoServer] = [echo_servers("v1"), echo_servers("v2"), echo_servers("v3")]
    servers[1].fail_code = grpc.StatusCode.UNAVAILABLE
    servers[1].fail_every = 2
    servers[2].fail_code = grpc.StatusCode.RESOURCE_EXHAUSTED  # not retried: an answer
    servers[2].fail_every = 3
    retries = "  retries: {attempts: 3, retryOn: unavailable, perTryTimeout: 5s}\n"
    grpc_mesh.write(
        mesh_yaml(
            {s.name: s.port for s in servers},
            # Power-of-two-choices picks draw from the runtime's RNG, so the answers follow
            # the order of every draw (x-request-id, picks, backoffs).
            destination_rule="trafficPolicy:\n  loadBalancer: {simple: LEAST_REQUEST}\n",
            virtual_service=ONE_DESTINATION + retries,
        )
    )
    grpc_mesh.start()
    calls = 45

    def reset() -> None:
        for s in servers:
            s.count = 0

    # Both runs start with the whole config already in the xDS client (so each runtime
    # builds its balancer once, with the same draws).
    with pymesh.grpc.insecure_channel(TARGET, xds_client=grpc_mesh.client) as warm:
        assert warm.unary_unary(WHO)(b"x", timeout=10)

    # The whole flow (sync channel).
    reset()
    sync_runtime = MeshRuntime(grpc_mesh.client, rng=random.Random(11))
    with pymesh.grpc.insecure_channel(TARGET, runtime=sync_runtime) as channel:
        who = channel.unary_unary(WHO)
        expected = [_answer(lambda: who(b"x", timeout=10)) for _ in range(calls)]
        assert _idle(sync_runtime)
    expected_counts = [s.count for s in servers]

    # The fast path (aio channel), same seed.
    reset()
    aio_runtime = MeshRuntime(grpc_mesh.client, rng=random.Random(11))

    async def main() -> list[str]:
        async with pymesh.grpc.aio.insecure_channel(TARGET, runtime=aio_runtime) as ch:
            awho = ch.unary_unary(WHO)
            got = []
            for _ in range(calls):
                try:
                    got.append(str(await awho(b"x", timeout=10)))
                except grpc.RpcError as error:
                    got.append(f"error {error.code().name}")  # type: ignore[attr-defined]
            assert awho._spec.fast[1] is not None  # type: ignore[attr-defined]  # taken
            assert _idle(aio_runtime)
            return got

    got = asyncio.run(main())
    assert got == expected
    assert [s.count for s in servers] == expected_counts
    # The run went through every turn: retried failures, answers, non-retried errors.
    # (Which endpoint gets which pick depends on the random ports; each gets about a third.)
    assert expected_counts[1] >= 4 and expected_counts[2] >= 3, expected_counts
    assert "error RESOURCE_EXHAUSTED" in expected
    assert {"b'v1'", "b'v2'", "b'v3'"} <= set(expected)


def test_fast_path_exits(grpc_mesh: GrpcMesh, echo_servers: Any) -> None:
    a, b = echo_servers("v1"), echo_servers("v2")
    a.delay = b.delay = 0.3
    dr = (
        "trafficPolicy:\n  connectionPool:\n    http: {http2MaxRequests: 2}\n"
        "  outlierDetection:\n"
        "    {consecutive5xxErrors: 2, interval: 60s, baseEjectionTime: 60s, "
        "maxEjectionPercent: 100}\n"
    )
    vs = ONE_DESTINATION + "  retries: {attempts: 0}\n"
    grpc_mesh.write(
        mesh_yaml({"v1": a.port, "v2": b.port}, destination_rule=dr, virtual_service=vs)
    )
    grpc_mesh.start()
    runtime = MeshRuntime(grpc_mesh.client, rng=random.Random(3))

    async def main() -> None:
        async with pymesh.grpc.aio.insecure_channel(TARGET, runtime=runtime) as ch:
            who = ch.unary_unary(WHO)
            for _ in range(2):  # (the first call waits for the config: not the fast path)
                assert await who(b"x", timeout=10) in (b"v1", b"v2")
            assert who._spec.fast[1] is not None  # type: ignore[attr-defined]
            # Overflow: two in flight at most, the rest refused (503 UO -> UNAVAILABLE).
            results = await asyncio.gather(
                *(who(b"x", timeout=10) for _ in range(5)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(errors) == 3, results
            for error in errors:
                assert error.code() is grpc.StatusCode.UNAVAILABLE
                assert ("x-pymesh-flags", "UO") in tuple(error.trailing_metadata() or ())
            assert _idle(runtime)
            # The caller's deadline ends the call as it is (not retried, not a mesh error).
            try:
                await who(b"x", timeout=0.05)
                raise AssertionError("no deadline")
            except grpc.aio.AioRpcError as error:
                assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert _idle(runtime)
            # A cancelled call gives back what it held.
            task = asyncio.ensure_future(_await(who(b"x", timeout=10)))
            await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
                raise AssertionError("not cancelled")
            except asyncio.CancelledError:
                pass
            assert _idle(runtime)
            # Outlier detection sees the fast path's failures: v1 fails twice in a row
            # (INTERNAL: a 500 for the detector), is ejected, and v2 takes every call.
            a.delay = b.delay = 0.0
            a.fail_code = grpc.StatusCode.INTERNAL
            count = a.count
            failures = 0
            for _ in range(20):
                try:
                    assert await who(b"x", timeout=10) == b"v2"
                except grpc.aio.AioRpcError as error:
                    assert error.code() is grpc.StatusCode.INTERNAL
                    failures += 1
            assert failures == 2
            assert a.count - count == 2
            assert _idle(runtime)

    asyncio.run(main())


async def _await(call: Any) -> Any:
    return await call
