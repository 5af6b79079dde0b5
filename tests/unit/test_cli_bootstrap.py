"""``pymesh bootstrap`` end to end, and grpcio's own xDS client as the oracle for the bootstrap.

grpcio (C-core) reads the same ``GRPC_XDS_BOOTSTRAP`` file in a subprocess and opens its ADS
stream to a recording server on loopback; the Node it sends and the Listener name it asks for
must be what :mod:`pymesh.bootstrap` computed from the same file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from pymesh.bootstrap import Bootstrap, load_bootstrap, parse_bootstrap, thaw_json
from pymesh.cli.main import main
from pymesh.errors import BootstrapError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "bootstrap"
ISTIO_AGENT = FIXTURES / "istio-agent-grpc-bootstrap.json"


# -- the command -------------------------------------------------------------------------


def test_cli_writes_a_file_that_loads(tmp_path: Path) -> None:
    out = tmp_path / "bootstrap.json"
    rc = main(
        [
            "bootstrap",
            "--xds-address", "127.0.0.1:15010",
            "--xds-address", "unix:///var/run/pymesh/xds.sock",
            "--namespace", "bookinfo",
            "--service-account", "bookinfo-ratings",
            "--label", "app=ratings",
            "--label", "version=v1",
            "--ip", "10.1.2.3",
            "--port", "9080",
            "--port", "grpc:9090",
            "--cluster-id", "east",
            "--trust-domain", "example.org",
            "--locality", "us-east1/us-east1-b",
            "--cert-dir", "/etc/certs",
            "--delta",
            "--ignore-resource-deletion",
            "-o", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    b = load_bootstrap({"GRPC_XDS_BOOTSTRAP": str(out)})
    assert [s.uri for s in b.xds_servers] == [
        "127.0.0.1:15010",
        "unix:///var/run/pymesh/xds.sock",
    ]
    for server in b.xds_servers:
        assert server.supports_delta
        assert server.ignore_resource_deletion
        assert server.channel_credentials.type == "insecure"
    node = b.node
    assert node.id == "sidecar~10.1.2.3~ratings-v1.bookinfo~bookinfo.svc.cluster.local"
    assert node.namespace == "bookinfo"
    assert node.service_account == "bookinfo-ratings"
    assert dict(node.labels) == {"app": "ratings", "version": "v1"}
    assert node.instance_ips == ("10.1.2.3",)
    assert [(p.name, p.port) for p in node.ports] == [("", 9080), ("grpc", 9090)]
    assert node.cluster_id == "east"
    assert node.spiffe_id == "spiffe://example.org/ns/bookinfo/sa/bookinfo-ratings"
    assert str(node.locality) == "us-east1/us-east1-b"
    fw = b.certificate_providers["default"].file_watcher
    assert fw is not None
    assert fw.certificate_file == "/etc/certs/cert-chain.pem"
    assert fw.private_key_file == "/etc/certs/key.pem"
    assert fw.ca_certificate_file == "/etc/certs/root-cert.pem"
    assert b.server_listener_resource_name_template == "xds.istio.io/grpc/lds/inbound/%s"
    assert not list(tmp_path.glob(".bootstrap-*"))  # no temp file left behind


def test_cli_registration_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bootstrap", "--group", "reviews", "--network", "net-east"]
    argv += ["--meta", "PYMESH_HEALTH=DRAINING", "--meta", 'EXTRA={"k": [1, 2]}']
    argv += ["--meta", "VERSION=1.0"]
    assert main(argv) == 0
    b = parse_bootstrap(capsys.readouterr().out, source="stdout")
    assert b.node.auto_register_group == "reviews"
    assert b.node.network == "net-east"
    assert b.node.metadata["PYMESH_HEALTH"] == "DRAINING"
    assert b.node.metadata["VERSION"] == "1.0"  # a string, not a number
    assert thaw_json(b.node.metadata["EXTRA"]) == {"k": [1, 2]}


def test_cli_defaults_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bootstrap"]) == 0
    data = json.loads(capsys.readouterr().out)
    b = parse_bootstrap(json.dumps(data), source="stdout")
    assert b.xds_servers[0].uri == "127.0.0.1:15010"
    assert b.node.id == "sidecar~127.0.0.1~default.default~default.svc.cluster.local"
    assert b.node.generator == "grpc"
    assert "certificate_providers" not in data


def test_cli_makes_file_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["bootstrap", "--cert-dir", "certs", "--tls-ca", "ca.pem"]) == 0
    data = json.loads(capsys.readouterr().out)
    config = data["certificate_providers"]["default"]["config"]
    assert config["certificate_file"] == str(tmp_path / "certs" / "cert-chain.pem")
    tls = data["xds_servers"][0]["channel_creds"][0]["config"]
    assert tls == {"ca_certificate_file": str(tmp_path / "ca.pem")}


def test_cli_tls_channel_creds(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bootstrap", "--tls-ca", "/ca.pem", "--tls-cert", "/c.pem", "--tls-key", "/k.pem"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["xds_servers"][0]["channel_creds"] == [
        {
            "type": "tls",
            "config": {
                "ca_certificate_file": "/ca.pem",
                "certificate_file": "/c.pem",
                "private_key_file": "/k.pem",
            },
        }
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--label", "novalue"], "--label 'novalue': expected KEY=VALUE"),
        (["--meta", "novalue"], "--meta 'novalue': expected KEY=VALUE"),
        (["--meta", "K={bad"], "VALUE is not valid JSON"),
        (["--port", "http:99999"], "--port 'http:99999'"),
        (["--namespace", "Not_A_Label"], "field namespace"),
        (["--ip", "10.0.0"], "field ip"),
        (["--xds-address", "https://istiod:15012"], "unsupported scheme"),
        (["--tls-cert", "/c.pem"], "tls_cert and tls_key must be given together"),
        (["--locality", "a/b/c/d"], "is not REGION[/ZONE[/SUBZONE]]"),
        (["-o", "/nonexistent-dir/b.json"], "/nonexistent-dir/b.json: cannot write"),
    ],
)
def test_cli_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bootstrap", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("pymesh bootstrap: error: ")
    assert message in err
    assert "\n" not in err and "Traceback" not in err


def test_cli_check(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP", str(ISTIO_AGENT))
    assert main(["bootstrap", "--check"]) == 0
    out = capsys.readouterr().out
    assert f"source:     {ISTIO_AGENT}" in out
    assert "unix:///etc/istio/proxy/XDS creds=insecure features=xds_v3" in out
    assert "spiffe://cluster.local/ns/ns/sa/echo-sa" in out
    assert "cert provider default: file_watcher" in out
    assert main(["bootstrap", "--check", str(ISTIO_AGENT)]) == 0
    assert f"source:     {ISTIO_AGENT}" in capsys.readouterr().out
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", "{}")
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP")
    assert main(["bootstrap", "--check"]) == 1
    err = capsys.readouterr().err
    assert "GRPC_XDS_BOOTSTRAP_CONFIG: field xds_servers: is required" in err


# -- grpcio's xDS client as the oracle ------------------------------------------------------

_ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


class RecordingAds:
    """A loopback ADS server that records the first DiscoveryRequest of any stream."""

    def __init__(self) -> None:
        self.requests: list[discovery_pb2.DiscoveryRequest] = []
        self.received = threading.Event()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            _ADS_SERVICE,
            {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(self._stream)},
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for raw in requests:
            self.requests.append(discovery_pb2.DiscoveryRequest.FromString(raw))
            self.received.set()
        yield from ()

    def stop(self) -> None:
        self._server.stop(0)


@pytest.fixture
def ads() -> Iterator[RecordingAds]:
    server = RecordingAds()
    yield server
    server.stop()


_CLIENT = """
import grpc, sys
channel = grpc.insecure_channel(sys.argv[1])
try:
    channel.unary_unary("/pymesh.Probe/Call")(b"", timeout=15)
