"""Every workload has its admin endpoint without application code: the first mesh use
(``pymesh.httpx.Client()`` here) starts it, reports it to the control plane, and
``pymesh proxy-config`` finds it by the workload's name. Run as real processes (the
process-wide xDS client is process state)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pymesh.bootstrap import generate_bootstrap
from pymesh.cli.main import main
from pymesh.controlplane import ControlPlane

HOST = "echo.default.svc.cluster.local"

CHILD = textwrap.dedent(
    """
    import sys
    import pymesh.admin, pymesh.httpx
    with pymesh.httpx.Client(mesh_wait=10) as client:   # first mesh use in the process
        try:
            client.get(URL, timeout=2)                 # subscribes: the stream opens
        except Exception:
            pass
        admin = pymesh.admin.current()
        print(admin.address if admin is not None else "none", flush=True)
        sys.stdin.read()                               # until the test closes stdin
    """
).replace("URL", repr(f"http://{HOST}:8080/"))

MESH = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [{HOST}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: 1}}}}
"""


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    d = tmp_path / "mesh"
    d.mkdir()
    (d / "mesh.yaml").write_text(MESH)
    with ControlPlane([d], xds_address="127.0.0.1:0", admin_port=0) as cp:
        yield cp


def _workload(cp: ControlPlane, name: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    bootstrap = generate_bootstrap(xds_address=cp.address, namespace="default", workload=name)
    environ = {
        **os.environ,
        "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap),
        "PYTHONPATH": str(Path(__file__).parents[3]),
        **env,
    }
    environ.pop("GRPC_XDS_BOOTSTRAP", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=environ,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"workload process printed nothing: {err}")
    return proc, line


def _stop(proc: subprocess.Popen[str]) -> str:
    _, err = proc.communicate(input="", timeout=20)
    return err


def _syncz(cp: ControlPlane, proxy_part: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(cp.admin_url + "/debug/syncz", timeout=5) as r:
            streams = json.loads(r.read())
        found = [s for s in streams if proxy_part in s["proxy"]]
        if found:
            return dict(found[0])
        assert time.monotonic() < deadline, streams
        time.sleep(0.05)


def test_first_mesh_use_starts_the_admin_endpoint_and_reports_it(
    control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)  # the configured port is in use: a free one instead, logged
    busy = taken.getsockname()[1]
    proc, address = _workload(control_plane, "echo-client-v1", PYMESH_ADMIN_PORT=str(busy))
    try:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) not in (0, busy)
        with urllib.request.urlopen(f"http://{address}/config_dump", timeout=5) as r:
            dump = json.loads(r.read())
        assert any(res.get("name", "").endswith(HOST + ":8080") for res in dump["resources"])
        stream = _syncz(control_plane, "echo-client-v1")
        assert stream["admin"] == address  # reported in the node metadata
        # proxy-config by name, through the control plane
        code = main(["proxy-config", "clusters", "echo-client-v1", "--no-color",
                     "--control-plane", control_plane.admin_url])  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0
        assert any(line.split()[:4] == [HOST, "8080", "-", "outbound"] for line in out.splitlines())
        assert main(["proxy-status", "-o", "json", "--control-plane",
                     control_plane.admin_url]) == 0  # fmt: skip
        status = json.loads(capsys.readouterr().out)
        assert [s["admin"] for s in status if "echo-client-v1" in s["proxy"]] == [address]
        # an unknown name: exit 1, one line
        assert main(["proxy-config", "clusters", "nobody",
                     "--control-plane", control_plane.admin_url]) == 1  # fmt: skip
        assert "no workload connected" in capsys.readouterr().err
    finally:
        err = _stop(proc)
        taken.close()
    assert f"127.0.0.1:{busy} unavailable" in err


def test_admin_endpoint_off(
    control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, address = _workload(control_plane, "quiet-v1", PYMESH_ADMIN_PORT="off")
    try:
        assert address == "none"
        assert _syncz(control_plane, "quiet-v1")["admin"] is None
        code = main(["proxy-config", "clusters", "quiet-v1",
                     "--control-plane", control_plane.admin_url])  # fmt: skip
        assert code == 1
        assert "reported no admin endpoint" in capsys.readouterr().err
    finally:
        _stop(proc)


def test_shared_client_hook_in_process(control_plane: ControlPlane) -> None:
    """The hook itself: the address in the node metadata, the endpoint registered as the
    process's, stopped with the client; a bad setting starts nothing and raises nothing."""
    import pymesh.admin
    from pymesh.admin._auto import ADMIN_ADDRESS_KEY, shared_client
    from pymesh.bootstrap import parse_bootstrap
    from pymesh.xds.client import XdsClient

    bootstrap = parse_bootstrap(
        json.dumps(generate_bootstrap(xds_address=control_plane.address, namespace="default")),
        source="test",
    )
    assert pymesh.admin.current() is None
    for env in ({"PYMESH_ADMIN_PORT": "off"}, {"PYMESH_ADMIN_PORT": "http"},
                {"PYMESH_ADMIN_PORT": "70000"}):  # fmt: skip
        with shared_client(XdsClient, bootstrap, env=env) as client:
            assert ADMIN_ADDRESS_KEY not in client.bootstrap.node.metadata
            assert pymesh.admin.current() is None
    client = shared_client(XdsClient, bootstrap, env={"PYMESH_ADMIN_PORT": "0"})
    try:
        server = pymesh.admin.current()
        assert server is not None
        assert client.bootstrap.node.metadata[ADMIN_ADDRESS_KEY] == server.address
        assert client.bootstrap.node.id == bootstrap.node.id
        with urllib.request.urlopen(f"http://{server.address}/ready", timeout=5) as r:
            assert r.status == 200
    finally:
        client.close()
    assert pymesh.admin.current() is None  # stopped with its client
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{server.address}/ready", timeout=2)
    # IPv6 loopback
    v6 = {"PYMESH_ADMIN_PORT": "0", "PYMESH_ADMIN_HOST": "::1"}
    with shared_client(XdsClient, bootstrap, env=v6) as client:
        server = pymesh.admin.current()
        assert server is not None and server.address.startswith("[::1]:")
        assert client.bootstrap.node.metadata[ADMIN_ADDRESS_KEY] == server.address
        with urllib.request.urlopen(f"http://{server.address}/ready", timeout=5) as r:
            assert r.status == 200
    assert pymesh.admin.current() is None
