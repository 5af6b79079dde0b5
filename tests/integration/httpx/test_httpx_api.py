"""The public surface of pymesh.httpx is small and pinned (STYLE.md #12)."""

from __future__ import annotations

import httpx

import pymesh.httpx
from pymesh.httpx._targets import expand_host


def test_exported_members() -> None:
    assert sorted(pymesh.httpx.__all__) == sorted(
        [
            "RESULT_EXTENSION",
            "AsyncClient",
            "AsyncMeshTransport",
            "Client",
            "MeshTransport",
            "OutboundTrafficPolicy",
        ]
    )
    assert issubclass(pymesh.httpx.Client, httpx.Client)
    assert issubclass(pymesh.httpx.AsyncClient, httpx.AsyncClient)
    assert issubclass(pymesh.httpx.MeshTransport, httpx.BaseTransport)
    assert issubclass(pymesh.httpx.AsyncMeshTransport, httpx.AsyncBaseTransport)


def test_host_expansion_follows_kubernetes_dns_search() -> None:
    assert expand_host("reviews", "ns") == "reviews.ns.svc.cluster.local"
    assert expand_host("reviews.other", "ns") == "reviews.other.svc.cluster.local"
    assert expand_host("reviews.other.svc", "ns") == "reviews.other.svc.cluster.local"
    assert expand_host("Reviews.Other.svc.cluster.local.", "ns") == (
        "reviews.other.svc.cluster.local"
    )
    assert expand_host("api.example.com", "ns") == "api.example.com"
    assert expand_host("10.0.0.1", "ns") == "10.0.0.1"
    assert expand_host("localhost", "ns") == "localhost"
    assert expand_host("reviews", "ns", "corp.local") == "reviews.ns.svc.corp.local"
