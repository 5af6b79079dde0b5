"""Tests of the gRPC xDS bootstrap parser and models (pymesh.bootstrap)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pymesh
import pymesh.bootstrap as bootstrap_pkg
from pymesh.bootstrap import (
    Bootstrap,
    ChannelCredentials,
    FileWatcherConfig,
    Node,
    XdsServer,
    generate_bootstrap,
    load_bootstrap,
    parse_bootstrap,
    thaw_json,
    xdstp_authority,
)
from pymesh.errors import BootstrapError
from pymesh.model.common import Locality

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "bootstrap"
ISTIO_AGENT = FIXTURES / "istio-agent-grpc-bootstrap.json"
SRC = "test.json"


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "xds_servers": [{"server_uri": "127.0.0.1:15010", "channel_creds": [{"type": "insecure"}]}]
    }
    data.update(extra)
    return data


def parse(data: Any) -> Bootstrap:
    return parse_bootstrap(json.dumps(data), source=SRC)


def with_server(**server: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "server_uri": "xds.example.com:443",
        "channel_creds": [{"type": "insecure"}],
    }
    base.update(server)
    return {"xds_servers": [base]}


# -- accepted bootstraps -----------------------------------------------------------------


def test_minimal_bootstrap_defaults() -> None:
    b = parse(minimal())
    assert b.source == SRC
    (server,) = b.xds_servers
    assert server.uri == "127.0.0.1:15010"
    assert server.channel_credentials == ChannelCredentials(type="insecure")
    assert server.server_features == frozenset()
    assert not server.ignore_resource_deletion
    assert not server.supports_delta
    assert b.node == Node()
    assert b.node.user_agent_name == "pymesh"
    assert b.node.user_agent_version == pymesh.__version__
    assert b.client_default_listener_resource_name_template == "%s"
    assert b.server_listener_resource_name_template is None
    assert dict(b.certificate_providers) == {}
    assert dict(b.authorities) == {}


ACCEPTED: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "first supported creds wins",
        with_server(channel_creds=[{"type": "alts"}, {"type": "tls"}, {"type": "insecure"}]),
        {"creds": "tls"},
    ),
    (
        "google_default is tls without client cert",
        with_server(channel_creds=[{"type": "google_default"}]),
        {"creds": "google_default", "tls": FileWatcherConfig()},
    ),
    (
        "tls creds config (A65)",
        with_server(
            channel_creds=[
                {
                    "type": "tls",
                    "config": {
                        "ca_certificate_file": "/ca.pem",
                        "certificate_file": "/c.pem",
                        "private_key_file": "/k.pem",
                        "refresh_interval": "1.5s",
                    },
                }
            ]
        ),
        {
            "creds": "tls",
            "tls": FileWatcherConfig("/c.pem", "/k.pem", "/ca.pem", refresh_interval=1.5),
        },
    ),
    (
        "server features",
        with_server(server_features=["xds_v3", "ignore_resource_deletion", "pymesh.delta"]),
        {"ignore_resource_deletion": True, "supports_delta": True},
    ),
    (
        "delta synonym",
        with_server(server_features=["xds_v3_delta"]),
        {"ignore_resource_deletion": False, "supports_delta": True},
    ),
    (
        "unknown keys ignored everywhere",
        {
            "xds_servers": [
                {
                    "server_uri": "a:1",
                    "channel_creds": [{"type": "insecure", "whatever": 1}],
                    "extra": [1, 2],
                }
            ],
            "node": {"id": "n", "UserAgentVersionType": None, "future": {"x": 1}},
            "future_top_level": True,
        },
        {"node_id": "n"},
    ),
    (
        "node with locality and cluster",
        {
            **minimal(),
            "node": {
                "id": "n1",
                "cluster": "c1",
                "locality": {"region": "r", "zone": "z", "sub_zone": "s"},
                "metadata": {"A": [1, {"b": None}], "B": 2.5},
            },
        },
        {"node_id": "n1", "cluster": "c1", "locality": Locality("r", "z", "s")},
    ),
]


@pytest.mark.parametrize(("name", "data", "expect"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted(name: str, data: dict[str, Any], expect: dict[str, Any]) -> None:
    b = parse(data)
    server = b.xds_servers[0]
    if "creds" in expect:
        assert server.channel_credentials.type == expect["creds"]
    if "tls" in expect:
        assert server.channel_credentials.tls == expect["tls"]
    for prop in ("ignore_resource_deletion", "supports_delta"):
        if prop in expect:
            assert getattr(server, prop) is expect[prop]
    if "node_id" in expect:
        assert b.node.id == expect["node_id"]
    if "cluster" in expect:
        assert b.node.cluster == expect["cluster"]
    if "locality" in expect:
        assert b.node.locality == expect["locality"]


def test_several_servers_keep_fallback_order() -> None:
    data = {
        "xds_servers": [
            {"server_uri": f"s{i}:1", "channel_creds": [{"type": "insecure"}]} for i in range(3)
        ]
    }
    assert [s.uri for s in parse(data).xds_servers] == ["s0:1", "s1:1", "s2:1"]


def test_metadata_is_deep_frozen_and_thaws_back() -> None:
    meta = {"LABELS": {"app": "x"}, "LIST": [1, {"k": [True, None]}], "NUM": 1.5}
    b = parse(minimal(node={"metadata": meta}))
    labels = b.node.metadata["LABELS"]
    with pytest.raises(TypeError):
        labels["app"] = "y"  # type: ignore[index]
    assert isinstance(b.node.metadata["LIST"], tuple)
    with pytest.raises(TypeError):
        b.node.metadata["NEW"] = 1  # type: ignore[index]
    assert thaw_json(b.node.metadata) == meta
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.node.id = "x"  # type: ignore[misc]


def test_servers_are_hashable_and_equal_by_value() -> None:
    a = parse(with_server(channel_creds=[{"type": "tls", "config": {"ca_certificate_file": "/c"}}]))
    b = parse(with_server(channel_creds=[{"type": "tls", "config": {"ca_certificate_file": "/c"}}]))
    assert a.xds_servers[0] == b.xds_servers[0]
    assert len({a.xds_servers[0], b.xds_servers[0]}) == 1


def test_whole_bootstrap_is_hashable_and_equal_by_value() -> None:
    text = ISTIO_AGENT.read_text()
    a = parse_bootstrap(text, source="x")
    b = parse_bootstrap(text, source="x")
    assert a == b
    assert hash(a) == hash(b)
    assert hash(a.node) == hash(b.node)
    assert len({a, b}) == 1
    other = parse_bootstrap(text.replace('"NAMESPACE": "ns"', '"NAMESPACE": "ns2"'), source="x")
    assert other.node != a.node
    assert other != a


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(minimal()).encode())
    assert load_bootstrap({"GRPC_XDS_BOOTSTRAP": str(path)}).xds_servers[0].uri == "127.0.0.1:15010"


def test_certificate_providers() -> None:
    data = minimal(
        certificate_providers={
            "default": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": "/d/cert-chain.pem",
                    "private_key_file": "/d/key.pem",
                    "ca_certificate_file": "/d/root-cert.pem",
                },
            },
            "roots_only": {
                "plugin_name": "file_watcher",
                "config": {"ca_certificate_file": "/r.pem", "refresh_interval": "30s"},
            },
            "meshca": {"plugin_name": "meshca", "config": {"server": {"x": 1}}},
        }
    )
    b = parse(data)
    default = b.default_certificate_provider
    assert default is not None
    assert default.supported
    assert default.file_watcher == FileWatcherConfig(
        "/d/cert-chain.pem", "/d/key.pem", "/d/root-cert.pem", refresh_interval=600.0
    )
    roots = b.certificate_providers["roots_only"].file_watcher
    assert roots is not None
    assert not roots.has_identity
    assert roots.refresh_interval == 30.0
    meshca = b.certificate_providers["meshca"]
    assert not meshca.supported
    assert meshca.file_watcher is None
    assert thaw_json(meshca.config) == {"server": {"x": 1}}


# -- the bootstrap Istio's agent writes ---------------------------------------------------


def test_istio_agent_bootstrap_loads() -> None:
    b = load_bootstrap({"GRPC_XDS_BOOTSTRAP": str(ISTIO_AGENT)})
    assert b.source == str(ISTIO_AGENT)
    (server,) = b.xds_servers
    assert server.uri == "unix:///etc/istio/proxy/XDS"
    assert server.channel_credentials.type == "insecure"
    assert not server.channel_credentials.is_secure
    assert server.server_features == {"xds_v3"}
    node = b.node
    assert node.id == "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local"
    assert node.locality == Locality("us-central1", "us-central1-a")
    assert node.proxy_type == "sidecar"
    assert node.generator == "grpc"
    assert node.namespace == "ns"
    assert node.pod_name == "pod"
    assert node.workload_name == "echo-v1"
    assert node.service_account == "echo-sa"
    assert node.instance_ips == ("10.0.0.1", "fd00:10::1")
    assert node.labels["app"] == "echo"
    assert node.labels["version"] == "v1"
    assert node.cluster_id == "Kubernetes"
    assert node.mesh_id == "cluster.local"
    assert node.trust_domain == "cluster.local"
    assert node.istio_version == "1.24.0"
    assert node.spiffe_id == "spiffe://cluster.local/ns/ns/sa/echo-sa"
    assert [(p.name, p.port) for p in node.ports] == [("grpc", 17070), ("", 8080)]
    proxy_config = node.metadata["PROXY_CONFIG"]
    assert not isinstance(proxy_config, dict)  # frozen (read-only mapping)
    assert thaw_json(proxy_config)["discoveryAddress"] == "istiod.istio-system.svc:15012"  # type: ignore[index]
    provider = b.certificate_providers["default"]
    assert provider.plugin_name == "file_watcher"
    assert provider.file_watcher == FileWatcherConfig(
        certificate_file="/var/lib/istio/data/cert-chain.pem",
        private_key_file="/var/lib/istio/data/key.pem",
        ca_certificate_file="/var/lib/istio/data/root-cert.pem",
        refresh_interval=900.0,
    )
    assert b.server_listener_resource_name_template == "xds.istio.io/grpc/lds/inbound/%s"
    assert (
        b.server_listener_name("10.0.0.1", 17070) == "xds.istio.io/grpc/lds/inbound/10.0.0.1:17070"
    )
    assert b.server_listener_name("::", 8080) == "xds.istio.io/grpc/lds/inbound/[::]:8080"
    assert b.listener_resource_name(None, "echo.ns.svc.cluster.local:7070") == (
        "echo.ns.svc.cluster.local:7070"
    )


def test_node_properties_fall_back_to_istio_node_id() -> None:
    node = Node(id="sidecar~10.1.2.3~reviews-v1-abc.bookinfo~bookinfo.svc.cluster.local")
    assert node.namespace == "bookinfo"
    assert node.pod_name == "reviews-v1-abc"
    assert node.instance_ips == ("10.1.2.3",)
    assert node.service_account == ""
    assert node.spiffe_id == ""
    assert dict(node.labels) == {}
    assert node.trust_domain == "cluster.local"


def test_node_properties_tolerate_bad_metadata_types() -> None:
    b = parse(
        minimal(
            node={
                "id": "not-istio",
                "metadata": {
                    "NAMESPACE": 3,
                    "LABELS": ["x"],
                    "INSTANCE_IPS": {"a": 1},
                    "POD_PORTS": "{not json",
                    "TRUST_DOMAIN": "example.org",
                    "SERVICE_ACCOUNT": "sa",
                },
            }
        )
    )
    node = b.node
    assert node.namespace == ""
    assert dict(node.labels) == {}
    assert node.instance_ips == ()
    assert node.ports == ()
    assert node.trust_domain == "example.org"
    assert node.mesh_id == "example.org"


# -- environment variables ----------------------------------------------------------------


def test_path_env_wins_over_inline_config(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps(with_server(server_uri="from-file:1")))
    inline = json.dumps(with_server(server_uri="from-env:1"))
    env = {"GRPC_XDS_BOOTSTRAP": str(path), "GRPC_XDS_BOOTSTRAP_CONFIG": inline}
    b = load_bootstrap(env)
    assert b.xds_servers[0].uri == "from-file:1"
    assert b.source == str(path)
    b = load_bootstrap({"GRPC_XDS_BOOTSTRAP_CONFIG": inline})
    assert b.xds_servers[0].uri == "from-env:1"
    assert b.source == "GRPC_XDS_BOOTSTRAP_CONFIG"
    # An empty path counts as unset.
    b = load_bootstrap({"GRPC_XDS_BOOTSTRAP": "", "GRPC_XDS_BOOTSTRAP_CONFIG": inline})
    assert b.source == "GRPC_XDS_BOOTSTRAP_CONFIG"


def test_path_env_wins_even_when_file_is_bad(tmp_path: Path) -> None:
    env = {
        "GRPC_XDS_BOOTSTRAP": str(tmp_path / "missing.json"),
        "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(minimal()),
    }
    with pytest.raises(BootstrapError, match=r"missing\.json: file not found"):
        load_bootstrap(env)


def test_load_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP", raising=False)
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", json.dumps(with_server(server_uri="os:1")))
    assert load_bootstrap().xds_servers[0].uri == "os:1"


def test_no_env_at_all() -> None:
    with pytest.raises(BootstrapError, match="GRPC_XDS_BOOTSTRAP") as info:
        load_bootstrap({})
    assert "GRPC_XDS_BOOTSTRAP_CONFIG" in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(BootstrapError, match=f"{tmp_path}: is a directory"):
        load_bootstrap({"GRPC_XDS_BOOTSTRAP": str(tmp_path)})
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(BootstrapError, match=r"bin\.json: not UTF-8"):
        load_bootstrap({"GRPC_XDS_BOOTSTRAP": str(binary)})
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.json"
        locked.write_text("{}")
        locked.chmod(0)
        with pytest.raises(BootstrapError, match=r"locked\.json: permission denied"):
            load_bootstrap({"GRPC_XDS_BOOTSTRAP": str(locked)})


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "xds_servers": [\n    {"server_uri": "a:1",}\n  ]\n}\n')
    with pytest.raises(BootstrapError) as info:
        load_bootstrap({"GRPC_XDS_BOOTSTRAP": str(path)})
    err = info.value
    assert err.source == str(path)
    assert "invalid JSON at line 3 column" in str(err)
    assert str(err).startswith(str(path))
    assert err.__cause__ is None and err.__suppress_context__


# -- rejected bootstraps ------------------------------------------------------------------

REJECTED: list[tuple[str, Any, str | None, str]] = [
    ("not an object", [1, 2], None, "must be a JSON object"),
    ("NaN is not JSON", '{"xds_servers": NaN}', None, "invalid JSON"),
    ("huge float", '{"xds_servers": [], "node": {"metadata": {"x": 1e400}}}', None, "out of range"),
    ("no xds_servers", {}, "xds_servers", "is required"),
    ("empty xds_servers", {"xds_servers": []}, "xds_servers", "must not be empty"),
    ("xds_servers not a list", {"xds_servers": {}}, "xds_servers", "must be a JSON array"),
    ("server not an object", {"xds_servers": ["a:1"]}, "xds_servers[0]", "must be a JSON object"),
    (
        "no server_uri",
        {"xds_servers": [{"channel_creds": [{"type": "insecure"}]}]},
        "xds_servers[0].server_uri",
        "is required",
    ),
    (
        "server_uri not a string",
        with_server(server_uri=42),
        "xds_servers[0].server_uri",
        "must be a string, got a number",
    ),
    (
        "server_uri empty",
        with_server(server_uri=""),
        "xds_servers[0].server_uri",
        "must not be empty",
    ),
    (
        "uri is not the key",
        {"xds_servers": [{"uri": "a:1", "channel_creds": [{"type": "insecure"}]}]},
        "xds_servers[0].server_uri",
        "is required",
    ),
    (
        "no channel_creds",
        {"xds_servers": [{"server_uri": "a:1"}]},
        "xds_servers[0].channel_creds",
        "is required",
    ),
    (
        "empty channel_creds",
        with_server(channel_creds=[]),
        "xds_servers[0].channel_creds",
        "must not be empty",
    ),
    (
        "creds type not a string",
        with_server(channel_creds=[{"type": "alts"}, {"type": 7}]),
        "xds_servers[0].channel_creds[1].type",
        "must be a string",
    ),
    (
        "creds entry not an object",
        with_server(channel_creds=["insecure"]),
        "xds_servers[0].channel_creds[0]",
        "must be a JSON object",
    ),
    (
        "no supported creds",
        with_server(channel_creds=[{"type": "alts"}, {"type": "fancy"}]),
        "xds_servers[0].channel_creds",
        "no supported channel credentials type (got 'alts', 'fancy'",
    ),
    (
        "tls cert without key",
        with_server(channel_creds=[{"type": "tls", "config": {"certificate_file": "/c"}}]),
        "xds_servers[0].channel_creds[0].config.private_key_file",
        "must be given together",
    ),
    (
        "tls config not an object",
        with_server(channel_creds=[{"type": "tls", "config": "x"}]),
        "xds_servers[0].channel_creds[0].config",
        "must be a JSON object",
    ),
    (
        "server_features not a list",
        with_server(server_features="xds_v3"),
        "xds_servers[0].server_features",
        "must be a JSON array",
    ),
    (
        "server_features not strings",
        with_server(server_features=["xds_v3", 3]),
        "xds_servers[0].server_features[1]",
        "must be a string",
    ),
    ("node not an object", minimal(node="n"), "node", "must be a JSON object"),
    ("node id not a string", minimal(node={"id": 1}), "node.id", "must be a string"),
    (
        "locality zone not a string",
        minimal(node={"locality": {"zone": 1}}),
        "node.locality.zone",
        "must be a string",
    ),
    (
        "metadata not an object",
        minimal(node={"metadata": []}),
        "node.metadata",
        "must be a JSON object",
    ),
    (
        "provider without plugin",
        minimal(certificate_providers={"p": {"config": {}}}),
        "certificate_providers.p.plugin_name",
        "is required",
    ),
    (
        "file_watcher with nothing",
        minimal(certificate_providers={"p": {"plugin_name": "file_watcher", "config": {}}}),
        "certificate_providers.p.config",
        "must give certificate_file",
    ),
    (
        "file_watcher bad refresh",
        minimal(
            certificate_providers={
                "p": {
                    "plugin_name": "file_watcher",
                    "config": {"ca_certificate_file": "/c", "refresh_interval": 600},
                }
            }
        ),
        "certificate_providers.p.config.refresh_interval",
        "duration string",
    ),
    (
        "file_watcher zero refresh",
        minimal(
            certificate_providers={
                "p": {
                    "plugin_name": "file_watcher",
                    "config": {"ca_certificate_file": "/c", "refresh_interval": "0s"},
                }
            }
        ),
        "certificate_providers.p.config.refresh_interval",
        "must be positive",
    ),
    (
        "file_watcher key without cert",
        minimal(
            certificate_providers={
                "p": {"plugin_name": "file_watcher", "config": {"private_key_file": "/k"}}
            }
        ),
        "certificate_providers.p.config.certificate_file",
        "must be given together",
    ),
    (
        "server template not a string",
        minimal(server_listener_resource_name_template=1),
        "server_listener_resource_name_template",
        "must be a string",
    ),
    (
        "empty client template",
        minimal(client_default_listener_resource_name_template=""),
        "client_default_listener_resource_name_template",
        "must not be empty",
    ),
    (
        "client template with unknown authority",
        minimal(
            client_default_listener_resource_name_template="xdstp://other/envoy.config.listener.v3.Listener/%s"
        ),
        "client_default_listener_resource_name_template",
        "authority 'other' is not in authorities",
    ),
    (
        "server template with unknown authority",
        minimal(
            server_listener_resource_name_template="xdstp://a.com/grpc/server/%s",
            authorities={"b.com": {}},
        ),
        "server_listener_resource_name_template",
        "authority 'a.com' is not in authorities",
    ),
    (
        "authority template with wrong prefix",
        minimal(
            authorities={"a.com": {"client_listener_resource_name_template": "xdstp://b.com/x/%s"}}
        ),
        'authorities["a.com"].client_listener_resource_name_template',
        "must start with 'xdstp://a.com/'",
    ),
    (
        "xdstp template of another resource type",
        minimal(
            authorities={"a.com": {"client_listener_resource_name_template": "xdstp://a.com/L/%s"}}
        ),
        'authorities["a.com"].client_listener_resource_name_template',
        "must start with 'xdstp://a.com/envoy.config.listener.v3.Listener'/",
    ),
    (
        "xdstp server template of another resource type",
        minimal(
            server_listener_resource_name_template="xdstp://a.com/grpc/server/%s",
            authorities={"a.com": {}},
        ),
        "server_listener_resource_name_template",
        "an xdstp: Listener name must start with",
    ),
    (
        "authority not an object",
        minimal(authorities={"a.com": []}),
        'authorities["a.com"]',
        "must be a JSON object",
    ),
    (
        "authority servers bad",
        minimal(authorities={"a.com": {"xds_servers": [{"server_uri": "x:1"}]}}),
        'authorities["a.com"].xds_servers[0].channel_creds',
        "is required",
    ),
]


@pytest.mark.parametrize(
    ("name", "data", "field", "message"), REJECTED, ids=[r[0] for r in REJECTED]
)
def test_rejected(name: str, data: Any, field: str | None, message: str) -> None:
    text = data if isinstance(data, str) else json.dumps(data)
    with pytest.raises(BootstrapError) as info:
        parse_bootstrap(text, source="/etc/grpc/bootstrap.json")
    err = info.value
    assert err.source == "/etc/grpc/bootstrap.json"
    assert err.field == field
    assert message in err.message
    rendered = str(err)
    assert rendered.startswith("/etc/grpc/bootstrap.json")
    if field:
        assert f"field {field}" in rendered


def test_rejected_inline_names_the_env_var() -> None:
    env = {"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(with_server(server_uri=1))}
    with pytest.raises(BootstrapError) as info:
        load_bootstrap(env)
    assert str(info.value).startswith(
        "GRPC_XDS_BOOTSTRAP_CONFIG: field xds_servers[0].server_uri: must be a string"
    )


# -- templates (gRFC A36, A47) -------------------------------------------------------------

FEDERATED = {
    "xds_servers": [{"server_uri": "top:1", "channel_creds": [{"type": "insecure"}]}],
    "client_default_listener_resource_name_template": (
        "xdstp://xds.authority.com/envoy.config.listener.v3.Listener/grpc/client/%s?project_id=1"
    ),
    "server_listener_resource_name_template": (
        "xdstp://xds.authority.com/envoy.config.listener.v3.Listener/grpc/server/%s"
    ),
    "authorities": {
        "xds.authority.com": {},
        "xds.other.com": {
            "xds_servers": [{"server_uri": "other:1", "channel_creds": [{"type": "insecure"}]}]
        },
        "custom.com": {
            "client_listener_resource_name_template": "xdstp://custom.com/envoy.config.listener.v3.Listener/%s/x"
        },
    },
}


def test_old_style_templates() -> None:
    b = parse(minimal(client_default_listener_resource_name_template="prefix/%s/%s"))
    assert b.listener_resource_name(None, "svc:80") == "prefix/svc:80/svc:80"
    assert b.listener_resource_name("", "a b") == "prefix/a b/a b"  # not percent-encoded
    assert b.servers_for_resource("svc:80") == b.xds_servers


def test_federation_client_names() -> None:
    b = parse(FEDERATED)
    assert b.listener_resource_name(None, "server.example.com") == (
        "xdstp://xds.authority.com/envoy.config.listener.v3.Listener/grpc/client/"
        "server.example.com?project_id=1"
    )
    # Default authority template.
    assert b.listener_resource_name("xds.other.com", "svc.ns:80") == (
        "xdstp://xds.other.com/envoy.config.listener.v3.Listener/svc.ns:80"
    )
    assert b.listener_resource_name("custom.com", "svc") == (
        "xdstp://custom.com/envoy.config.listener.v3.Listener/svc/x"
    )
    with pytest.raises(BootstrapError, match=r"'unknown\.com' is not in the bootstrap"):
        b.listener_resource_name("unknown.com", "svc")


def test_xdstp_replacement_is_percent_encoded() -> None:
    b = parse(FEDERATED)
    name = b.listener_resource_name("xds.other.com", "a b/c?d#e%f[g]:1@!$&'()*+,;=~")
    assert name == (
        "xdstp://xds.other.com/envoy.config.listener.v3.Listener/"
        "a%20b/c%3Fd%23e%25f%5Bg%5D:1@!$&'()*+,;=~"
    )
    assert b.server_listener_name("::1", 50051) == (
        "xdstp://xds.authority.com/envoy.config.listener.v3.Listener/grpc/server/%5B::1%5D:50051"
    )


def test_federation_server_selection() -> None:
    b = parse(FEDERATED)
    top = b.xds_servers
    other = b.authorities["xds.other.com"].xds_servers
    assert [s.uri for s in other] == ["other:1"]
    assert b.servers_for_authority(None) == top
    assert b.servers_for_authority("xds.authority.com") == top  # no own servers
    assert b.servers_for_authority("xds.other.com") == other
    assert (
        b.servers_for_resource("xdstp://xds.other.com/envoy.config.cluster.v3.Cluster/c") == other
    )
    assert b.servers_for_resource("outbound|80||svc") == top
    with pytest.raises(BootstrapError, match="authority 'nope'"):
        b.servers_for_resource("xdstp://nope/x")
    assert [s.uri for s in b.all_servers] == ["top:1", "other:1"]


@pytest.mark.parametrize(
    ("name", "authority"),
    [
        ("xdstp://a.com/envoy.config.listener.v3.Listener/x", "a.com"),
        ("xdstp://a.com?x", "a.com"),
        ("xdstp://", ""),
        ("xdstp:foo", ""),
        ("a.com:80", None),
        ("XDSTP://a/b", None),
    ],
)
def test_xdstp_authority(name: str, authority: str | None) -> None:
    assert xdstp_authority(name) == authority


def test_server_listener_name() -> None:
    b = parse(minimal(server_listener_resource_name_template="grpc/server?addr=%s"))
    assert b.server_listener_name("0.0.0.0", 8080) == "grpc/server?addr=0.0.0.0:8080"
    assert b.server_listener_name("::", 8080) == "grpc/server?addr=[::]:8080"
    assert b.server_listener_name("[::1]", 1) == "grpc/server?addr=[::1]:1"
    with pytest.raises(BootstrapError, match="server_listener_resource_name_template"):
        parse(minimal()).server_listener_name("0.0.0.0", 80)


# -- generator ---------------------------------------------------------------------------


def test_generated_bootstrap_round_trips() -> None:
    data = generate_bootstrap(
        xds_address=["127.0.0.1:15010", "unix:///tmp/xds.sock"],
        namespace="bookinfo",
        service_account="bookinfo-reviews",
        labels={"app": "reviews", "version": "v2"},
        ip="10.0.0.7",
        ports=[9080],
        locality="us-east/us-east-1a/rack1",
        cert_dir="/var/lib/istio/data",
        delta=True,
        trust_domain="example.org",
    )
    b = parse(data)
    assert [s.uri for s in b.xds_servers] == ["127.0.0.1:15010", "unix:///tmp/xds.sock"]
    assert all(s.supports_delta for s in b.xds_servers)
    node = b.node
    assert node.id == "sidecar~10.0.0.7~reviews-v2.bookinfo~bookinfo.svc.cluster.local"
    assert node.namespace == "bookinfo"
    assert node.workload_name == "reviews-v2"
    assert node.generator == "grpc"
    assert node.cluster_id == "Kubernetes"
    assert node.mesh_id == "example.org"
    assert node.spiffe_id == "spiffe://example.org/ns/bookinfo/sa/bookinfo-reviews"
    assert node.instance_ips == ("10.0.0.7",)
    assert [p.port for p in node.ports] == [9080]
    assert node.locality == Locality("us-east", "us-east-1a", "rack1")
    fw = b.certificate_providers["default"].file_watcher
    assert fw == FileWatcherConfig(
        "/var/lib/istio/data/cert-chain.pem",
        "/var/lib/istio/data/key.pem",
        "/var/lib/istio/data/root-cert.pem",
        900.0,
    )
    assert b.server_listener_name("10.0.0.7", 9080) == (
        "xds.istio.io/grpc/lds/inbound/10.0.0.7:9080"
    )


def test_generated_ipv6_address_is_accepted() -> None:
    data = generate_bootstrap(xds_address="[::1]:15010", ip="fd00::7")
    b = parse(data)
    assert b.xds_servers[0].uri == "[::1]:15010"
    assert b.node.id == "sidecar~fd00::7~default.default~default.svc.cluster.local"
    assert b.node.instance_ips == ("fd00::7",)


def test_generated_tls_creds() -> None:
    data = generate_bootstrap(tls_ca="/ca.pem", tls_cert="/c.pem", tls_key="/k.pem")
    creds = parse(data).xds_servers[0].channel_credentials
    assert creds.type == "tls"
    assert creds.tls == FileWatcherConfig("/c.pem", "/k.pem", "/ca.pem")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"ip": "not-an-ip"}, "ip"),
        ({"xds_address": "http://x:1"}, "xds_address"),
        ({"xds_address": "no-port"}, "xds_address"),
        ({"xds_address": "::1:15010"}, "xds_address"),
        ({"xds_address": []}, "xds_address"),
        ({"workload": "a~b"}, "workload"),
        ({"locality": "a//c"}, "locality"),
        ({"tls_cert": "/c.pem"}, "tls_cert"),
        ({"ports": [0]}, "ports"),
        ({"extra_metadata": {"X": object()}}, "extra_metadata"),
        ({"extra_metadata": {"X": float("nan")}}, "extra_metadata"),
    ],
)
def test_generator_rejects(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(BootstrapError) as info:
        generate_bootstrap(**kwargs)
    assert info.value.field == field


def test_generated_workload_defaults() -> None:
    assert parse(generate_bootstrap()).node.workload_name == "default"
    assert parse(generate_bootstrap(labels={"app": "ratings"})).node.workload_name == "ratings"
    assert parse(generate_bootstrap(service_account="sa1")).node.workload_name == "sa1"


# -- public surface ------------------------------------------------------------------------


def test_public_api_is_pinned() -> None:
    assert sorted(bootstrap_pkg.__all__) == sorted(
        [
            "DEFAULT_TRUST_DOMAIN",
            "DEFAULT_XDS_ADDRESS",
            "ENV_BOOTSTRAP",
            "ENV_BOOTSTRAP_CONFIG",
            "ISTIO_SERVER_LISTENER_TEMPLATE",
            "SERVER_FEATURE_DELTA",
            "SERVER_FEATURE_IGNORE_RESOURCE_DELETION",
            "SERVER_FEATURE_XDS_V3",
            "SUPPORTED_CHANNEL_CREDENTIALS",
            "Authority",
            "Bootstrap",
            "CertificateProviderInstance",
            "ChannelCredentials",
            "FileWatcherConfig",
            "JsonValue",
            "Node",
            "WorkloadPort",
            "XdsServer",
            "generate_bootstrap",
            "load_bootstrap",
            "parse_bootstrap",
            "thaw_json",
            "xdstp_authority",
        ]
    )
    for name in bootstrap_pkg.__all__:
        assert hasattr(bootstrap_pkg, name)
    assert XdsServer.__module__ == "pymesh.bootstrap._model"


# -- property-based: anything in, only BootstrapError out ---------------------------------

_json_leaf = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
)
_json = st.recursive(
    _json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_KEYS = [
    "xds_servers",
    "server_uri",
    "channel_creds",
    "type",
    "config",
    "server_features",
    "node",
    "id",
    "cluster",
    "locality",
    "zone",
    "metadata",
    "certificate_providers",
    "plugin_name",
    "certificate_file",
    "private_key_file",
    "ca_certificate_file",
    "refresh_interval",
    "authorities",
    "client_listener_resource_name_template",
    "server_listener_resource_name_template",
    "client_default_listener_resource_name_template",
]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def _mutated(draw: st.DrawFn) -> Any:
    base = copy.deepcopy(draw(st.sampled_from([json.loads(ISTIO_AGENT.read_text()), FEDERATED])))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(base)
        path = draw(st.sampled_from(paths))
        if not path:
            base = draw(_json)
            continue
        parent = base
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(_json)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(_KEYS))] = draw(_json)
        if not isinstance(base, dict | list):
            break
    return base


def _check_only_bootstrap_error(text: str) -> None:
    try:
        b = parse_bootstrap(text, source="fuzz")
    except BootstrapError as err:
        assert err.source == "fuzz"
        return
    # Accepted: the properties the other layers use never raise either.
    hash(b)
    node = b.node
    _ = (node.namespace, node.labels, node.instance_ips, node.ports, node.spiffe_id, node.mesh_id)
    for server in b.all_servers:
        hash(server)
        _ = (server.supports_delta, server.ignore_resource_deletion)
    if b.server_listener_resource_name_template is not None:
        b.server_listener_name("::", 1)
    b.listener_resource_name(None, "svc:80")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_fuzz_mutated_bootstraps_only_raise_bootstrap_error(data: Any) -> None:
    _check_only_bootstrap_error(json.dumps(data))


@settings(max_examples=200, deadline=None)
@given(_json)
def test_fuzz_random_json_only_raises_bootstrap_error(data: Any) -> None:
    _check_only_bootstrap_error(json.dumps(data))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=64))
def test_fuzz_random_text_only_raises_bootstrap_error(text: str) -> None:
    _check_only_bootstrap_error(text)


def test_deeply_nested_json_is_a_bootstrap_error() -> None:
    with pytest.raises(BootstrapError):
        parse_bootstrap("[" * 100_000 + "]" * 100_000, source="deep")
    with pytest.raises(BootstrapError):
        parse_bootstrap('{"xds_servers": ' + "1" * 5000 + "}", source="bigint")


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/ ", min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    namespace=_name,
    service_account=_name,
    workload=st.none() | _name,
    labels=st.dictionaries(_name, _name, max_size=3),
    ip=st.sampled_from(["127.0.0.1", "::1", "fd00::1", "10.0.0.300", "x"]),
    locality=st.none() | _name,
    address=st.sampled_from(["127.0.0.1:15010", "[::1]:1", "unix:/x", "h:0", "h", "a b:1"]),
    ports=st.lists(st.integers(-1, 70000), max_size=3),
)
def test_fuzz_generator_output_always_loads(
    *,
    namespace: str,
    service_account: str,
    workload: str | None,
    labels: dict[str, str],
    ip: str,
    locality: str | None,
    address: str,
    ports: list[int],
) -> None:
    try:
        data = generate_bootstrap(
            xds_address=address,
            namespace=namespace,
            service_account=service_account,
            workload=workload,
            labels=labels,
            ip=ip,
            locality=locality,
            ports=ports,
        )
    except BootstrapError as err:
        assert err.source == "generate_bootstrap"
        assert err.field
        return
    b = parse(data)
    assert b.node.namespace == namespace
    assert b.node.service_account == service_account
    assert dict(b.node.labels) == labels
    assert [p.port for p in b.node.ports] == ports
