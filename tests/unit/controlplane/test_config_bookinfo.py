"""Istio's published Bookinfo samples load unchanged (with the Bookinfo platform services)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymesh.controlplane.config import IssueLevel, load_config

REPO = Path(__file__).resolve().parents[3]
BOOKINFO = REPO.parent / "shared" / "istio-bookinfo"
NETWORKING = sorted((BOOKINFO / "networking").glob("*.yaml"))


def _inputs(f: Path) -> list[Path]:
    platform = BOOKINFO / "platform" / "kube" / "bookinfo.yaml"
    if "destination-rule" in f.name or "fault-injection" in f.name:
        return [platform, f]  # these files define their own DestinationRules
    return [platform, BOOKINFO / "networking" / "destination-rule-all.yaml", f]


def test_networking_samples_exist() -> None:
    assert len(NETWORKING) >= 15


@pytest.mark.parametrize("path", NETWORKING, ids=lambda p: p.name)
def test_every_networking_file_loads(path: Path) -> None:
    config, issues = load_config(_inputs(path))
    errors = [str(i) for i in issues if i.level is IssueLevel.ERROR]
    assert errors == []
    assert config is not None
    hosts = {s.hostname for s in config.services}
    assert {
        "productpage.default.svc.cluster.local",
        "reviews.default.svc.cluster.local",
        "ratings.default.svc.cluster.local",
        "details.default.svc.cluster.local",
    } <= hosts


def test_platform_deployments_become_workload_groups() -> None:
    config, _ = load_config([BOOKINFO / "platform" / "kube" / "bookinfo.yaml"])
    assert config is not None
    group = config.match_workload_group("default", {"app": "reviews", "version": "v2"})
    assert group is not None
    assert group.name == "reviews-v2"
    assert group.service_account == "bookinfo-reviews"
    reviews = config.service("reviews.default.svc.cluster.local")
    assert reviews is not None and reviews.selector == {"app": "reviews"}
    # Auto-registered workloads become the Service's endpoints.
    derived = config.with_workloads([group.entry_for("10.0.0.7")])
    eps = derived.endpoints(reviews, 9080)
    assert [(e.address, e.port, e.labels["version"]) for e in eps] == [("10.0.0.7", 9080, "v2")]
    assert config.endpoints(reviews, 9080) == ()


def test_gateway_bound_virtual_service_is_ignored_with_warning() -> None:
    config, issues = load_config(
        [
            BOOKINFO / "platform" / "kube" / "bookinfo.yaml",
            BOOKINFO / "networking" / "bookinfo-gateway.yaml",
        ]
    )
    assert config is not None and config.virtual_services == ()
    warnings = [i for i in issues if i.level is IssueLevel.WARNING]
    assert any(i.kind == "VirtualService" and i.field == "spec.gateways" for i in warnings)
    assert any(i.kind == "Gateway" for i in warnings)


def test_virtual_service_without_destination_rule_is_rejected() -> None:
    config, issues = load_config(
        [
            BOOKINFO / "platform" / "kube" / "bookinfo.yaml",
            BOOKINFO / "networking" / "virtual-service-reviews-80-20.yaml",
        ]
    )
    assert config is None
    errors = [i for i in issues if i.is_error]
    assert errors and all(i.kind == "VirtualService" for i in errors)
    assert errors[0].field == "spec.http[0].route[0].destination.subset"
    assert errors[0].file.endswith("virtual-service-reviews-80-20.yaml")
    assert errors[0].name == "default/reviews"


def test_all_destination_rule_files_together_are_duplicates() -> None:
    config, issues = load_config(
        [
            BOOKINFO / "networking" / "destination-rule-all.yaml",
            BOOKINFO / "networking" / "destination-rule-all-mtls.yaml",
        ]
    )
    assert config is None
    dup = [i for i in issues if i.is_error]
    assert dup and dup[0].field == "metadata.name" and "duplicate" in dup[0].message
