"""The plain-endpoint fast path of ServiceEntry parsing builds exactly what the general,
field-by-field path builds, and leaves every unusual endpoint (and its errors) to it."""

from __future__ import annotations

from pathlib import Path

import pytest

import pymesh.controlplane.config._parse_networking as networking
from pymesh.controlplane.config import load_config

ENDPOINTS = [
    "{address: 10.0.0.1, ports: {http: 9000}, labels: {version: v1}}",
    "{address: 10.0.0.2}",
    "{address: '::1', ports: {http: 9001, grpc: 9002}, labels: {}}",
    "{address: 10.0.0.3, ports: {http: '9003'}}",  # quoted port: converted by the reader
    "{address: 10.0.0.4, labels: {version: 2}}",  # number label: converted to a string
    "{address: 10.0.0.5, weight: 3, locality: us/east}",
    "{address: 10.0.0.6, network: n1, serviceAccount: sa}",
    "{address: 10.0.0.7, ports: {http: null}, labels: null}",
]
BAD_ENDPOINTS = [
    "{address: not-an-ip}",  # STATIC needs an IP
    "{address: 10.0.0.8, ports: {nope: 9000}}",  # no such service port
    "{address: 10.0.0.9, ports: {http: 70000}}",
    "{address: 10.0.0.10, labels: {canary: true}}",
    "{address: 10.0.0.11, colour: blue}",
    "{address: ''}",
]


def service_entry(i: int, endpoints: list[str]) -> str:
    eps = "".join(f"  - {e}\n" for e in endpoints)
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        f"metadata: {{name: s{i}, namespace: ns}}\n"
        f"spec:\n  hosts: [s{i}.example.com]\n  resolution: STATIC\n"
        "  ports: [{number: 80, name: http}, {number: 81, name: grpc, protocol: GRPC}]\n"
        f"  endpoints:\n{eps}"
    )


def load_both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    results = []
    for fast in (True, False):
        monkeypatch.setattr(networking, "_FAST_ENDPOINTS", fast)
        config, issues = load_config([path])
        services = None if config is None else config.services
        results.append((services, [str(i) for i in issues]))
    return results[0], results[1]


def test_plain_endpoints_parse_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("---\n".join(service_entry(i, [e]) for i, e in enumerate(ENDPOINTS)))
    fast, slow = load_both(path, monkeypatch)
    assert fast == slow
    services, _ = fast
    assert services is not None and len(services) == len(ENDPOINTS)  # type: ignore[arg-type]
    first = services[0].endpoints[0]  # type: ignore[index]
    assert (first.address, dict(first.ports), dict(first.labels)) == (
        "10.0.0.1",
        {"http": 9000},
        {"version": "v1"},
    )
    # ... and the fast path did build it (not the general path for everything).
    plain = {"address": "10.0.0.1", "ports": {"http": 9000}, "labels": {"version": "v1"}}
    assert networking._plain_static_endpoint(plain, {"http"}) == first
    assert networking._plain_static_endpoint({**plain, "weight": 2}, {"http"}) is None


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_unusual_endpoints_get_the_same_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(service_entry(0, [ENDPOINTS[0], endpoint]))
    fast, slow = load_both(path, monkeypatch)
    assert fast == slow
    assert fast[1]  # type: ignore[index]
