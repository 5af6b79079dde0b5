"""``pymesh proxy-status`` and ``pymesh proxy-config`` against a running control plane and
two workloads with traffic through them (see conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pymesh.cli.main import main
from tests.integration.cli.conftest import GRPC_HOST, GRPC_PORT, HOST, PORT, MeshWorld

V1 = f"outbound|{PORT}|v1|{HOST}"
V2 = f"outbound|{PORT}|v2|{HOST}"
ROUTE = f"outbound|{PORT}||{HOST}"
RATINGS = f"outbound|{GRPC_PORT}||{GRPC_HOST}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and rows, split on runs of 2+ spaces (cells may hold one space)."""
    import re

    lines = [line for line in out.splitlines() if line.strip()]
    split = [re.split(r" {2,}", line.strip()) for line in lines]
    return split[0], split[1:]


# -- proxy-status -----------------------------------------------------------------------


def test_proxy_status_table(world: MeshWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "proxy-status", "--control-plane", world.cp.admin_url)
    assert code == 0, err
    assert "\x1b[" not in out  # not a TTY: no colour
    header, rows = table(out)
    assert header == ["NAME", "CDS", "LDS", "EDS", "RDS", "TYPE", "VERSION"]
    by_name = {r[0]: r for r in rows}
    assert len(by_name) == 2
    pp = next(r for n, r in by_name.items() if "productpage-v1.default" in n)
    rv = next(r for n, r in by_name.items() if "reviews-v1.default" in n)
    for row in (pp, rv):
        assert row[1:5] == ["SYNCED"] * 4
        assert row[5] == "sotw/grpc"  # proxyless generator, State of the World


def test_proxy_status_json_and_yaml(world: MeshWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "proxy-status", "--control-plane", world.cp.admin_url, "-o", "json")
    assert code == 0
    data = json.loads(out)
    assert {d["proxy"].split("~")[2] for d in data} == {
        "productpage-v1.default",
        "reviews-v1.default",
    }
    for d in data:
        assert set(d["types"]) == {"CDS", "EDS", "LDS", "RDS"}
        for t in d["types"].values():
            assert t["status"] == "SYNCED"
            assert t["acked_version"] == t["sent_version"] is not None
            assert t["nacked_version"] is None
    code, out, _ = run(capsys, "proxy-status", "--control-plane", world.cp.admin_url, "-o", "yaml")
    assert code == 0
    assert yaml.safe_load(out) == data
    # One proxy's details, by a part of its node id.
    code, out, _ = run(capsys, "proxy-status", "--control-plane", world.cp.admin_url, "reviews")
    assert code == 0
    (detail,) = json.loads(out)
    # A proxyless client names what it needs (no wildcard CDS).
    assert sorted(detail["types"]["CDS"]["resource_names"]) == [V1, V2]
    assert sorted(detail["types"]["EDS"]["resource_names"]) == [V1, V2]
    assert detail["types"]["LDS"]["resource_names"] == [
        f"{HOST}:{PORT}",
        f"xds.istio.io/grpc/lds/inbound/127.0.0.1:{world.grpc_port}",
    ]


def test_proxy_status_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "proxy-status", "--control-plane", "http://127.0.0.1:1")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "cannot reach the control plane at http://127.0.0.1:1/debug/syncz" in err


# -- proxy-config ----------------------------------------------------------------------


