"""The gRPC xDS bootstrap as frozen, proto-free models.

The bootstrap (gRFC A27) tells an xDS client which control plane to talk to (``xds_servers``,
in fallback order per gRFC A71), how to describe itself (``node``), where its workload
certificates are (``certificate_providers``, gRFC A29) and how to name the Listener resources
it subscribes to (gRFC A36 and the federation templates and ``authorities`` of gRFC A47).

Everything here is immutable: the xDS client, the adapters and the control plane share one
:class:`Bootstrap` without copying it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pymesh._version import __version__
from pymesh.bootstrap._json import JsonValue, canonical_json
from pymesh.bootstrap._templates import (
    apply_template,
    format_host_port,
    xdstp_authority,
)
from pymesh.errors import BootstrapError
from pymesh.model.common import Locality

__all__ = [
    "DEFAULT_CLIENT_LISTENER_TEMPLATE",
    "DEFAULT_TRUST_DOMAIN",
    "SERVER_FEATURE_DELTA",
    "SERVER_FEATURE_IGNORE_RESOURCE_DELETION",
    "SERVER_FEATURE_XDS_V3",
    "SUPPORTED_CHANNEL_CREDENTIALS",
    "Authority",
    "Bootstrap",
    "CertificateProviderInstance",
    "ChannelCredentials",
    "FileWatcherConfig",
    "Node",
    "WorkloadPort",
    "XdsServer",
]

SERVER_FEATURE_XDS_V3 = "xds_v3"
"""Server feature gRPC clients list for v3 servers (informational since v2 was removed)."""

SERVER_FEATURE_IGNORE_RESOURCE_DELETION = "ignore_resource_deletion"
"""gRFC A53: keep using LDS/CDS resources a SotW response no longer lists."""

SERVER_FEATURE_DELTA = "pymesh.delta"
"""pymesh's own feature: speak Delta (incremental) xDS to this server.

gRPC defines no standard feature for this; ``xds_v3_delta`` is accepted as a synonym.
grpcio ignores both (unknown server features are ignored).
"""

_DELTA_FEATURES = frozenset({SERVER_FEATURE_DELTA, "xds_v3_delta"})

SUPPORTED_CHANNEL_CREDENTIALS = ("insecure", "tls", "google_default")
"""Channel credential types pymesh can use, in no particular order (the bootstrap's order
decides: the first supported entry of ``channel_creds`` wins, as in gRPC)."""

DEFAULT_CLIENT_LISTENER_TEMPLATE = "%s"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_REFRESH_INTERVAL = 600.0
"""gRPC's default ``refresh_interval`` for file-watched certificates: 10 minutes."""

_EMPTY: Mapping[str, JsonValue] = MappingProxyType({})


def _empty() -> Mapping[str, JsonValue]:
    return _EMPTY


@dataclass(frozen=True, slots=True)
class FileWatcherConfig:
    """Certificate files to (re)load periodically.

    The config of the ``file_watcher`` certificate provider (gRFC A29) and of ``tls`` channel
    credentials (gRFC A65), which share the same keys. ``None`` means the file is not given:
    no ``certificate_file``/``private_key_file`` = no client certificate; no
    ``ca_certificate_file`` = the system's trust roots (``tls`` creds only).
    """

    certificate_file: str | None = None
    private_key_file: str | None = None
    ca_certificate_file: str | None = None
    refresh_interval: float = DEFAULT_REFRESH_INTERVAL

    @property
    def has_identity(self) -> bool:
        """True if a certificate and its key are configured."""
        return self.certificate_file is not None


@dataclass(frozen=True, slots=True)
class ChannelCredentials:
    """How to secure the channel to an xDS server (the chosen ``channel_creds`` entry).

    ``type`` is one of :data:`SUPPORTED_CHANNEL_CREDENTIALS`; ``config`` is the entry's raw
    (frozen) config. ``tls`` is the decoded TLS config for ``tls`` (from ``config``) and
    ``google_default`` (system roots, no client certificate); ``None`` for ``insecure``.
    """

    type: str
    config: Mapping[str, JsonValue] = field(default_factory=_empty)
    tls: FileWatcherConfig | None = None

    def __hash__(self) -> int:
        return hash((self.type, canonical_json(self.config)))

    @property
    def is_secure(self) -> bool:
        """True unless the channel is plaintext."""
        return self.type != "insecure"


