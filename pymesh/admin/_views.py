"""What the admin endpoint shows, as plain JSON-able data (no I/O, no HTTP here).

Each function reads the live objects once and returns dicts/strings; the HTTP layer
(:mod:`pymesh.admin._server`) only serializes them.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pymesh.bootstrap import Bootstrap
from pymesh.core.runtime import ClusterRuntime, MeshRuntime
from pymesh.xds.client import ConnectionState
from pymesh.xds.codec.csds import ResourceStatusLike
from pymesh.xds.status import config_dump

if TYPE_CHECKING:  # pymesh.security and cryptography load when certificates are shown
    from pymesh.security import CertificateBundle, CertificateProvider

__all__ = ["StatusSource", "certs_view", "clusters_view", "config_dump_view", "ready", "stats_text"]


class StatusSource(Protocol):
    """What the admin endpoint needs of an :class:`~pymesh.xds.client.XdsClient`."""

    @property
    def bootstrap(self) -> Bootstrap: ...

    def resource_statuses(self) -> Sequence[ResourceStatusLike]: ...

    def connection_states(self) -> list[ConnectionState]: ...


def _iso(seconds: float) -> str | None:
    if seconds in (0.0, float("inf")):
        return None
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).isoformat()


def _connections(client: StatusSource) -> list[dict[str, Any]]:
    return [
        {
            "server_uri": c.server_uri,
            "connected": c.connected,
            "last_error": c.last_error,
            "servers": list(c.servers),
        }
        for c in client.connection_states()
    ]


def config_dump_view(client: StatusSource) -> dict[str, Any]:
    """``/config_dump``: the node, the xDS connections, and every subscribed resource with
    its status, version, last NACK and config (Envoy JSON)."""
    node = client.bootstrap.node
    return {
        "node": {
            "id": node.id,
            "cluster": node.cluster,
            "locality": {
                "region": node.locality.region,
                "zone": node.locality.zone,
                "sub_zone": node.locality.sub_zone,
            },
        },
        "connections": _connections(client),
        "resources": config_dump(client),
    }


def ready(client: StatusSource) -> tuple[bool, str]:
    """``/ready``: ready once no subscribed resource is still waiting for its first answer
    (every one is ACKED, NACKED with a previous good value, or known not to exist)."""
    waiting = [s for s in client.resource_statuses() if s.status == "REQUESTED"]
    if waiting:
        names = ", ".join(f"{s.rtype.abbrev} {s.name}" for s in waiting[:5])
        return False, f"waiting for {len(waiting)} resource(s): {names}"
    return True, "LIVE"


def _host_view(rt: ClusterRuntime, host: Any, now: float) -> dict[str, Any]:
    ejected = host.is_ejected(now)
    outlier = rt.outlier
    return {
        "address": host.key,
        "hostname": host.hostname,
        "health": host.health.name,
        "weight": host.weight,
        "priority": host.priority,
        "locality": {
            "region": host.locality.region,
            "zone": host.locality.zone,
            "sub_zone": host.locality.sub_zone,
        },
        "active_requests": host.active_requests,
        "outlier": {
            "ejected": ejected,
            "ejected_for_s": round(host.ejected_until - now, 3) if ejected else None,
            "ejections_total": outlier.num_ejections(host) if outlier is not None else 0,
        },
    }


def clusters_view(runtime: MeshRuntime) -> list[dict[str, Any]]:
    """``/clusters``: every cluster the runtime tracks, with its endpoints, their health and
    outlier state, active requests and the circuit breaker's thresholds and counters."""
    now = runtime.clock()
    out: list[dict[str, Any]] = []
    for name, rt in sorted(runtime.clusters().items()):
        cluster = rt.config.cluster
        limits = rt.limits
        cb = limits.breakers
        outlier = rt.outlier
        stats = outlier.stats() if outlier is not None else None
        out.append(
            {
                "name": name,
                "type": cluster.kind.name,
                "lb_policy": type(cluster.lb_policy).__name__,
                "usable_hosts": rt.usable_hosts,
                "circuit_breakers": {
                    "max_connections": cb.max_connections,
                    "max_pending_requests": cb.max_pending_requests,
                    "max_requests": cb.max_requests,
                    "max_retries": cb.max_retries,
                    "connections": limits.connections,
                    "pending": limits.pending,
                    "requests": limits.requests,
                    "retries": limits.retries,
                    "cx_overflow": limits.cx_overflow,
                    "pending_overflow": limits.pending_overflow,
                    "rq_overflow": limits.rq_overflow,
                    "retry_overflow": limits.retry_overflow,
                },
                "outlier_detection": None
                if stats is None
                else {
                    "ejections_active": stats.ejections_active,
                    "ejections_enforced_total": stats.ejections_enforced_total,
                    "ejections_overflow": stats.ejections_overflow,
                },
                "hosts": [
                    _host_view(rt, h, now) for h in sorted(rt.hosts.values(), key=lambda h: h.key)
                ],
            }
        )
    return out


