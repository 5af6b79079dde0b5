"""Two real workloads: ``ratings-v1`` is a ``pymesh.serve`` program configured only by its
environment (``GRPC_XDS_BOOTSTRAP``, ``PYMESH_TELEMETRY=on``, ``PYMESH_PROMETHEUS_ADDRESS``),
``productpage-v1`` is this test with a ``pymesh.httpx`` client. After known traffic, each
side's Prometheus endpoint names the other through the metadata exchange: the server
reporter's ``source_*`` and the client reporter's ``destination_workload`` (which the
embedded control plane's endpoint metadata does not carry)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import pymesh.httpx
from pymesh import telemetry
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.xds.client import XdsClient
from tests.integration.asgi.conftest import Mesh
from tests.integration.httpx.conftest import HOST, PORT, service_yaml
from tests.integration.telemetry.conftest import scrape, scrape_until, select, value

PROGRAM = textwrap.dedent(
    """\
    import sys
    import pymesh

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"5 stars"})

    pymesh.serve(app, port=int(sys.argv[1]), host="127.0.0.1", log_level="warning")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def asgi_mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.stop()


def test_server_and_client_reporters_name_each_other(
    asgi_mesh: Mesh, tmp_path: Path, installed: Callable[..., telemetry.Telemetry]
) -> None:
    mesh = asgi_mesh
    cp = mesh.start_cp()
    port, prom_port = _free_port(), _free_port()
    mesh.write("ratings.yaml", service_yaml({"v1": port}))
    bootstrap = tmp_path / "ratings.json"
    bootstrap.write_text(json.dumps(generate_bootstrap(
        xds_address=cp.address, namespace="default", workload="ratings-v1",
        labels={"app": "ratings", "version": "v1"}, ip="127.0.0.1",
    )))  # fmt: skip
    script = tmp_path / "ratings.py"
    script.write_text(PROGRAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_XDS", "PYMESH_"))}
    env |= {
        "GRPC_XDS_BOOTSTRAP": str(bootstrap),
        "PYMESH_TELEMETRY": "on",
        "PYMESH_PROMETHEUS_ADDRESS": f"127.0.0.1:{prom_port}",
        "PYMESH_ADMIN_PORT": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    data = generate_bootstrap(
        xds_address=cp.address,
        namespace="default",
        workload="productpage-v1",
        labels={"app": "productpage", "version": "v1"},
    )
    client_xds = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
    try:
        deadline = time.monotonic() + 30
        while True:  # serving (the inbound listener arrived)
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "pymesh.serve never served"
            time.sleep(0.1)
        tel = installed(node=client_xds.bootstrap.node)
        with pymesh.httpx.Client(xds_client=client_xds, mesh_wait=10) as client:
            for _ in range(3):
                r = client.get(f"http://{HOST}:{PORT}/")
                assert r.status_code == 200 and r.text == "5 stars"
        server_samples = scrape_until(f"http://127.0.0.1:{prom_port}/stats/prometheus",
                                      "istio_requests_total", 3, reporter="destination",
                                      source_workload="productpage-v1")  # fmt: skip
        client_samples = scrape(tel.serve_prometheus(port=0).url)
    finally:
        client_xds.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert "Traceback" not in err, err[-2000:]
    # the server reporter of ratings-v1 names its caller
    from_productpage = select(server_samples, "istio_requests_total", reporter="destination",
                              source_workload="productpage-v1")  # fmt: skip
    assert len(from_productpage) == 1, server_samples
    labels = from_productpage[0][1]
    assert from_productpage[0][2] == 3
    assert (labels["source_app"], labels["source_version"]) == ("productpage", "v1")
    assert labels["source_workload_namespace"] == "default"
    assert (labels["destination_workload"], labels["destination_app"]) == ("ratings-v1", "ratings")
    assert labels["response_code"] == "200" and labels["connection_security_policy"] == "none"
    # the readiness probes came without metadata: an unknown source
    assert value(server_samples, "istio_requests_total", reporter="destination",
                 source_workload="unknown", response_code="200") >= 1  # fmt: skip
    # the client reporter of productpage-v1 names the real peer
    to_ratings = select(client_samples, "istio_requests_total", reporter="source")
    assert [s[2] for s in to_ratings] == [3]
    labels = to_ratings[0][1]
    assert labels["destination_workload"] == "ratings-v1"
    assert (labels["destination_app"], labels["destination_version"]) == ("ratings", "v1")
    assert labels["destination_service"] == HOST
