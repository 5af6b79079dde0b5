"""Rejected configs: each error names the file, the document (index, kind, ns/name) and the
dotted field; a bad file never half-applies; garbage never crashes the loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymesh.controlplane.config import IssueLevel, load_config

BASE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  ports: [{number: 9080, name: http}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
"""


def _vs(http: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: reviews, namespace: default}\n"
        f"spec:\n  hosts: [reviews]\n  http:\n{http}"
    )


ROUTE = "  - route: [{destination: {host: reviews, subset: v1}}]\n"

# (id, extra YAML appended after BASE as document 2, expected kind, expected field)
CASES = [
    (
        "weight-type",
        _vs("  - route: [{destination: {host: reviews}, weight: abc}]\n"),
        "VirtualService",
        "spec.http[0].route[0].weight",
    ),
    (
        "weights-sum",
        _vs(
            "  - route: [{destination: {host: reviews}, weight: 60},"
            " {destination: {host: reviews, subset: v1}, weight: 30}]\n"
        ),
        "VirtualService",
        "spec.http[0].route",
    ),
    (
        "missing-subset",
        _vs("  - route: [{destination: {host: reviews, subset: v9}}]\n"),
        "VirtualService",
        "spec.http[0].route[0].destination.subset",
    ),
    (
        "unknown-host",
        _vs("  - route: [{destination: {host: nope}}]\n"),
        "VirtualService",
        "spec.http[0].route[0].destination.host",
    ),
    (
        "bad-port",
        _vs("  - route: [{destination: {host: reviews, port: {number: 1}}}]\n"),
        "VirtualService",
        "spec.http[0].route[0].destination.port.number",
    ),
    (
        "timeout",
        _vs("  - route: [{destination: {host: reviews}}]\n    timeout: 5 seconds\n"),
        "VirtualService",
        "spec.http[0].timeout",
    ),
    (
        "typo",
        _vs("  - rout: [{destination: {host: reviews}}]\n"),
        "VirtualService",
        "spec.http[0].rout",
    ),
    (
        "regex",
        _vs(
            "  - match: [{uri: {regex: '(['}}]\n"
            "    route: [{destination: {host: reviews, subset: v1}}]\n"
        ),
        "VirtualService",
        "spec.http[0].match[0].uri.regex",
    ),
    (
        "abort-both",
        _vs(ROUTE + "    fault: {abort: {httpStatus: 500, grpcStatus: 14}}\n"),
        "VirtualService",
        "spec.http[0].fault.abort",
    ),
    (
        "mirror-missing-subset",
        _vs(ROUTE + "    mirror: {host: reviews, subset: v7}\n"),
        "VirtualService",
        "spec.http[0].mirrors[0].destination.subset",
    ),
    (
        "lb-simple",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: r2}\nspec:\n  host: reviews\n  trafficPolicy:\n"
        "    loadBalancer: {simple: FASTEST}\n",
        "DestinationRule",
        "spec.trafficPolicy.loadBalancer.simple",
    ),
    (
        "distribute",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: r2}\nspec:\n  host: reviews\n  trafficPolicy:\n"
        "    loadBalancer:\n      localityLbSetting:\n"
        "        distribute: [{from: a/*, to: {a/*: 70}}]\n",
        "DestinationRule",
        "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
    ),
    (
        "outlier-percent",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: r2}\nspec:\n  host: reviews\n  subsets:\n  - name: v2\n"
        "    trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}\n",
        "DestinationRule",
        "spec.subsets[0].trafficPolicy.outlierDetection.maxEjectionPercent",
    ),
    ("duplicate", BASE.split("---\n")[1], "DestinationRule", "metadata.name"),
    (
        "se-port",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        "metadata: {name: x}\nspec:\n  hosts: [x]\n  ports: [{number: 70000, name: http}]\n",
        "ServiceEntry",
        "spec.ports[0].number",
    ),
    (
        "se-static-hostname",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        "metadata: {name: x}\nspec:\n  hosts: [x]\n  ports: [{number: 80, name: http}]\n"
        "  resolution: STATIC\n  endpoints: [{address: foo.example.com}]\n",
        "ServiceEntry",
        "spec.endpoints[0].address",
    ),
    (
        "authz-custom",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: ext}\nspec:\n  action: CUSTOM\n  provider: {name: opa}\n",
        "AuthorizationPolicy",
        "spec.action",
    ),
    (
        "authz-condition",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: a}\nspec:\n  rules: [{when: [{key: source.color, values: [red]}]}]\n",
        "AuthorizationPolicy",
        "spec.rules[0].when[0].key",
    ),
    (
        "authz-cidr",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: a}\nspec:\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]\n",
        "AuthorizationPolicy",
        "spec.rules[0].from[0].source.ipBlocks[0]",
    ),
    (
        "pa-mode",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: p}\nspec:\n  mtls: {mode: MAYBE}\n",
        "PeerAuthentication",
        "spec.mtls.mode",
    ),
    (
        "api-version",
        "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: v}\nspec: {}\n",
        "VirtualService",
        "apiVersion",
    ),
    (
        "no-name",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {namespace: default}\nspec: {address: 1.2.3.4}\n",
        "WorkloadEntry",
        "metadata.name",
    ),
    (
        "bad-name",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: Bad_Name}\nspec: {address: 1.2.3.4}\n",
        "WorkloadEntry",
        "metadata.name",
    ),
    (
        "wg-address",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\n"
        "metadata: {name: g}\nspec:\n  template: {address: 1.2.3.4}\n",
        "WorkloadGroup",
        "spec.template.address",
    ),
    (
        "spec-list",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: w}\nspec: [1, 2]\n",
        "WorkloadEntry",
        "spec",
    ),
]