def _metric(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)


def stats_text(client: StatusSource, runtime: MeshRuntime | None) -> str:
    """``/stats``: ``name: value`` lines, Envoy's admin style (sorted)."""
    lines: list[str] = []
    by_status: dict[tuple[str, str], int] = {}
    for s in client.resource_statuses():
        key = (s.rtype.abbrev.lower(), s.status.lower())
        by_status[key] = by_status.get(key, 0) + 1
    for (t, st), n in sorted(by_status.items()):
        lines.append(f"xds.{t}.resources.{st}: {n}")
    conns = client.connection_states()
    lines.append(f"xds.connected: {int(any(c.connected for c in conns))}")
    if runtime is not None:
        now = runtime.clock()
        for name, rt in sorted(runtime.clusters().items()):
            p = f"cluster.{_metric(name)}."
            hosts = list(rt.hosts.values())
            limits = rt.limits
            values = {
                "membership_total": len(hosts),
                "membership_healthy": sum(1 for h in hosts if h.health.usable),
                "membership_usable": rt.usable_hosts,
                "outlier_detection.ejections_active": sum(1 for h in hosts if h.is_ejected(now)),
                "upstream_rq_active": limits.requests,
                "upstream_rq_pending_active": limits.pending,
                "upstream_cx_active": limits.connections,
                "upstream_rq_retry_active": limits.retries,
                "upstream_cx_overflow": limits.cx_overflow,
                "upstream_rq_pending_overflow": limits.pending_overflow,
                "upstream_rq_overflow": limits.rq_overflow,
                "upstream_rq_retry_overflow": limits.retry_overflow,
            }
            if rt.outlier is not None:
                ost = rt.outlier.stats()
                values["outlier_detection.ejections_enforced_total"] = ost.ejections_enforced_total
                values["outlier_detection.ejections_overflow"] = ost.ejections_overflow
            lines.extend(f"{p}{k}: {v}" for k, v in sorted(values.items()))
    return "\n".join(sorted(lines)) + "\n"


def _cert_info(pem: bytes) -> list[dict[str, Any]]:
    from cryptography import x509

    out: list[dict[str, Any]] = []
    for cert in x509.load_pem_x509_certificates(pem) if pem else []:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        out.append(
            {
                "subject": cert.subject.rfc4514_string(),
                "serial_number": format(cert.serial_number, "x"),
                "uri_sans": list(uris),
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
            }
        )
    return out


def _bundle_view(name: str, bundle: CertificateBundle | None, now: float) -> dict[str, Any]:
    if bundle is None:
        return {"name": name, "ready": False}
    chain = _cert_info(bundle.chain_pem)
    return {
        "name": name,
        "ready": True,
        "identity": bundle.identity,
        "not_before": _iso(bundle.not_before) if bundle.has_identity else None,
        "not_after": _iso(bundle.not_after) if bundle.has_identity else None,
        "valid": bundle.has_identity and bundle.not_before <= now < bundle.not_after,
        "version": bundle.version,
        "cert_chain": chain,
        "trust_bundle": _cert_info(bundle.roots_pem),
    }


def certs_view(providers: Mapping[str, CertificateProvider], now: float) -> list[dict[str, Any]]:
    """``/certs``: per certificate-provider instance, the workload certificate (SPIFFE ID,
    serial, validity) and the trust bundle."""
    out = []
    for name, provider in sorted(providers.items()):
        try:
            bundle: CertificateBundle | None = provider.current()
        except Exception:  # not ready yet (no bundle loaded)
            bundle = None
        out.append(_bundle_view(name, bundle, now))
    return out
