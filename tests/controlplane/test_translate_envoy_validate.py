"""The real Envoy accepts what the translator generates (oracle, ``envoy --mode validate``).

A static bootstrap is built from the generated resources for an Envoy-like node: every CDS
cluster (EDS clusters get their generated ClusterLoadAssignment inline), one listener per
generated route configuration (inline in an HCM with the fault and router filters), plus the
generated inbound listeners. SDS secrets (ISTIO_MUTUAL) and EDS point at an ADS cluster.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from pymesh.controlplane.config import MeshConfig, ProxyNode, load_config
from pymesh.controlplane.translate import INBOUND_PREFIX, Generator
from pymesh.xds.resource_types import ResourceType

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "unit" / "controlplane" / "fixtures"
BOOKINFO = REPO.parent / "shared" / "istio-bookinfo"


def _load(*paths: Path) -> MeshConfig:
    config, issues = load_config(list(paths))
    assert config is not None, [str(i) for i in issues if i.is_error]
    return config


def _bootstrap(config: MeshConfig, node: ProxyNode, inbound: list[str]) -> bootstrap_pb2.Bootstrap:
    gen = Generator(config)
    boot = bootstrap_pb2.Bootstrap()
    boot.node.id = node.id
    boot.node.cluster = "pymesh-test"
    ads = boot.dynamic_resources.ads_config
    ads.api_type = config_source_pb2.ApiConfigSource.GRPC
    ads.transport_api_version = config_source_pb2.V3
    ads.grpc_services.add().envoy_grpc.cluster_name = "xds-grpc"
    xds = boot.static_resources.clusters.add(name="xds-grpc", type=cluster_pb2.Cluster.STATIC)
    xds.load_assignment.cluster_name = "xds-grpc"
    sa = xds.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address, sa.port_value = "127.0.0.1", 15010
    h2 = http_protocol_options_pb2.HttpProtocolOptions()
    h2.explicit_http_config.http2_protocol_options.SetInParent()
    xds.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Pack(h2)
    sds = boot.static_resources.clusters.add()
    sds.CopyFrom(xds)
    sds.name = sds.load_assignment.cluster_name = "sds-grpc"  # Istio agent's SDS server

    clusters = gen.generate(node, ResourceType.CLUSTER.type_url, None)
    assignments = gen.generate(node, ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url, None)
    assert clusters
    for name, c in clusters.items():
        cluster = boot.static_resources.clusters.add()
        cluster.CopyFrom(c)
        if cluster.type == cluster_pb2.Cluster.EDS:
            cluster.ClearField("eds_cluster_config")
            cluster.type = cluster_pb2.Cluster.STATIC
            cluster.load_assignment.CopyFrom(assignments[name])
    routes = gen.generate(node, ResourceType.ROUTE_CONFIGURATION.type_url, None)
    assert routes
    for i, (name, rc) in enumerate(sorted(routes.items())):
        ln = boot.static_resources.listeners.add(name=f"out-{i}")
        ln.address.socket_address.address = "127.0.0.1"
        ln.address.socket_address.port_value = 20000 + i
        hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"out{i}")
        hcm.route_config.CopyFrom(rc)
        f = hcm.http_filters.add(name="envoy.filters.http.fault")
        f.typed_config.Pack(fault_pb2.HTTPFault())
        r = hcm.http_filters.add(name="envoy.filters.http.router")
        r.typed_config.Pack(router_pb2.Router())
        ln.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager")
        ln.filter_chains[0].filters[0].typed_config.Pack(hcm)
        assert name == rc.name
    if inbound:
        listeners = gen.generate(node, ResourceType.LISTENER.type_url, inbound)
        assert set(listeners) == set(inbound)
        for ln in listeners.values():
            boot.static_resources.listeners.add().CopyFrom(ln)
    return boot


def _validate(envoy_bin: Path, tmp_path: Path, boot: bootstrap_pb2.Bootstrap) -> None:
    path = tmp_path / "envoy.json"
    path.write_text(json_format.MessageToJson(boot))
    out = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK" in out.stdout


@pytest.mark.envoy
def test_envoy_accepts_full_feature_config(envoy_bin: Path, tmp_path: Path) -> None:
    config = _load(FIXTURES / "mesh-full.yaml")
    node = ProxyNode(
        "envoy~127.0.0.11~reviews.default~default.svc.cluster.local",
        "default",
        labels={"app": "reviews", "version": "v1"},
        ips=("127.0.0.11",),
    )
    ratings = ProxyNode("envoy-ratings", "default", labels={"app": "ratings"})
    boot = _bootstrap(config, node, [f"{INBOUND_PREFIX}127.0.0.11:9080"])
    permissive = Generator(config).generate(
        ratings, ResourceType.LISTENER.type_url, [f"{INBOUND_PREFIX}127.0.0.21:9080"]
    )
    for ln in permissive.values():
        ln.address.socket_address.port_value = 9081
        boot.static_resources.listeners.add().CopyFrom(ln)
    _validate(envoy_bin, tmp_path, boot)


@pytest.mark.envoy
def test_envoy_accepts_bookinfo(envoy_bin: Path, tmp_path: Path) -> None:
    config = _load(
        BOOKINFO / "platform" / "kube" / "bookinfo.yaml",
        BOOKINFO / "networking" / "destination-rule-all-mtls.yaml",
        BOOKINFO / "networking" / "virtual-service-reviews-jason-v2-v3.yaml",
    )
    reviews = next(g for g in config.workload_groups if g.name == "reviews-v2")
    config = config.with_workloads([reviews.entry_for("127.0.0.5")])
    _validate(envoy_bin, tmp_path, _bootstrap(config, ProxyNode("envoy-2", "default"), []))