@pytest.mark.parametrize(
    ("extra", "kind", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rejected(tmp_path: Path, extra: str, kind: str, field: str) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(BASE + "---\n" + extra)
    config, issues = load_config([path])
    assert config is None, "a config with errors must never be returned"
    errors = [i for i in issues if i.level is IssueLevel.ERROR]
    assert errors, issues
    first = errors[0]
    assert (first.file, first.doc, first.kind, first.field) == (str(path), 2, kind, field), [
        str(e) for e in errors
    ]
    assert first.message
    text = str(first)
    assert text.startswith(f"Error [{path}:2 {kind}/") and field in text


def test_good_base_loads(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(BASE + "---\n" + _vs(ROUTE))
    config, issues = load_config([path])
    assert config is not None and [i for i in issues if i.is_error] == []


def test_malformed_yaml_names_file(tmp_path: Path) -> None:
    good = tmp_path / "a.yaml"
    good.write_text(BASE)
    bad = tmp_path / "b.yaml"
    bad.write_text("apiVersion: v1\nkind: [unclosed\n")
    config, issues = load_config([tmp_path])
    assert config is None
    assert [(i.file, i.level) for i in issues] == [(str(bad), IssueLevel.ERROR)]
    assert "malformed YAML at line" in issues[0].message


def test_unknown_kind_and_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(BASE + "---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
    config, issues = load_config([path])
    assert config is not None
    assert [(i.level, i.doc, i.kind) for i in issues] == [(IssueLevel.WARNING, 2, "Widget")]
    config, issues = load_config([tmp_path / "missing"])
    assert config is None and issues[0].message == "no such file or directory"


def test_short_names_resolve_in_config_namespace(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(BASE.replace("namespace: default", "namespace: shop"))
    config, _ = load_config([path])
    assert config is not None
    assert config.services[0].hostname == "reviews.shop.svc.cluster.local"
    assert config.destination_rules[0].host == "reviews.shop.svc.cluster.local"


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=8))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "hosts",
                    "ports",
                    "http",
                    "route",
                    "destination",
                    "host",
                    "subset",
                    "weight",
                    "match",
                    "uri",
                    "number",
                    "name",
                    "spec",
                    "trafficPolicy",
                    "loadBalancer",
                    "subsets",
                    "labels",
                    "rules",
                    "from",
                    "source",
                    "address",
                    "endpoints",
                    "mtls",
                    "mode",
                ]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=20,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from(
        [
            "ServiceEntry",
            "VirtualService",
            "DestinationRule",
            "WorkloadEntry",
            "WorkloadGroup",
            "PeerAuthentication",
            "AuthorizationPolicy",
            "Service",
            "Deployment",
        ]
    ),
    spec=_values,
)
def test_garbage_never_crashes(tmp_path: Path, kind: str, spec: object) -> None:
    api = {"Service": "v1", "Deployment": "apps/v1"}.get(
        kind,
        "security.istio.io/v1"
        if kind.endswith(("Authentication", "Policy"))
        else "networking.istio.io/v1",
    )
    doc = {"apiVersion": api, "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(doc))
    config, issues = load_config([path])
    assert (config is None) == any(i.is_error for i in issues)
