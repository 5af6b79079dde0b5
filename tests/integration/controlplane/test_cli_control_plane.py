"""``pymesh control-plane`` as a process: serves, answers /ready, stops cleanly on signals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.integration.controlplane._helpers import CDS, RawAds, http_get, make_node

MESH = textwrap.dedent(
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: web, namespace: default}
    spec:
      hosts: [web.default.svc.cluster.local]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 8080, name: http, protocol: HTTP}]
      endpoints: [{address: 127.0.0.1, ports: {http: 18080}}]
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_control_plane_command(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pymesh",
            "control-plane",
            "--config",
            str(tmp_path),
            "--xds-address",
            "127.0.0.1:0",
            "--admin-port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        banner = ""
        for _ in range(200):
            line = proc.stderr.readline()
            if not line:
                break
            if "pymesh control plane: xDS on" in line:
                banner = line
                break
        m = re.search(r"xDS on ([^,\s]+), admin (http://\S+)", banner)
        assert m, f"no banner; exit {proc.poll()}"
        xds, admin = m.group(1), m.group(2)
        assert http_get(admin + "/ready") == (200, "ready\n")
        configz = json.loads(http_get(admin + "/debug/configz")[1])
        (service,) = configz["config"]["services"]
        assert service["hostname"] == "web.default.svc.cluster.local"
        client = RawAds(xds)
        try:
            client.send(node=make_node("envoy-cli"), type_url=CDS)
            resp = client.recv(timeout=10)
            assert len(resp.resources) == 1
        finally:
            client.close()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_proxy_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pymesh.cli.main import main
    from pymesh.controlplane import ControlPlane
    from tests.integration.controlplane._helpers import TinyBackend, syncz, wait_for

    (tmp_path / "mesh.yaml").write_text('{"services": {"a.default.svc.cluster.local": [1]}}')
    with ControlPlane(
        [tmp_path], xds_address="127.0.0.1:0", admin_port=0, backend=TinyBackend()
    ) as cp:
        synced, nacked = RawAds(cp.address), RawAds(cp.address)
        try:
            synced.send(node=make_node("envoy-synced"), type_url=CDS)
            synced.ack(synced.recv())
            nacked.send(node=make_node("envoy-nacked"), type_url=CDS)
            nacked.ack(nacked.recv(), error="no thanks")
            wait_for(lambda: len(syncz(cp.admin_url)) == 2)
            wait_for(
                lambda: all(
                    s["types"]["CDS"]["acked"] or s["types"]["CDS"]["last_nack"]
                    for s in syncz(cp.admin_url)
                )
            )
            assert main(["proxy-status", "--control-plane", cp.admin_url]) == 0
            out = capsys.readouterr().out.splitlines()
            assert out[0].split() == ["NAME", "CDS", "LDS", "EDS", "RDS", "TYPE", "VERSION"]
            rows = {line.split()[0]: line for line in out[1:]}
            assert "SYNCED" in rows["envoy-synced"] and "NOT SENT" in rows["envoy-synced"]
            assert rows["envoy-nacked"].split()[1] == "NACKED"
            assert main(["proxy-status", "--control-plane", cp.admin_url, "nacked"]) == 0
            detail = capsys.readouterr().out
            assert '"message": "no thanks"' in detail
            assert main(["proxy-status", "--control-plane", cp.admin_url, "nobody"]) == 1
        finally:
            synced.close()
            nacked.close()
    assert main(["proxy-status", "--control-plane", "http://127.0.0.1:1"]) == 1
