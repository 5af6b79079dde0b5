"""A Generator built from the previous version's (reusing what cannot have changed) answers
exactly as a fresh one, whatever changed in between."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymesh.controlplane.config import MeshConfig, ProxyNode, WorkloadEntrySpec, load_config
from pymesh.controlplane.translate import Generator
from pymesh.model.common import Locality
from pymesh.xds.resource_types import ResourceType

FIXTURE = Path(__file__).parent / "fixtures" / "mesh-full.yaml"
INBOUND = "xds.istio.io/grpc/lds/inbound/"

NODES = (
    ProxyNode("grpc-client", "default", generator="grpc"),
    ProxyNode("envoy-client", "default"),
    ProxyNode(
        "reviews-v1",
        "default",
        labels={"app": "reviews", "version": "v1"},
        service_account="reviews",
        ips=("127.0.0.11",),
        generator="grpc",
        locality=Locality("us-east", "zone-a"),
    ),
    ProxyNode("other-ns", "other", generator="grpc"),
)

CHANGES: dict[str, tuple[tuple[str, str], ...]] = {
    "endpoint address": (("127.0.0.21", "127.0.0.23"),),
    "endpoint weight": (("weight: 3}", "weight: 5}"),),
    "workload port": (("http: 19080", "http: 19081"),),
    "service account": (
        ("serviceAccount: reviews\n  locality: us-east", "serviceAccount: r2\n  locality: us-east"),
    ),
    "outlier detection": (("consecutive5xxErrors: 5", "consecutive5xxErrors: 7"),),
    "route weights": (("weight: 80", "weight: 70"), ("weight: 20", "weight: 30")),
    "peer authentication": (("mtls: {mode: STRICT}", "mtls: {mode: PERMISSIVE}"),),
    "nothing": (),
}


def _load(tmp_path: Path, text: str) -> MeshConfig:
    f = tmp_path / "mesh.yaml"
    f.write_text(text)
    config, issues = load_config([f])
    assert config is not None, [str(i) for i in issues if i.is_error]
    return config


def _everything(gen: Generator) -> dict[tuple[str, str, str], bytes]:
    """Every resource of every type for every node: wildcard and by name (EDS by the
    clusters' names, LDS inbound by the node's address)."""
    out: dict[tuple[str, str, str], bytes] = {}
    for node in NODES:
        for rt in ResourceType:
            for name, msg in gen.generate(node, rt.type_url, None).items():
                out[(node.id, rt.abbrev + "*", name)] = msg.SerializeToString(deterministic=True)
        clusters = list(gen.generate(node, ResourceType.CLUSTER.type_url, None))
        named = {
            ResourceType.CLUSTER_LOAD_ASSIGNMENT: clusters,
            ResourceType.CLUSTER: clusters[:2],
            ResourceType.ROUTE_CONFIGURATION: [c for c in clusters if c.count("|") == 3],
            ResourceType.LISTENER: [
                "reviews:9080",
                "ratings.default.svc.cluster.local:9080",
                *(f"{INBOUND}{ip}:9080" for ip in node.ips),
            ],
        }
        for rt, names in named.items():
            for name, msg in gen.generate(node, rt.type_url, names).items():
                out[(node.id, rt.abbrev, name)] = msg.SerializeToString(deterministic=True)
    return out


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_generator_from_previous_equals_fresh(tmp_path: Path, change: str) -> None:
    text = FIXTURE.read_text()
    before = _load(tmp_path, text)
    for old, new in CHANGES[change]:
        assert old in text
        text = text.replace(old, new, 1)
    after = _load(tmp_path, text)
    previous = Generator(before)
    first = _everything(previous)  # fills the previous generator's caches
    reused = _everything(Generator(after, previous))
    fresh = _everything(Generator(after))
    assert reused == fresh
    if change != "nothing":
        assert fresh != first  # the change is visible in the output


def test_registered_workloads_change_endpoints_and_sans(tmp_path: Path) -> None:
    base = _load(tmp_path, FIXTURE.read_text())
    entry = WorkloadEntrySpec(
        name="reviews-v3",
        namespace="default",
        address="127.0.0.13",
        labels={"app": "reviews", "version": "v3"},
        service_account="reviews-v3",
    )
    with_entry = base.with_workloads([entry])
    assert with_entry.same_shape(base)
    assert not with_entry.same_cluster_inputs(base)  # a new service account: new SANs
    previous = Generator(base)
    _everything(previous)
    assert _everything(Generator(with_entry, previous)) == _everything(Generator(with_entry))


def test_endpoint_change_reuses_listeners_routes_clusters(tmp_path: Path) -> None:
    text = FIXTURE.read_text()
    before = _load(tmp_path, text)
    after = _load(tmp_path, text.replace("127.0.0.21", "127.0.0.23"))
    assert after.same_cluster_inputs(before)
    previous = Generator(before)
    node = NODES[0]
    old = {rt: previous.generate(node, rt.type_url, None) for rt in ResourceType}
    gen = Generator(after, previous)
    for rt in (ResourceType.LISTENER, ResourceType.ROUTE_CONFIGURATION, ResourceType.CLUSTER):
        new = gen.generate(node, rt.type_url, None)
        assert all(new[n] is old[rt][n] for n in new)  # the same objects: not rebuilt
    eds_type = ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url
    eds = gen.generate(node, eds_type, None)
    old_eds = old[ResourceType.CLUSTER_LOAD_ASSIGNMENT]
    changed = {n for n in eds if eds[n] is not old_eds[n]}
    assert changed and all("ratings" in n for n in changed)  # only ratings' assignments


def test_load_assignments_shared_across_node_classes_only_when_equal(tmp_path: Path) -> None:
    config = _load(tmp_path, FIXTURE.read_text())
    shared = Generator(config)
    eds = ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url
    names = list(shared.generate(NODES[1], ResourceType.CLUSTER.type_url, None))
    extra = ProxyNode("reviews-west", "default", generator="grpc", locality=Locality("us-west"))
    outputs = {}
    for node in (*NODES, extra):
        # One generator serving every node answers each as a generator serving it alone.
        mine = shared.generate(node, eds, names)
        alone = Generator(config).generate(node, eds, names)
        assert {n: m.SerializeToString(deterministic=True) for n, m in mine.items()} == {
            n: m.SerializeToString(deterministic=True) for n, m in alone.items()
        }
        outputs[node.id] = mine
    ratings = "outbound|9080||ratings.default.svc.cluster.local"
    # IP endpoints, no locality policy: the proxyless and the Envoy node share one message.
    assert outputs["grpc-client"][ratings] is outputs["envoy-client"][ratings]
