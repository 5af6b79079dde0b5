"""Thread, task, socket and file-descriptor hygiene: 1,000 create / one call / close cycles of
each client kind (``pymesh.httpx.Client``, ``AsyncClient``, ``pymesh.grpc`` channels sync and
aio) against one shared xDS client; the counts after must be the counts before."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pymesh.grpc
import pymesh.grpc.aio
import pymesh.httpx
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.xds.client import XdsClient
from tests.integration.grpc._client_mesh import HOST as GRPC_HOST
from tests.integration.grpc._client_mesh import PORT as GRPC_PORT
from tests.integration.grpc._client_mesh import WHO, mesh_yaml
from tests.integration.httpx.conftest import HOST, PORT, service_yaml
from tests.resilience._procs import BackendProc, ControlPlaneProc, free_port

CYCLES = int(os.environ.get("PYMESH_HYGIENE_CYCLES", "1000"))
URL = f"http://{HOST}:{PORT}/"
G_HOST = "gecho.default.svc.cluster.local"
TARGET = f"xds:///{G_HOST}:{GRPC_PORT}"


def counts() -> dict[str, int]:
    fds = os.listdir("/proc/self/fd")
    sockets = 0
    for fd in fds:
        try:
            sockets += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return {"threads": threading.active_count(), "fds": len(fds), "sockets": sockets}


def settled(before: dict[str, int], timeout: float = 10.0) -> dict[str, int]:
    """The counts once they are back to ``before`` (closing is allowed to finish), or the
    last counts seen after ``timeout``."""
    deadline = time.monotonic() + timeout
    now = counts()
    while time.monotonic() < deadline and any(now[k] > before[k] for k in before):
        time.sleep(0.1)
        now = counts()
    return now


class Plane:
    """The control plane and the backends in their own processes (their threads and sockets
    are not counted here), one xDS client in this process."""

    def __init__(self, tmp: Path) -> None:
        self.http = BackendProc("h", "ok")
        self.grpc = BackendProc("g", "grpc")
        conf = tmp / "mesh"
        conf.mkdir()
        (conf / "http.yaml").write_text(service_yaml({"v1": self.http.port}))
        # the gRPC service as another host (both helpers name theirs "echo")
        grpc_yaml = mesh_yaml({"v1": self.grpc.port}).replace(GRPC_HOST, G_HOST)
        (conf / "grpc.yaml").write_text(grpc_yaml.replace("name: echo,", "name: gecho,"))
        self.cp = ControlPlaneProc(conf, free_port())
        data = generate_bootstrap(xds_address=self.cp.address, namespace="default")
        self.client = XdsClient(parse_bootstrap(json.dumps(data), source="test"))

    def close(self) -> None:
        self.client.close()
        for p in (self.cp, self.http, self.grpc):
            p.kill()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    p = Plane(tmp_path_factory.mktemp("hygiene"))
    yield p
    p.close()


SSL = ssl.create_default_context()  # httpx loads the CA bundle per client otherwise (70 ms)


def _cycles(
    kind: str, one: Callable[[], None], record: Any, tasks: Callable[[], int] | None = None
) -> None:
    for _ in range(20):  # warm up: the xDS watch, pools, grpc's own threads
        one()
    before = counts()
    tasks_before = tasks() if tasks else 0
    start = time.monotonic()
    failed = 0
    for _ in range(CYCLES):
        try:
            one()
        except Exception:
            failed += 1
    took = time.monotonic() - start
    after = settled(before)
    leaked_tasks = (tasks() - tasks_before) if tasks else 0
    leaks = {k: after[k] - before[k] for k in before if after[k] > before[k]}
    record(
        f"{kind}: {CYCLES:,} create/call/close cycles",
        cases=CYCLES,
        requests=CYCLES,
        failed=failed,
        note=f"{took:.1f} s; before {before}, after {after}, tasks leaked {leaked_tasks}",
    )
    assert failed == 0
    assert leaks == {}, (before, after)
    assert leaked_tasks <= 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_httpx_client_cycles(plane: Plane, record: Any) -> None:
    def one() -> None:
        with pymesh.httpx.Client(xds_client=plane.client, mesh_wait=10, verify=SSL) as c:
            assert c.get(URL).status_code == 200

    _cycles("pymesh.httpx.Client", one, record)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_httpx_async_client_cycles(plane: Plane, record: Any) -> None:
    async def main() -> None:
        async def one_async() -> None:
            async with pymesh.httpx.AsyncClient(
                xds_client=plane.client, mesh_wait=10, verify=SSL
            ) as c:
                assert (await c.get(URL)).status_code == 200

        loop = asyncio.get_running_loop()
        for _ in range(20):
            await one_async()
        before = counts()
        tasks_before = len(asyncio.all_tasks())
        start = time.monotonic()
        for _ in range(CYCLES):
            await one_async()
        took = time.monotonic() - start
        await asyncio.sleep(0.5)
        after = await loop.run_in_executor(None, settled, before)
        tasks_after = len(asyncio.all_tasks())
        leaks = {k: after[k] - before[k] for k in before if after[k] > before[k]}
        record(
            f"pymesh.httpx.AsyncClient: {CYCLES:,} create/call/close cycles",
            cases=CYCLES,
            requests=CYCLES,
            note=(
                f"{took:.1f} s; before {before}, after {after}, "
                f"tasks {tasks_before} -> {tasks_after}"
            ),
        )
        # run_in_executor's own worker thread may stay (the loop's default executor)
        leaks.pop("threads", None) if after["threads"] - before["threads"] <= 1 else None
        assert leaks == {}, (before, after)
        assert tasks_after <= tasks_before

    asyncio.run(main())


@pytest.mark.slow  # grpcio's own Channel.close() takes ~0.16 s
@pytest.mark.timeout(600)
def test_grpc_channel_cycles(plane: Plane, record: Any) -> None:
    def one() -> None:
        with pymesh.grpc.insecure_channel(TARGET, xds_client=plane.client) as ch:
            assert ch.unary_unary(WHO)(b"x", timeout=10) == b"g"

    _cycles("pymesh.grpc channel (sync)", one, record)


@pytest.mark.timeout(300)
def test_grpc_aio_channel_cycles(plane: Plane, record: Any) -> None:
    async def main() -> None:
        async def one_async() -> None:
            async with pymesh.grpc.aio.insecure_channel(TARGET, xds_client=plane.client) as ch:
                assert await ch.unary_unary(WHO)(b"x", timeout=10) == b"g"

        for _ in range(20):
            await one_async()
        before = counts()
        tasks_before = len(asyncio.all_tasks())
        start = time.monotonic()
        for _ in range(CYCLES):
            await one_async()
        took = time.monotonic() - start
        await asyncio.sleep(0.5)
        after = await asyncio.get_running_loop().run_in_executor(None, settled, before)
        tasks_after = len(asyncio.all_tasks())
        leaks = {k: after[k] - before[k] for k in before if after[k] > before[k]}
        record(
            f"pymesh.grpc.aio channel: {CYCLES:,} create/call/close cycles",
            cases=CYCLES,
            requests=CYCLES,
            note=(
                f"{took:.1f} s; before {before}, after {after}, "
                f"tasks {tasks_before} -> {tasks_after}"
            ),
        )
        leaks.pop("threads", None) if after["threads"] - before["threads"] <= 1 else None
        assert leaks == {}, (before, after)
        assert tasks_after <= tasks_before

    asyncio.run(main())