except grpc.RpcError as exc:
    print(exc.details(), flush=True)
"""

_SERVER = """
import grpc, sys, time
from concurrent import futures
server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), xds=True)
server.add_insecure_port(sys.argv[1])
server.start()
time.sleep(15)
"""


def run_grpcio(bootstrap_path: Path, mode: str, arg: str, ads: RecordingAds | None) -> str:
    """Start grpcio with ``GRPC_XDS_BOOTSTRAP``; return when it asked ``ads`` for a resource.

    Without ``ads`` the process is expected to fail fast; its output is returned.
    """
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap_path), "GRPC_VERBOSITY": "NONE"}
    env.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
    code = _CLIENT if mode == "client" else _SERVER
    proc = subprocess.Popen(
        [sys.executable, "-c", code, arg],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        if ads is not None:
            assert ads.received.wait(30), "grpcio never opened an ADS stream"
            return ""
        out, _ = proc.communicate(timeout=30)
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def pointed_at(data: dict[str, Any], ads: RecordingAds, tmp_path: Path) -> tuple[Path, Bootstrap]:
    data = json.loads(json.dumps(data))
    data["xds_servers"][0]["server_uri"] = f"127.0.0.1:{ads.port}"
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(data))
    return path, load_bootstrap({"GRPC_XDS_BOOTSTRAP": str(path)})


def assert_same_node(request: discovery_pb2.DiscoveryRequest, b: Bootstrap) -> None:
    node = request.node
    assert node.id == b.node.id
    assert node.cluster == b.node.cluster
    assert node.locality.region == b.node.locality.region
    assert node.locality.zone == b.node.locality.zone
    assert node.locality.sub_zone == b.node.locality.sub_zone
    assert json_format.MessageToDict(node.metadata) == thaw_json(b.node.metadata)


def test_grpcio_reads_the_istio_agent_bootstrap_as_we_do(ads: RecordingAds, tmp_path: Path) -> None:
    path, b = pointed_at(json.loads(ISTIO_AGENT.read_text()), ads, tmp_path)
    run_grpcio(path, "client", "xds:///echo.ns.svc.cluster.local:7070", ads)
    first = ads.requests[0]
    assert first.type_url == "type.googleapis.com/envoy.config.listener.v3.Listener"
    assert list(first.resource_names) == [
        b.listener_resource_name(None, "echo.ns.svc.cluster.local:7070")
    ]
    assert_same_node(first, b)
    assert b.node.metadata["GENERATOR"] == "grpc"


def test_grpcio_reads_the_generated_bootstrap_as_we_do(
    ads: RecordingAds, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bootstrap", "--namespace", "bookinfo", "--label", "app=reviews", "--port", "9080"]
    argv += ["--locality", "r/z/s", "--cert-dir", str(tmp_path), "--delta"]
    assert main(argv) == 0
    path, b = pointed_at(json.loads(capsys.readouterr().out), ads, tmp_path)
    run_grpcio(path, "client", "xds:///reviews.bookinfo.svc.cluster.local:9080", ads)
    first = ads.requests[0]
    assert list(first.resource_names) == ["reviews.bookinfo.svc.cluster.local:9080"]
    assert_same_node(first, b)


def test_grpcio_server_listener_name_matches(ads: RecordingAds, tmp_path: Path) -> None:
    path, b = pointed_at(json.loads(ISTIO_AGENT.read_text()), ads, tmp_path)
    # grpcio names the listener after the address string it was given (port 0 included).
    run_grpcio(path, "server", "127.0.0.1:0", ads)
    assert list(ads.requests[0].resource_names) == [b.server_listener_name("127.0.0.1", 0)]


FEDERATED: dict[str, Any] = {
    "xds_servers": [{"server_uri": "replaced", "channel_creds": [{"type": "insecure"}]}],
    "node": {"id": "fed-node", "locality": {"zone": "z1"}},
    "client_default_listener_resource_name_template": (
        "xdstp://auth.example/envoy.config.listener.v3.Listener/%s"
    ),
    "server_listener_resource_name_template": (
        "xdstp://auth.example/envoy.config.listener.v3.Listener/grpc/server/%s"
    ),
    "authorities": {
        "auth.example": {},
        "other.example": {
            "client_listener_resource_name_template": "xdstp://other.example/envoy.config.listener.v3.Listener/c/%s"
        },
    },
}


@pytest.mark.parametrize(
    ("mode", "arg", "expected"),
    [
        # grpcio percent-decodes the target path, then encodes it for the xdstp name.
        ("client", "xds:///svc%20one[x]:80",
         lambda b: b.listener_resource_name(None, "svc one[x]:80")),
        ("client", "xds://other.example/svc:80",
         lambda b: b.listener_resource_name("other.example", "svc:80")),
        ("server", "[::1]:0", lambda b: b.server_listener_name("::1", 0)),
    ],
    ids=["default-template", "authority-template", "server-ipv6"],
)  # fmt: skip
def test_grpcio_federation_names_match(
    mode: str, arg: str, expected: Any, ads: RecordingAds, tmp_path: Path
) -> None:
    path, b = pointed_at(FEDERATED, ads, tmp_path)
    run_grpcio(path, mode, arg, ads)
    name = expected(b)
    assert name.startswith("xdstp://")
    assert list(ads.requests[0].resource_names) == [name]


# Not in this list: non-string ``server_features`` entries, which grpcio silently skips and
# pymesh rejects (a typo there would otherwise silently disable a feature).
@pytest.mark.parametrize(
    "data",
    [
        {"xds_servers": []},
        {"xds_servers": [{"server_uri": 7, "channel_creds": [{"type": "insecure"}]}]},
        {"xds_servers": [{"server_uri": "127.0.0.1:1", "channel_creds": [{"type": "nope"}]}]},
        {
            "xds_servers": [{"server_uri": "127.0.0.1:1", "channel_creds": [{"type": "insecure"}]}],
            "node": {"locality": {"zone": 1}},
        },
        {
            "xds_servers": [{"server_uri": "127.0.0.1:1", "channel_creds": [{"type": "insecure"}]}],
            "authorities": {"a.com": {"client_listener_resource_name_template": "xdstp://b/%s"}},
        },
    ],
    ids=["no-servers", "uri-type", "no-creds", "zone-type", "authority-prefix"],
)
def test_grpcio_also_rejects_what_we_reject(data: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BootstrapError):
        load_bootstrap({"GRPC_XDS_BOOTSTRAP": str(path)})
    out = run_grpcio(path, "client", "xds:///svc:80", None)
    assert "Failed to create XdsClient" in out
