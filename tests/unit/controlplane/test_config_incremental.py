"""ConfigLoader (incremental reloads) gives exactly what a fresh load_config gives: the same
specs, files, version and issues in the same order, whatever changed between two loads."""

from __future__ import annotations

from pathlib import Path

import yaml

from pymesh.controlplane.config import load_config
from pymesh.controlplane.config._load import _LOADER, ConfigLoader

FIXTURES = Path(__file__).parent / "fixtures"
_PARTS = (
    "services",
    "virtual_services",
    "destination_rules",
    "workload_entries",
    "workload_groups",
    "peer_authentications",
    "authorization_policies",
    "files",
    "version",
)


def _se(i: int, port: int = 9000) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        f"metadata: {{name: svc-{i}, namespace: bench}}\n"
        f"spec:\n  hosts: [svc-{i}.example.com]\n  resolution: STATIC\n"
        "  ports: [{number: 8080, name: http, protocol: HTTP}]\n"
        f"  endpoints:\n  - {{address: 10.0.0.{i + 1}, ports: {{http: {port}}}}}\n"
    )


def _assert_same(paths: list[Path], loader: ConfigLoader) -> None:
    fresh_cfg, fresh_issues = load_config(paths)
    cfg, issues = loader.load(paths)
    assert [str(i) for i in issues] == [str(i) for i in fresh_issues]
    assert (cfg is None) == (fresh_cfg is None)
    if cfg is not None and fresh_cfg is not None:
        for part in _PARTS:
            assert getattr(cfg, part) == getattr(fresh_cfg, part), part


def test_incremental_reloads_equal_fresh_loads(tmp_path: Path) -> None:
    f = tmp_path / "mesh.yaml"
    loader = ConfigLoader()
    base = [_se(i) for i in range(6)]
    steps = [
        "---\n".join(base),
        "---\n".join([*base[:3], _se(3, 9100), *base[4:]]),  # one endpoint port changed
        "# comment\n---\n" + "---\n".join(base),  # a leading section shifts nothing
        "---\n".join([_se(9), *base]),  # a document inserted first: indexes shift
        "---\n".join([*base, base[2]]),  # a duplicate: an error
        "---\n".join([*base, "kind: [\n"]),  # malformed YAML: reported with file positions
        "%YAML 1.1\n---\n" + "---\n".join(base),  # directives: parsed as one piece
        "---\n".join([*base, "apiVersion: v9\nkind: Foo\nmetadata: {name: a}\n"]),
        "---\n".join(base) + "---\n",
        "",
    ]
    for text in steps:
        f.write_text(text)
        _assert_same([f], loader)
        _assert_same([f], loader)  # a second load with nothing changed reuses everything


def test_incremental_reloads_of_fixture_directory(tmp_path: Path) -> None:
    loader = ConfigLoader()
    for path in sorted(FIXTURES.rglob("*.yaml")):
        _assert_same([path], loader)
    _assert_same([FIXTURES], loader)
    _assert_same([FIXTURES], loader)


def test_unchanged_documents_are_not_parsed_again(tmp_path: Path) -> None:
    f = tmp_path / "mesh.yaml"
    loader = ConfigLoader()
    f.write_text("---\n".join(_se(i) for i in range(4)))
    first, _ = loader.load([f])
    f.write_text("---\n".join([_se(0, 9999), _se(1), _se(2), _se(3)]))
    second, _ = loader.load([f])
    assert first is not None and second is not None
    assert second.services[0] != first.services[0]
    # The same spec objects: documents 1..3 were reused, not parsed again.
    assert all(a is b for a, b in zip(first.services[1:], second.services[1:], strict=True))
    assert second.version != first.version


def test_fast_yaml_loader_matches_pyyaml_safe_loader() -> None:
    text = (
        "a: &x {b: 1, c: [1, 2.5, yes, null, 's', 2020-01-01, 0x10, ~, '']}\n"
        "d: *x\ne:\n  <<: *x\n  f: 1_000\n8080: port\n"
        "---\n!!str 12\n---\n- [a, {k: v}]\n- !!binary aGVsbG8=\n---\n"
    )
    fast = list(yaml.load_all(text, Loader=_LOADER))
    assert fast == list(yaml.load_all(text, Loader=yaml.SafeLoader))
    assert fast[0]["d"] is fast[0]["a"]  # aliases share one object, as PyYAML's