@dataclass(frozen=True, slots=True)
class XdsServer:
    """One xDS management server. Hashable: equal servers share one ADS stream (gRFC A47)."""

    uri: str
    channel_credentials: ChannelCredentials
    server_features: frozenset[str] = frozenset()

    @property
    def ignore_resource_deletion(self) -> bool:
        """gRFC A53: do not drop LDS/CDS resources missing from a SotW response."""
        return SERVER_FEATURE_IGNORE_RESOURCE_DELETION in self.server_features

    @property
    def supports_delta(self) -> bool:
        """The bootstrap asks for Delta xDS with this server (:data:`SERVER_FEATURE_DELTA`)."""
        return not _DELTA_FEATURES.isdisjoint(self.server_features)

    def has_feature(self, feature: str) -> bool:
        """True if ``feature`` is listed in ``server_features``."""
        return feature in self.server_features


@dataclass(frozen=True, slots=True)
class WorkloadPort:
    """A port the workload serves on (from Istio's ``POD_PORTS`` node metadata)."""

    port: int
    name: str = ""
    protocol: str = "TCP"


def _meta_str(metadata: Mapping[str, JsonValue], key: str) -> str:
    value = metadata.get(key)
    return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class Node:
    """The client's identity as sent to the control plane (Envoy ``core.v3.Node``).

    ``metadata`` is the bootstrap's ``node.metadata`` object, deep-frozen. The properties read
    Istio's metadata conventions (what Istio's agent and ``pymesh bootstrap`` write); they
    never raise: a missing or ill-typed key gives the documented fallback.
    """

    id: str = ""
    cluster: str = ""
    locality: Locality = field(default_factory=Locality)
    metadata: Mapping[str, JsonValue] = field(default_factory=_empty)
    user_agent_name: str = "pymesh"
    user_agent_version: str = __version__
    client_features: tuple[str, ...] = ()

    def __hash__(self) -> int:
        return hash(
            (
                self.id,
                self.cluster,
                self.locality,
                canonical_json(self.metadata),
                self.user_agent_name,
                self.user_agent_version,
                self.client_features,
            )
        )

    def _id_parts(self) -> list[str]:
        # Istio: TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN
        parts = self.id.split("~")
        return parts if len(parts) == 4 else []

    @property
    def proxy_type(self) -> str:
        """First part of an Istio node id (``sidecar``, ``router``), else ``""``."""
        parts = self._id_parts()
        return parts[0] if parts else ""

    @property
    def namespace(self) -> str:
        """``NAMESPACE`` metadata, else parsed from an Istio node id, else ``""``."""
        ns = _meta_str(self.metadata, "NAMESPACE")
        if ns:
            return ns
        parts = self._id_parts()
        if not parts:
            return ""
        domain = parts[3]
        if domain and "." in domain:
            return domain.split(".", 1)[0]
        pod = parts[2]
        return pod.rsplit(".", 1)[1] if "." in pod else ""

    @property
    def pod_name(self) -> str:
        """``NAME`` metadata, else the pod part of an Istio node id, else ``""``."""
        name = _meta_str(self.metadata, "NAME")
        if name:
            return name
        parts = self._id_parts()
        if not parts:
            return ""
        return parts[2].split(".", 1)[0]

    @property
    def labels(self) -> Mapping[str, str]:
        """``LABELS`` metadata (string values only), else empty."""
        raw = self.metadata.get("LABELS")
        if not isinstance(raw, Mapping):
            return _EMPTY_STR
        return MappingProxyType({k: v for k, v in raw.items() if isinstance(v, str)})

    @property
    def service_account(self) -> str:
        """``SERVICE_ACCOUNT`` metadata, else ``""``."""
        return _meta_str(self.metadata, "SERVICE_ACCOUNT")

    @property
    def instance_ips(self) -> tuple[str, ...]:
        """``INSTANCE_IPS`` metadata (comma separated), else the IP of an Istio node id."""
        raw = _meta_str(self.metadata, "INSTANCE_IPS")
        ips = tuple(ip.strip() for ip in raw.split(",") if ip.strip())
        if ips:
            return ips
        parts = self._id_parts()
        return (parts[1],) if parts and parts[1] else ()

    @property
    def generator(self) -> str:
        """``GENERATOR`` metadata (``grpc`` for proxyless gRPC clients), else ``""``."""
        return _meta_str(self.metadata, "GENERATOR")

    @property
    def workload_name(self) -> str:
        """``WORKLOAD_NAME`` metadata, else ``""``."""
        return _meta_str(self.metadata, "WORKLOAD_NAME")

    @property
    def cluster_id(self) -> str:
        """``CLUSTER_ID`` metadata (Istio's default is ``Kubernetes``), else ``""``."""
        return _meta_str(self.metadata, "CLUSTER_ID")

    @property
    def mesh_id(self) -> str:
        """``MESH_ID`` metadata, else the trust domain (Istio's default)."""
        return _meta_str(self.metadata, "MESH_ID") or self.trust_domain

    @property
    def trust_domain(self) -> str:
        """``TRUST_DOMAIN`` metadata (written by ``pymesh bootstrap``), else ``cluster.local``."""
        return _meta_str(self.metadata, "TRUST_DOMAIN") or DEFAULT_TRUST_DOMAIN

    @property
    def auto_register_group(self) -> str:
        """``AUTO_REGISTER_GROUP`` metadata (the WorkloadGroup to join), else ``""``."""
        return _meta_str(self.metadata, "AUTO_REGISTER_GROUP")

    @property
    def network(self) -> str:
        """``NETWORK`` metadata (Istio multi-network), else ``""``."""
        return _meta_str(self.metadata, "NETWORK")

    @property
    def istio_version(self) -> str:
        """``ISTIO_VERSION`` metadata, else ``""``."""
        return _meta_str(self.metadata, "ISTIO_VERSION")

    @property
    def spiffe_id(self) -> str:
        """``spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT``; ``""`` if ns/sa unknown."""
        ns, sa = self.namespace, self.service_account
        if not ns or not sa:
            return ""
        return f"spiffe://{self.trust_domain}/ns/{ns}/sa/{sa}"

    @property
    def ports(self) -> tuple[WorkloadPort, ...]:
        """Ports from ``POD_PORTS`` metadata (a JSON string of container ports, as Istio).

        Entries without a valid ``containerPort`` are skipped; bad JSON gives ``()``.
        """
        raw = self.metadata.get("POD_PORTS")
        items: object
        if isinstance(raw, str):
            try:
                items = json.loads(raw)
            except ValueError:
                return ()
        else:
            items = raw
        if not isinstance(items, list | tuple):
            return ()
        out: list[WorkloadPort] = []
        for item in items:
            if not isinstance(item, Mapping):
                continue
            port = item.get("containerPort")
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                continue
            name = item.get("name")
            proto = item.get("protocol")
            out.append(
                WorkloadPort(
                    port=port,
                    name=name if isinstance(name, str) else "",
                    protocol=proto if isinstance(proto, str) and proto else "TCP",
                )
            )
        return tuple(out)