def test_clusters(world: MeshWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "proxy-config", "clusters", world.productpage.admin.address)
    assert code == 0, err
    header, rows = table(out)
    assert header == ["SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "DESTINATION RULE"]
    assert rows == [
        [HOST, str(PORT), "v1", "outbound", "EDS", "-"],
        [HOST, str(PORT), "v2", "outbound", "EDS", "-"],
        [GRPC_HOST, str(GRPC_PORT), "-", "outbound", "EDS", "-"],
    ]
    code, out, _ = run(
        capsys, "proxy-config", "clusters", world.productpage.admin.address, "-o", "json"
    )
    data = json.loads(out)
    assert [(r["name"], r["status"]) for r in data] == [
        (RATINGS, "ACKED"),
        (V1, "ACKED"),
        (V2, "ACKED"),
    ]
    assert data[1]["config"]["outlier_detection"]["consecutive_5xx"] == 1


def test_endpoints_show_outlier_ejection(
    world: MeshWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # productpage never sent to v2: its endpoints are healthy, not ejected. The gRPC
    # cluster's endpoint is reviews' server.
    code, out, _ = run(capsys, "proxy-config", "endpoints", world.productpage.admin.address)
    assert code == 0
    header, rows = table(out)
    assert header == ["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"]
    assert [r[1:] for r in rows] == [
        ["HEALTHY", "OK", RATINGS],
        ["HEALTHY", "OK", V1],
        ["HEALTHY", "OK", V2],
    ]
    assert rows[0][0] == f"127.0.0.1:{world.grpc_port}"
    assert rows[1][0].startswith("127.0.0.1:")
    # reviews got 503s from v2: consecutive5xxErrors 1 ejected it (in reviews' runtime only).
    code, out, _ = run(capsys, "proxy-config", "endpoints", world.reviews.admin.address)
    _, rows = table(out)
    assert [r[1:] for r in rows] == [["HEALTHY", "OK", V1], ["HEALTHY", "FAILED", V2]]
    code, out, _ = run(
        capsys,
        "proxy-config",
        "endpoints",
        world.reviews.admin.address,
        "--fqdn",
        "|v2|",
        "-o",
        "json",
    )
    (v2,) = json.loads(out)
    assert v2["name"] == V2
    assert v2["usable_hosts"] == 0
    assert v2["outlier_detection"]["ejections_active"] == 1
    (host,) = v2["hosts"]
    assert host["outlier"]["ejected"] is True and host["outlier"]["ejections_total"] == 1
    assert 0 < host["outlier"]["ejected_for_s"] <= 300 * 1.5
    assert world.v2.count >= 1


def test_routes(world: MeshWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "proxy-config", "routes", world.productpage.admin.address)
    assert code == 0
    header, rows = table(out)
    assert header == ["NAME", "VHOST NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE"]
    domains = "echo, echo.default + 2 more..."
    assert rows == [
        [RATINGS, f"{GRPC_HOST}:{GRPC_PORT}", "ratings, ratings.default + 2 more...", "/*", "-"],
        [ROUTE, f"{HOST}:{PORT}", domains, "/*", "-"],
        [ROUTE, f"{HOST}:{PORT}", domains, "/*", "-"],
    ]
    code, out, _ = run(
        capsys,
        "proxy-config",
        "routes",
        world.productpage.admin.address,
        "--fqdn",
        "echo",
        "-o",
        "yaml",
    )
    (route,) = yaml.safe_load(out)
    vhost = route["config"]["virtual_hosts"][0]
    assert vhost["routes"][0]["match"]["headers"][0]["name"] == "x-subset"
    assert vhost["routes"][1]["route"]["cluster"] == V1


def test_listeners(world: MeshWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "proxy-config", "listeners", world.reviews.admin.address)
    assert code == 0
    header, rows = table(out)
    assert header == ["ADDRESS/NAME", "PORT", "TYPE", "DESTINATION"]
    # The client listener of echo, and the gRPC server's inbound listener (PERMISSIVE: an
    # mTLS chain and a plaintext one).
    grpc_port = str(world.grpc_port)
    assert rows == [
        [HOST, str(PORT), "HTTP", f"Route: {ROUTE}"],
        ["127.0.0.1", grpc_port, "HTTP", "Inline Route: inbound [inbound-mtls]"],
        ["127.0.0.1", grpc_port, "HTTP", "Inline Route: inbound [inbound-plaintext]"],
    ]
    code, out, _ = run(capsys, "proxy-config", "listeners", world.productpage.admin.address)
    _, rows = table(out)
    assert rows == [
        [HOST, str(PORT), "HTTP", f"Route: {ROUTE}"],
        [GRPC_HOST, str(GRPC_PORT), "HTTP", f"Route: {RATINGS}"],
    ]


def test_secrets(world: MeshWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "proxy-config", "secrets", world.reviews.admin.address)
    assert code == 0
    header, rows = table(out)
    assert header == [
        "RESOURCE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ]
    assert [r[:5] for r in rows[:1]] == [
        ["default", "Cert Chain", "ACTIVE", "true", world.reviews_serial]
    ]
    assert rows[1][:4] == ["ROOTCA", "CA", "ACTIVE", "true"]
    code, out, _ = run(capsys, "proxy-config", "secrets", world.reviews.admin.address, "-o", "json")
    (default,) = json.loads(out)
    assert default["identity"] == "spiffe://cluster.local/ns/default/sa/reviews"
    # productpage has no certificate provider: an empty table.
    code, out, _ = run(capsys, "proxy-config", "secrets", world.productpage.admin.address)
    assert code == 0 and len(out.strip().splitlines()) == 1


def test_colour_only_on_request(world: MeshWorld) -> None:
    from pymesh.cli._output import colour_enabled, render_table

    class Tty:
        def isatty(self) -> bool:
            return True

    assert colour_enabled(Tty()) is True  # type: ignore[arg-type]
    assert colour_enabled(Tty(), no_color=True) is False  # type: ignore[arg-type]
    text = render_table(("A", "STATUS"), [("x", "NACKED"), ("y", "SYNCED")], colour=True)
    assert "\x1b[31mNACKED\x1b[0m" in text and "\x1b[32mSYNCED\x1b[0m" in text
    assert "\x1b[1mA" in text


def test_errors_and_exit_codes(world: MeshWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "proxy-config", "clusters", "127.0.0.1:1")
    assert code == 1 and out == ""
    assert err.strip().startswith("pymesh proxy-config: error: cannot reach the workload admin")
    assert err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["proxy-config", "nonsense", world.reviews.admin.address])
    assert exc.value.code == 2
    capsys.readouterr()
    # no port: a workload name, looked up in the control plane (unreachable here)
    code, out, err = run(
        capsys, "proxy-config", "clusters", "reviews", "--control-plane", "http://127.0.0.1:1"
    )
    assert code == 1 and out == ""
    assert err.startswith("pymesh proxy-config: error: cannot reach the control plane")
    code, _, _ = run(capsys, "proxy-config", "clusters", f"http://{world.reviews.admin.address}")
    assert code == 0  # a URL works too
    # As a process: one line on stderr, no traceback, exit 1.
    proc = subprocess.run(
        [sys.executable, "-m", "pymesh", "proxy-config", "routes", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
