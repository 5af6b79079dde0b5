"""Static Envoy configurations for the sidecar variants (no xDS: what Istio would push,
written out by hand for one upstream).

Three Envoys, each ``--concurrency 1`` (one worker thread), each with an HTTP and a gRPC
listener:

- ``one``: a client sidecar alone: plaintext in, plaintext to the upstream (the one-Envoy path);
- ``client``: the client sidecar of the two-Envoy path: plaintext in, mTLS to ``server``;
- ``server``: the server sidecar: mTLS in (client certificate required), plaintext to the app.

Every cluster carries the same policy as pymesh's config (round robin, retries on 5xx and
connect failures, a 10 s route timeout, circuit-breaker thresholds, outlier detection); the
mTLS leg uses certificates from the pymesh CA with SPIFFE SAN checks, as Istio's sidecars do.
Istio's sidecars run more filters (telemetry, metadata exchange): these Envoys are leaner
than Istio's, so the comparison favours the sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ANY = "@type"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
UP_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWN_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


@dataclass(frozen=True)
class Certs:
    """Paths of one identity's PEM files (Istio's names) and its SPIFFE ID."""

    directory: Path
    spiffe_id: str

    @property
    def chain(self) -> str:
        return str(self.directory / "cert-chain.pem")

    @property
    def key(self) -> str:
        return str(self.directory / "key.pem")

    @property
    def roots(self) -> str:
        return str(self.directory / "root-cert.pem")


def _common_tls(certs: Certs, peer: str | None, alpn: list[str]) -> dict[str, Any]:
    validation: dict[str, Any] = {"trusted_ca": {"filename": certs.roots}}
    if peer is not None:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": peer}}
        ]
    return {
        "tls_certificates": [
            {"certificate_chain": {"filename": certs.chain}, "private_key": {"filename": certs.key}}
        ],
        "validation_context": validation,
        "alpn_protocols": alpn,
    }


def _listener(
    name: str, port: int, cluster: str, grpc: bool, tls: dict[str, Any] | None
) -> dict[str, Any]:
    route: dict[str, Any] = {
        "cluster": cluster,
        "timeout": "10s",
        "retry_policy": {
            "retry_on": "connect-failure,refused-stream,unavailable"
            if grpc
            else "5xx,connect-failure",
            "num_retries": 2,
        },
    }
    hcm = {
        _ANY: HCM,
        "stat_prefix": name,
        "codec_type": "HTTP2" if grpc else "AUTO",
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": route}],
                }
            ],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {_ANY: ROUTER}}],
    }
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if tls is not None:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain],
    }


def _cluster(name: str, port: int, grpc: bool, tls: dict[str, Any] | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 1000,
                    "max_pending_requests": 1000,
                    "max_requests": 1000,
                    "max_retries": 10,
                }
            ]
        },
        "outlier_detection": {
            "consecutive_5xx": 5,
            "interval": "10s",
            "base_ejection_time": "30s",
        },
    }
    if grpc:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                _ANY: HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if tls is not None:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


@dataclass(frozen=True)
class Ports:
    """Where an Envoy listens (``http``, ``grpc``) and where it sends (``http_up``, ``grpc_up``)."""

    http: int
    grpc: int
    http_up: int
    grpc_up: int


def bootstrap(
    ports: Ports,
    *,
    upstream_tls: tuple[Certs, str] | None = None,
    downstream_tls: tuple[Certs, str] | None = None,
) -> dict[str, Any]:
    """One Envoy's static bootstrap. ``upstream_tls=(certs, peer SPIFFE ID)``: originate mTLS
    (the client sidecar); ``downstream_tls=(certs, peer SPIFFE ID)``: terminate mTLS with the
    client certificate required (the server sidecar)."""

    def down(alpn: list[str]) -> dict[str, Any] | None:
        if downstream_tls is None:
            return None
        certs, peer = downstream_tls
        return {
            _ANY: DOWN_TLS,
            "common_tls_context": _common_tls(certs, peer, alpn),
            "require_client_certificate": True,
        }

    def up(alpn: list[str]) -> dict[str, Any] | None:
        if upstream_tls is None:
            return None
        certs, peer = upstream_tls
        return {_ANY: UP_TLS, "common_tls_context": _common_tls(certs, peer, alpn)}

    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                _listener("http", ports.http, "http_up", False, down(["http/1.1"])),
                _listener("grpc", ports.grpc, "grpc_up", True, down(["h2"])),
            ],
            "clusters": [
                _cluster("http_up", ports.http_up, False, up(["http/1.1"])),
                _cluster("grpc_up", ports.grpc_up, True, up(["h2"])),
            ],
        },
    }
