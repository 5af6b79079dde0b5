"""Writing a bootstrap for a workload, the way Istio's agent does for proxyless gRPC.

The result is plain JSON data (``dict``) that loads with :func:`parse_bootstrap` and with
grpcio's own xDS client. Istio's agent writes the same shape to
``/etc/istio/proxy/grpc-bootstrap.json``: an insecure channel to the agent's XDS socket (here
straight to the control plane), node id ``sidecar~IP~POD.NS~NS.svc.cluster.local``, metadata
with ``GENERATOR: grpc`` and the workload's identity, a ``default`` ``file_watcher``
certificate provider, and the inbound listener template ``xds.istio.io/grpc/lds/inbound/%s``.
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import NoReturn

from pymesh.bootstrap._model import (
    DEFAULT_TRUST_DOMAIN,
    SERVER_FEATURE_DELTA,
    SERVER_FEATURE_IGNORE_RESOURCE_DELETION,
    SERVER_FEATURE_XDS_V3,
    WorkloadPort,
)
from pymesh.errors import BootstrapError
from pymesh.model.common import Locality

__all__ = [
    "DEFAULT_XDS_ADDRESS",
    "ISTIO_SERVER_LISTENER_TEMPLATE",
    "generate_bootstrap",
]

DEFAULT_XDS_ADDRESS = "127.0.0.1:15010"
"""Istio's plaintext xDS port on istiod; ``pymesh control-plane`` listens there by default."""

ISTIO_SERVER_LISTENER_TEMPLATE = "xds.istio.io/grpc/lds/inbound/%s"
"""The server listener template Istio's agent writes (istiod serves these names)."""

ISTIO_CERT_REFRESH = "900s"
"""Refresh interval Istio's agent writes for the ``file_watcher`` provider (15 minutes)."""

_SOURCE = "generate_bootstrap"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_URI_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")


def _fail(field: str, message: str) -> NoReturn:
    raise BootstrapError(message, source=_SOURCE, field=field)


