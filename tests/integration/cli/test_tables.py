"""The table builders of ``proxy-config`` / ``proxy-status`` on hand-written inputs: the
shapes the live tests do not produce (istiod metadata, aggregate clusters, TCP chains,
expired or missing certificates, NACKs)."""

from __future__ import annotations

import datetime

import pymesh.admin
from pymesh.admin._views import certs_view
from pymesh.cli import cmd_proxy_config as pc
from pymesh.cli.cmd_proxy_status import render_table, summarize, type_status
from pymesh.security import CertificateProvider, StaticProvider
from tests.unit.security.pki_helpers import new_root, raw_bundle

ISTIO_DR = {
    "filter_metadata": {
        "istio": {
            "config": "/apis/networking.istio.io/v1alpha3/namespaces/prod/destination-rule/reviews"
        }
    }
}


def _dump(kind: str, *configs: dict[str, object]) -> dict[str, object]:
    return {"resources": [{"type": kind, "name": str(c.get("name")), "config": c} for c in configs]}


def test_cluster_rows() -> None:
    rows = pc.cluster_rows(
        _dump(
            "CDS",
            {
                "name": "outbound|9080|v1|reviews.prod.svc.cluster.local",
                "type": "EDS",
                "metadata": ISTIO_DR,
            },
            {"name": "inbound|9080||", "type": "STATIC"},
            {"name": "my-cluster", "type": "LOGICAL_DNS"},
            {"name": "agg", "cluster_type": {"name": "envoy.clusters.aggregate"}},
        )
    )
    assert rows == [
        ("-", "9080", "-", "inbound", "STATIC", "-"),
        ("agg", "-", "-", "-", "AGGREGATE", "-"),
        ("my-cluster", "-", "-", "-", "LOGICAL_DNS", "-"),
        ("reviews.prod.svc.cluster.local", "9080", "v1", "outbound", "EDS", "reviews.prod"),
    ]


def test_route_rows() -> None:
    vs = {
        "filter_metadata": {
            "istio": {"config": "/apis/networking.istio.io/v1/namespaces/default/virtual-service/r"}
        }
    }
    rows = pc.route_rows(
        _dump(
            "RDS",
            {
                "name": "9080",
                "virtual_hosts": [
                    {
                        "name": "r:9080",
                        "domains": ["r.default.svc.cluster.local", "r", "r:9080"],
                        "routes": [
                            {"match": {"path": "/exact"}, "metadata": vs},
                            {"match": {"prefix": "/api"}},
                            {"match": {"safe_regex": {"regex": "/v[0-9]+"}}},
                            {"match": {"prefix": ""}},
                        ],
                    },
                    {"name": "empty", "domains": ["*"]},
                ],
            },
        )
    )
    assert rows == [
        ("9080", "r:9080", "r, r.default.svc.cluster.local", "/exact", "r.default"),
        ("9080", "r:9080", "r, r.default.svc.cluster.local", "/api*", "-"),
        ("9080", "r:9080", "r, r.default.svc.cluster.local", "regex:/v[0-9]+", "-"),
        ("9080", "r:9080", "r, r.default.svc.cluster.local", "/*", "-"),
        ("9080", "empty", "*", "/*", "-"),
    ]


def test_listener_rows_tcp_and_rds() -> None:
    hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"  # noqa: E501
    rows = pc.listener_rows(
        _dump(
            "LDS",
            {
                "name": "inbound",
                "address": {"socket_address": {"address": "10.0.0.1", "port_value": 9080}},
                "filter_chains": [
                    {"name": "tcp", "filters": [{"name": "envoy.filters.network.tcp_proxy"}]},
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {"@type": hcm, "rds": {"route_config_name": "x"}},
                            }
                        ]
                    },
                ],
            },
        )
    )
    assert rows == [
        ("10.0.0.1", "9080", "TCP", "tcp"),
        ("10.0.0.1", "9080", "HTTP", "Route: x"),
    ]


def test_endpoint_rows_health() -> None:
    rows = pc.endpoint_rows(
        [
            {
                "name": "c",
                "hosts": [
                    {"address": "b:1", "health": "UNKNOWN", "outlier": {"ejected": False}},
                    {"address": "a:1", "health": "DRAINING", "outlier": {"ejected": True}},
                ],
            }
        ]
    )
    assert rows == [("a:1", "DRAINING", "FAILED", "c"), ("b:1", "HEALTHY", "OK", "c")]


def test_secret_rows_expired_and_warming() -> None:
    root, key = new_root()
    now = datetime.datetime.now(datetime.UTC)
    expired = raw_bundle(
        root,
        key,
        "spiffe://cluster.local/ns/a/sa/b",
        not_before=now - datetime.timedelta(hours=2),
        not_after=now - datetime.timedelta(hours=1),
    )
    providers: dict[str, CertificateProvider] = {
        "default": StaticProvider(expired),
        "other": StaticProvider(),  # nothing loaded yet
    }
    view = certs_view(providers, now.timestamp())
    assert view[0]["valid"] is False and view[0]["identity"] == "spiffe://cluster.local/ns/a/sa/b"
    assert view[1] == {"name": "other", "ready": False}
    rows = pc.secret_rows(view)
    assert [r[:4] for r in rows] == [
        ("default", "Cert Chain", "EXPIRED", "false"),
        ("ROOTCA", "CA", "ACTIVE", "true"),
        ("other", "Cert Chain", "WARMING", "false"),
    ]
    assert rows[1][4] == format(root.serial_number, "x")


def test_proxy_status_states() -> None:
    nacked = {
        "nonce": "3",
        "sent_version": "2",
        "acked_version": "1",
        "acked": False,
        "last_nack": {"version": "2", "nonce": "3", "message": "bad cluster"},
    }
    stale = {"nonce": "4", "sent_version": "2", "acked_version": "1", "acked": False}
    assert type_status(nacked) == "NACKED"
    assert type_status(stale) == "STALE"
    assert type_status({"nonce": ""}) == "NOT SENT"
    assert type_status(None) == "NOT SENT"
    # An old NACK (another nonce) followed by an ACK is SYNCED again.
    assert type_status({**nacked, "nonce": "5", "acked": True}) == "SYNCED"
    streams = [{"proxy": "p", "delta": True, "types": {"CDS": nacked, "EDS": stale}}]
    assert render_table(streams).splitlines()[1].split() == [
        "p",
        "NACKED",
        "NOT",
        "SENT",
        "STALE",
        "NOT",
        "SENT",
        "delta",
        "2",
    ]
    (summary,) = summarize(streams)
    assert summary["type"] == "delta"
    assert summary["types"]["CDS"] == {
        "status": "NACKED",
        "sent_version": "2",
        "acked_version": "1",
        "nacked_version": "2",
        "nack_message": "bad cluster",
        "resources": 0,
    }


def test_admin_public_surface() -> None:
    assert set(pymesh.admin.__all__) == {
        "ENDPOINTS",
        "AdminServer",
        "current",
        "start",
        "start_from_env",
        "stop",
    }
