"""Loopback fixtures for the httpx adapter: real uvicorn backends, the embedded control plane
and an explicit xDS client. Everything a fixture starts, it stops."""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.xds.client import XdsClient

HOST = "echo.default.svc.cluster.local"
PORT = 8080
TARGET = f"{HOST}:{PORT}"


class Backend:
    """A tiny ASGI app: answers its ``name``; behaviour is switchable at run time.

    ``status`` is what it answers (``fail_every`` N: every Nth request answers 503 instead);
    ``/sleep/MS`` sleeps first; ``/status/CODE`` answers CODE. Counts requests and the
    highest concurrency it saw.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.fail_every = 0
        self.delay = 0.0
        self.count = 0
        self.active = 0
        self.max_active = 0
        self.seen_headers: list[dict[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.count += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            if len(self.seen_headers) < 50:
                self.seen_headers.append(headers)
            path: str = scope["path"]
            status = self.status
            delay = self.delay
            if path.startswith("/sleep/"):
                delay = int(path.rsplit("/", 1)[1]) / 1000
            elif path.startswith("/status/"):
                status = int(path.rsplit("/", 1)[1])
            if self.fail_every and self.count % self.fail_every == 0:
                status = 503
            if delay:
                await asyncio.sleep(delay)
            body = json.dumps({"name": self.name, "path": path, "host": headers.get("host")})
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"x-backend", self.name.encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body.encode()})
        finally:
            self.active -= 1


class Upstream:
    """One uvicorn server in a thread, bound to 127.0.0.1 on a free port."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it: without it, uvicorn's two writes per response meet
        # Nagle + delayed ACK (40 ms per request) when the socket is passed in.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="error",
                lifespan="off",
                access_log=False,
                timeout_keep_alive=30,
                timeout_graceful_shutdown=0.5,  # tests leave slow requests behind
                **config,
            )
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> Upstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(10)
        self.sock.close()


@pytest.fixture
def upstreams() -> Iterator[Callable[..., tuple[Backend, Upstream]]]:
    """A factory of started backends; all stopped at the end."""
    started: list[Upstream] = []

    def make(name: str, **config: Any) -> tuple[Backend, Upstream]:
        backend = Backend(name)
        up = Upstream(backend, **config).start()
        started.append(up)
        return backend, up

    yield make
    for up in started:
        up.stop()


def service_yaml(
    endpoints: dict[str, int],
    *,
    virtual_service: str = "",
    destination_rule: str = "",
    extra: str = "",
) -> str:
    """A ServiceEntry ``echo`` with one endpoint per ``{version: port}`` (label version),
    a DestinationRule with a subset per version (``destination_rule`` adds trafficPolicy
    lines), and an optional VirtualService ``http:`` section."""
    eps = "\n".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{version: {v}}}}}"
        for v, port in endpoints.items()
    )
    subsets = "\n".join(f"  - {{name: {v}, labels: {{version: {v}}}}}" for v in endpoints)
    doc = (
        textwrap.dedent(
            f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: echo, namespace: default}}
        spec:
          hosts: [{HOST}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
          endpoints:
        """
        )
        + eps
        + "\n"
    )
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
    return doc + extra


class Mesh:
    """The embedded control plane over a temp config dir, and an xDS client of it."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "mesh"
        self.dir.mkdir()
        self.cp: ControlPlane | None = None
        self.client: XdsClient | None = None

    def write(self, text: str, name: str = "echo.yaml") -> None:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def start(self, **bootstrap: Any) -> Mesh:
        self.cp = ControlPlane(
            [self.dir],
            xds_address="127.0.0.1:0",
            admin_port=None,
            debounce=0.02,
            poll_interval=0.05,
        ).start()
        data = generate_bootstrap(xds_address=self.cp.address, namespace="default", **bootstrap)
        self.client = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cp is not None:
            self.cp.stop()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.stop()