_EMPTY_STR: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class CertificateProviderInstance:
    """A ``certificate_providers`` entry (gRFC A29).

    ``file_watcher`` is the decoded config when ``plugin_name == "file_watcher"`` (the only
    plugin pymesh implements, and the one Istio's agent writes); other plugins are kept with
    their raw ``config`` and reported by :attr:`supported`.
    """

    plugin_name: str
    config: Mapping[str, JsonValue] = field(default_factory=_empty)
    file_watcher: FileWatcherConfig | None = None

    def __hash__(self) -> int:
        return hash((self.plugin_name, canonical_json(self.config)))

    @property
    def supported(self) -> bool:
        """True if pymesh can run this provider."""
        return self.file_watcher is not None


@dataclass(frozen=True, slots=True)
class Authority:
    """An ``authorities`` entry (gRFC A47).

    ``xds_servers`` is empty when the entry lists none: the top-level servers are used then
    (see :meth:`Bootstrap.servers_for_authority`).
    """

    name: str
    client_listener_resource_name_template: str
    xds_servers: tuple[XdsServer, ...] = ()


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """A parsed, validated gRPC xDS bootstrap."""

    xds_servers: tuple[XdsServer, ...]
    node: Node = field(default_factory=Node)
    certificate_providers: Mapping[str, CertificateProviderInstance] = field(
        default_factory=lambda: MappingProxyType({})
    )
    server_listener_resource_name_template: str | None = None
    client_default_listener_resource_name_template: str = DEFAULT_CLIENT_LISTENER_TEMPLATE
    authorities: Mapping[str, Authority] = field(default_factory=lambda: MappingProxyType({}))
    source: str = ""

    def __hash__(self) -> int:
        return hash(
            (
                self.xds_servers,
                self.node,
                tuple(sorted(self.certificate_providers.items())),
                self.server_listener_resource_name_template,
                self.client_default_listener_resource_name_template,
                tuple(sorted(self.authorities.items())),
                self.source,
            )
        )

    def listener_resource_name(self, target_authority: str | None, host_port: str) -> str:
        """The Listener name a client channel for ``xds://AUTHORITY/HOST_PORT`` subscribes to.

        gRFC A47: with an authority (non-empty), that entry's
        ``client_listener_resource_name_template`` is used (an unknown authority is an error);
        without one, ``client_default_listener_resource_name_template``. ``%s`` becomes
        ``host_port``, percent-encoded for ``xdstp:`` templates.
        """
        if target_authority:
            authority = self.authorities.get(target_authority)
            if authority is None:
                raise BootstrapError(
                    f"xds target authority {target_authority!r} is not in the bootstrap's "
                    f"authorities (known: {sorted(self.authorities) or 'none'})",
                    source=self.source,
                    field="authorities",
                )
            template = authority.client_listener_resource_name_template
        else:
            template = self.client_default_listener_resource_name_template
        return apply_template(template, host_port)

    def server_listener_name(self, ip: str, port: int) -> str:
        """The Listener name an xDS-enabled server on ``ip:port`` subscribes to (gRFC A36).

        ``%s`` becomes ``IP:PORT`` (IPv6 in brackets, e.g. ``[::]:8080``). Without a
        ``server_listener_resource_name_template`` xDS servers cannot start: error.
        """
        template = self.server_listener_resource_name_template
        if template is None:
            raise BootstrapError(
                "no server_listener_resource_name_template: xDS-enabled servers need one",
                source=self.source,
                field="server_listener_resource_name_template",
            )
        return apply_template(template, format_host_port(ip, port))

    def servers_for_authority(self, authority: str | None) -> tuple[XdsServer, ...]:
        """The xDS servers (fallback order) for resources of ``authority``.

        ``None`` (an old-style name) gives the top-level servers; a known authority gives its
        own servers, or the top-level ones if it lists none; an unknown one is an error.
        """
        if authority is None:
            return self.xds_servers
        entry = self.authorities.get(authority)
        if entry is None:
            raise BootstrapError(
                f"authority {authority!r} is not in the bootstrap's authorities",
                source=self.source,
                field="authorities",
            )
        return entry.xds_servers or self.xds_servers

    def servers_for_resource(self, resource_name: str) -> tuple[XdsServer, ...]:
        """The xDS servers to fetch ``resource_name`` from (``xdstp:`` names by authority)."""
        return self.servers_for_authority(xdstp_authority(resource_name))

    @property
    def all_servers(self) -> tuple[XdsServer, ...]:
        """Every distinct xDS server in the bootstrap (top level first), deduplicated."""
        seen: dict[XdsServer, None] = dict.fromkeys(self.xds_servers)
        for authority in self.authorities.values():
            seen.update(dict.fromkeys(authority.xds_servers))
        return tuple(seen)

    @property
    def default_certificate_provider(self) -> CertificateProviderInstance | None:
        """The ``default`` certificate provider (Istio's agent writes this name), if any."""
        return self.certificate_providers.get("default")
