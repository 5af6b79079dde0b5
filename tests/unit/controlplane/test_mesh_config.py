"""Istio's MeshConfig (the ``istio`` ConfigMap's ``data.mesh``): read unchanged, bad values
named by field, and ``pathNormalization`` set on inbound listeners as istiod sets it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymesh.controlplane.config import ProxyNode, load_config
from pymesh.controlplane.translate import Generator
from pymesh.model.listener import EscapedSlashesAction, PathNormalization
from pymesh.xds.codec.listener import decode_listener_bytes
from pymesh.xds.resource_types import ResourceType
from tests.unit.controlplane._mesh import load_ok

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.svc.cluster.local]
  ports: [{number: 8080, name: http}]
  resolution: STATIC
  workloadSelector: {labels: {app: web}}
"""


def configmap(mesh: str, name: str = "istio", namespace: str = "istio-system") -> str:
    body = "\n".join("    " + line for line in mesh.splitlines())
    return (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        f"data:\n  mesh: |-\n{body}\n"
    )


def inbound_normalization(tmp_path: Path) -> PathNormalization:
    gen = Generator(load_ok(tmp_path))
    node = ProxyNode("web-1", "default", generator="grpc", ips=("127.0.0.1",))
    name = "xds.istio.io/grpc/lds/inbound/127.0.0.1:8080"
    out = gen.generate(node, ResourceType.LISTENER, [name])
    resource = out[name]
    data = resource if isinstance(resource, bytes) else resource.SerializeToString()
    listener = decode_listener_bytes(data)
    chains = [*listener.filter_chains]
    if listener.default_filter_chain is not None:
        chains.append(listener.default_filter_chain)
    settings = {c.hcm.path_normalization for c in chains}
    assert len(settings) == 1
    return settings.pop()


# istiod: pilot/pkg/networking/core (NONE, BASE/DEFAULT, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
KEEP = EscapedSlashesAction.KEEP_UNCHANGED
EXPECTED = {
    None: PathNormalization(True, False, KEEP),
    "DEFAULT": PathNormalization(True, False, KEEP),
    "NONE": PathNormalization(False, False, KEEP),
    "BASE": PathNormalization(True, False, KEEP),
    "MERGE_SLASHES": PathNormalization(True, True, KEEP),
    "DECODE_AND_MERGE_SLASHES": PathNormalization(
        True, True, EscapedSlashesAction.UNESCAPE_AND_FORWARD
    ),
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_inbound_listeners_normalize_paths_as_istiod_configures_sidecars(
    tmp_path: Path, mode: str | None
) -> None:
    (tmp_path / "svc.yaml").write_text(SERVICE)
    if mode is not None:
        mesh = f"trustDomain: cluster.local\npathNormalization:\n  normalization: {mode}\n"
        (tmp_path / "mesh.yaml").write_text(configmap(mesh))
    assert inbound_normalization(tmp_path) == EXPECTED[mode]


def test_other_istio_configmaps_are_not_mesh_config(tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text(SERVICE)
    (tmp_path / "root.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio-ca-root-cert}\n"
        "data:\n  root-cert.pem: x\n"
    )
    config = load_ok(tmp_path)
    assert config.mesh_settings.path_normalization == "BASE"
    assert config.mesh_settings.source == ""


def test_a_revision_mesh_config_is_ignored_beside_istio(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        configmap("pathNormalization: {normalization: NONE}", name="istio-canary")
    )
    (tmp_path / "b.yaml").write_text(configmap("pathNormalization: {normalization: MERGE_SLASHES}"))
    config, issues = load_config([tmp_path])
    assert config is not None
    assert config.mesh_settings.path_normalization == "MERGE_SLASHES"
    warnings = [str(i) for i in issues if not i.is_error and "ignored" in str(i)]
    assert any("istio-canary" in w and "a.yaml" in w for w in warnings), warnings


@pytest.mark.parametrize(
    ("mesh", "field", "words"),
    [
        ("pathNormalization:\n  normalization: MERGE", "normalization", "invalid value 'MERGE'"),
        ("pathNormalization: [1]", "data.mesh.pathNormalization", "expected a mapping"),
        ("pathNormalization:\n  mode: BASE", "data.mesh.pathNormalization.mode", "unknown"),
        ("pathNormalization: {normalization: [", "data.mesh", "malformed MeshConfig YAML"),
        ("- a list", "data.mesh", "must be a mapping"),
    ],
)
def test_bad_mesh_config_is_refused_naming_file_and_field(
    tmp_path: Path, mesh: str, field: str, words: str
) -> None:
    (tmp_path / "mesh.yaml").write_text(configmap(mesh))
    config, issues = load_config([tmp_path])
    assert config is None
    errors = [str(i) for i in issues if i.is_error]
    assert len(errors) == 1, errors
    assert "mesh.yaml" in errors[0] and field in errors[0] and words in errors[0], errors
