"""Loopback helpers for the mesh gRPC client tests: real grpcio echo servers, the embedded
control plane over a temp config dir, an explicit xDS client. Everything started is stopped
by the fixture that started it (fixtures ``echo_servers`` and ``grpc_mesh``, imported by the
test modules)."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.xds.client import XdsClient

HOST = "echo.default.svc.cluster.local"
PORT = 7070
TARGET = f"xds:///{HOST}:{PORT}"

WHO = "/echo.Echo/Who"
STREAM = "/echo.Echo/Stream"
COLLECT = "/echo.Echo/Collect"
CHAT = "/echo.Echo/Chat"
OTHER = "/other.Other/Who"


class EchoServer:
    """A grpcio server answering its ``name``; behaviour switchable at run time.

    ``fail_code`` (a ``grpc.StatusCode``) with ``fail_every`` N: every Nth call fails with it
    (1 = every call). ``delay`` seconds before answering. Metadata ``x-sleep-ms`` sleeps,
    ``x-fail`` (a code name) fails (with ``x-pushback-ms``: that ``grpc-retry-pushback-ms``
    trailing metadata), ``x-fail-after-first`` makes ``Stream`` fail UNAVAILABLE
    after its first message. Counts calls and the highest concurrency.
    """

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.fail_code: grpc.StatusCode | None = None
        self.fail_every = 1
        self.delay = 0.0
        self.count = 0
        self.active = 0
        self.max_active = 0
        self.seen_metadata: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        handler = grpc.method_handlers_generic_handler(
            "echo.Echo",
            {
                "Who": grpc.unary_unary_rpc_method_handler(self._who),
                "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
                "Collect": grpc.stream_unary_rpc_method_handler(self._collect),
                "Chat": grpc.stream_stream_rpc_method_handler(self._chat),
            },
        )
        other = grpc.method_handlers_generic_handler(
            "other.Other", {"Who": grpc.unary_unary_rpc_method_handler(self._who)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        self.server.add_generic_rpc_handlers((handler, other))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)

    def _enter(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        with self._lock:
            self.count += 1
            n = self.count
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if len(self.seen_metadata) < 50:
                self.seen_metadata.append(md)
        try:
            sleep = float(md.get("x-sleep-ms", 0)) / 1000 or self.delay
            if sleep:
                time.sleep(sleep)
            code = self.fail_code
            if code is not None and n % self.fail_every == 0:
                context.abort(code, f"{self.name} failing")
            if "x-fail" in md:
                if "x-pushback-ms" in md:  # gRFC A6: the server's retry pushback
                    context.set_trailing_metadata(
                        (("grpc-retry-pushback-ms", str(md["x-pushback-ms"])),)
                    )
                context.abort(grpc.StatusCode[str(md["x-fail"])], f"{self.name} x-fail")
        except BaseException:
            with self._lock:
                self.active -= 1
            raise

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1

    def _who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._enter(context)
        self._leave()
        return self.name.encode()

    def _stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._enter(context)
        fail_after = "x-fail-after-first" in dict(context.invocation_metadata())
        try:
            for i in range(int(request or b"3")):
                yield f"{self.name}:{i}".encode()
                if fail_after:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} mid-stream")
        finally:
            self._leave()

    def _collect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        items = list(requests)
        self._enter(context)
        self._leave()
        return f"{self.name}:{b','.join(items).decode()}".encode()

    def _chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._enter(context)
        try:
            for r in requests:
                yield f"{self.name}:{r.decode()}".encode()
        finally:
            self._leave()


@pytest.fixture
def echo_servers() -> Iterator[Callable[[str], EchoServer]]:
    started: list[EchoServer] = []

    def make(name: str) -> EchoServer:
        server = EchoServer(name)
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


def mesh_yaml(
    endpoints: dict[str, int],
    *,
    virtual_service: str = "",
    destination_rule: str = "",
) -> str:
    """ServiceEntry ``echo`` (GRPC port 7070) with one endpoint per ``{version: port}``,
    a DestinationRule with a subset per version (``destination_rule``: trafficPolicy lines)
    and an optional VirtualService ``http:`` section."""
    eps = "\n".join(
        f"  - {{address: 127.0.0.1, ports: {{grpc: {port}}}, labels: {{version: {v}}}}}"
        for v, port in endpoints.items()
    )
    subsets = "\n".join(f"  - {{name: {v}, labels: {{version: {v}}}}}" for v in endpoints)
    doc = textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: echo, namespace: default}}
        spec:
          hosts: [{HOST}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: {PORT}, name: grpc, protocol: GRPC}}]
          endpoints:
        """
    )
    doc += eps + "\n"
    doc += textwrap.dedent(
        f"""\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: echo, namespace: default}}
        spec:
          host: {HOST}
        """
    )
    if destination_rule:
        doc += textwrap.indent(textwrap.dedent(destination_rule), "  ")
    doc += "  subsets:\n" + subsets + "\n"
    if virtual_service:
        doc += textwrap.dedent(
            f"""\
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {{name: echo, namespace: default}}
            spec:
              hosts: [{HOST}]
            """
        ) + textwrap.indent(textwrap.dedent(virtual_service), "  ")
    return doc


class GrpcMesh:
    """The embedded control plane over a temp config dir, and an xDS client of it."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "mesh"
        self.dir.mkdir()
        self.cp: ControlPlane | None = None
        self.client: XdsClient | None = None
        self.bootstrap: dict[str, Any] = {}

    def write(self, text: str, name: str = "echo.yaml") -> None:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def start(self) -> GrpcMesh:
        self.cp = ControlPlane(
            [self.dir],
            xds_address="127.0.0.1:0",
            admin_port=None,
            debounce=0.02,
            poll_interval=0.05,
        ).start()
        self.bootstrap = generate_bootstrap(xds_address=self.cp.address, namespace="default")
        self.client = XdsClient(parse_bootstrap(json.dumps(self.bootstrap), source="test"))
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cp is not None:
            self.cp.stop()


@pytest.fixture
def grpc_mesh(tmp_path: Path) -> Iterator[GrpcMesh]:
    m = GrpcMesh(tmp_path)
    yield m
    m.stop()


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.02)