def generate_bootstrap(
    *,
    xds_address: str | Sequence[str] = DEFAULT_XDS_ADDRESS,
    namespace: str = "default",
    service_account: str = "default",
    workload: str | None = None,
    labels: Mapping[str, str] | None = None,
    ip: str = "127.0.0.1",
    ports: Sequence[WorkloadPort | int] = (),
    cluster_id: str = "Kubernetes",
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    mesh_id: str | None = None,
    locality: Locality | str | None = None,
    cert_dir: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    delta: bool = False,
    ignore_resource_deletion: bool = False,
    group: str | None = None,
    network: str | None = None,
    extra_metadata: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Return bootstrap JSON data for one workload.

    ``xds_address`` may list several servers (fallback order, gRFC A71); each is a gRPC target
    (``HOST:PORT``, ``[V6]:PORT``, ``unix:/path``, ``dns:///host:port``). ``workload``
    defaults to the ``app`` label (``app-version`` with a ``version`` label), else the service
    account. ``cert_dir`` adds the ``default`` ``file_watcher`` provider with Istio's file
    names (``cert-chain.pem``, ``key.pem``, ``root-cert.pem``). ``tls_*`` switch the xDS
    channel to ``tls`` credentials (gRFC A65). ``delta`` adds :data:`SERVER_FEATURE_DELTA`.
    ``group`` names the WorkloadGroup to auto-register in (``AUTO_REGISTER_GROUP``),
    ``network`` the workload's network (``NETWORK``); ``extra_metadata`` is merged last.
    Bad arguments raise :class:`~pymesh.errors.BootstrapError` naming the argument.
    """
    labels = dict(labels or {})
    addresses = [xds_address] if isinstance(xds_address, str) else list(xds_address)
    if not addresses:
        _fail("xds_address", "give at least one xDS server address")
    for addr in addresses:
        _check_address(addr)
    if not _DNS_LABEL.fullmatch(namespace):
        _fail("namespace", f"{namespace!r} is not a valid namespace (a DNS-1123 label)")
    if not service_account or "/" in service_account or "~" in service_account:
        _fail("service_account", f"{service_account!r} is not a valid service account name")
    for key, value in labels.items():
        if not key or not isinstance(value, str):
            _fail("labels", f"bad label {key!r}={value!r}")
    if workload is None:
        workload = _default_workload(labels, service_account)
    if not workload or "~" in workload or "." in workload or "/" in workload:
        _fail("workload", f"{workload!r} is not a valid workload name (no '~', '.', '/')")
    try:
        ip_text = str(ipaddress.ip_address(ip))
    except ValueError:
        _fail("ip", f"{ip!r} is not an IP address")
    loc = _locality(locality)
    if not trust_domain or "/" in trust_domain:
        _fail("trust_domain", f"{trust_domain!r} is not a valid trust domain")

    features = [SERVER_FEATURE_XDS_V3]
    if ignore_resource_deletion:
        features.append(SERVER_FEATURE_IGNORE_RESOURCE_DELETION)
    if delta:
        features.append(SERVER_FEATURE_DELTA)
    creds = _channel_creds(tls_ca, tls_cert, tls_key)
    servers = [
        {"server_uri": addr, "channel_creds": [creds], "server_features": list(features)}
        for addr in addresses
    ]

    metadata: dict[str, object] = {
        "GENERATOR": "grpc",
        "NAMESPACE": namespace,
        "NAME": workload,
        "WORKLOAD_NAME": workload,
        "SERVICE_ACCOUNT": service_account,
        "LABELS": labels,
        "INSTANCE_IPS": ip_text,
        "CLUSTER_ID": cluster_id,
        "MESH_ID": mesh_id or trust_domain,
        "TRUST_DOMAIN": trust_domain,
    }
    pod_ports = _pod_ports(ports)
    if pod_ports:
        metadata["POD_PORTS"] = pod_ports
    if group:
        metadata["AUTO_REGISTER_GROUP"] = group
    if network:
        metadata["NETWORK"] = network
    if extra_metadata:
        try:
            json.dumps(extra_metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            _fail("extra_metadata", f"not JSON data: {exc}")
        metadata.update(extra_metadata)

    node: dict[str, object] = {
        "id": f"sidecar~{ip_text}~{workload}.{namespace}~{namespace}.svc.cluster.local",
        "metadata": metadata,
        "locality": {
            k: v
            for k, v in (("region", loc.region), ("zone", loc.zone), ("sub_zone", loc.sub_zone))
            if v
        },
    }
    out: dict[str, object] = {"xds_servers": servers, "node": node}
    if cert_dir is not None:
        if not cert_dir:
            _fail("cert_dir", "must not be empty")
        out["certificate_providers"] = {
            "default": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": posixpath.join(cert_dir, "cert-chain.pem"),
                    "private_key_file": posixpath.join(cert_dir, "key.pem"),
                    "ca_certificate_file": posixpath.join(cert_dir, "root-cert.pem"),
                    "refresh_interval": ISTIO_CERT_REFRESH,
                },
            }
        }
    out["server_listener_resource_name_template"] = ISTIO_SERVER_LISTENER_TEMPLATE
    return out


def _check_address(addr: str) -> None:
    if not addr or any(c.isspace() for c in addr):
        _fail("xds_address", f"{addr!r} is not a gRPC target")
    if addr.startswith(_URI_SCHEMES):
        return
    if "://" in addr:
        _fail("xds_address", f"{addr!r}: unsupported scheme (use HOST:PORT or unix:PATH)")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail("xds_address", f"{addr!r} is not HOST:PORT, [IPV6]:PORT or unix:PATH")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        _fail("xds_address", f"{addr!r}: put an IPv6 address in brackets, [IPV6]:PORT")


def _default_workload(labels: Mapping[str, str], service_account: str) -> str:
    app = labels.get("app") or labels.get("app.kubernetes.io/name")
    if app:
        version = labels.get("version") or labels.get("app.kubernetes.io/version")
        return f"{app}-{version}" if version else app
    return service_account


def _locality(value: Locality | str | None) -> Locality:
    if value is None:
        return Locality()
    if isinstance(value, Locality):
        return value
    parts = value.split("/")
    if len(parts) > 3 or any(not p for p in parts[: len(parts) - 1]):
        _fail("locality", f"{value!r} is not REGION[/ZONE[/SUBZONE]]")
    parts += [""] * (3 - len(parts))
    return Locality(region=parts[0], zone=parts[1], sub_zone=parts[2])


def _channel_creds(ca: str | None, cert: str | None, key: str | None) -> dict[str, object]:
    if ca is None and cert is None and key is None:
        return {"type": "insecure"}
    if (cert is None) != (key is None):
        _fail("tls_cert", "tls_cert and tls_key must be given together")
    config = {
        k: v
        for k, v in (
            ("ca_certificate_file", ca),
            ("certificate_file", cert),
            ("private_key_file", key),
        )
        if v
    }
    return {"type": "tls", "config": config}


def _pod_ports(ports: Sequence[WorkloadPort | int]) -> str:
    items: list[dict[str, object]] = []
    for p in ports:
        wp = WorkloadPort(port=p) if isinstance(p, int) else p
        if not 0 < wp.port < 65536:
            _fail("ports", f"{wp.port} is not a port number")
        item: dict[str, object] = {"containerPort": wp.port, "protocol": wp.protocol}
        if wp.name:
            item["name"] = wp.name
        items.append(item)
    # Istio's agent writes POD_PORTS as a JSON string, not as a JSON array.
    return json.dumps(items, separators=(",", ":")) if items else ""
