"""LDS: outbound api_listeners ``HOST:PORT`` and inbound ``xds.istio.io/grpc/lds/inbound/IP:PORT``
listeners, as istiod's grpcgen builds them.

Outbound: an ``ApiListener`` holding an HCM with RDS over ADS for ``outbound|PORT||FQDN`` and
the fault + router filters. A requested name may use any domain form istiod accepts (``reviews``,
``reviews.default``, ``reviews.default.svc.cluster.local``, VIP), with or without a port; the
listener keeps the requested name.

Inbound: one filter chain per PeerAuthentication mode for the node's port: STRICT => mTLS chain
requiring a client certificate; PERMISSIVE => a TLS chain (``transport_protocol: tls``) and a
plaintext chain (``raw_buffer``); DISABLE => plaintext. The HCM holds RBAC filters from the
AuthorizationPolicies selecting the node (DENY first, then ALLOW), then the router; its inline
route config forwards everything (``NonForwardingAction``), as gRPC servers require.
"""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from pymesh.controlplane.config import MeshConfig, ProxyNode, ServiceSpec
from pymesh.controlplane.translate._clusters import TLS_SOCKET, common_tls_context
from pymesh.controlplane.translate._names import INBOUND_PREFIX, cluster_name, pack
from pymesh.controlplane.translate._rbac import mtls_mode, rbac_filters
from pymesh.controlplane.translate._routes import FAULT_FILTER

__all__ = ["build_inbound_listener", "build_outbound_listener", "resolve_listener_name"]


def _router() -> hcm_pb2.HttpFilter:
    f = hcm_pb2.HttpFilter(name="envoy.filters.http.router")
    f.typed_config.CopyFrom(pack(router_pb2.Router()))
    return f


def _fault_filter() -> hcm_pb2.HttpFilter:
    f = hcm_pb2.HttpFilter(name=FAULT_FILTER)
    f.typed_config.CopyFrom(pack(fault_pb2.HTTPFault()))
    return f


def resolve_listener_name(
    config: MeshConfig, node: ProxyNode, name: str
) -> tuple[ServiceSpec, list[int]] | None:
    """The service and ports an outbound listener name refers to (``None``: unknown)."""
    host, port = name, None
    if name.startswith("["):
        end = name.find("]")
        host = name[1:end]
        rest = name[end + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif name.count(":") == 1:
        h, _, p = name.partition(":")
        if p.isdigit():
            host, port = h, int(p)
    host = host.lower()
    candidates = [host]
    if "." not in host:
        candidates.append(f"{host}.{node.namespace}.svc.cluster.local")
    elif host.count(".") == 1:
        candidates.append(f"{host}.svc.cluster.local")
    elif host.endswith(".svc"):
        candidates.append(f"{host}.cluster.local")
    visible = config.visible_by_host(node.namespace)
    svc = None
    for c in candidates:
        svc = visible.get(c)
        if svc is not None:
            break
    if svc is None:
        for s in visible.values():
            if host in s.addresses:
                svc = s
                break
    if svc is None:
        return None
    ports = [p.number for p in svc.ports if port is None or p.number == port]
    return (svc, ports) if ports else None


def build_outbound_listener(svc: ServiceSpec, port: int, name: str) -> listener_pb2.Listener:
    ln = listener_pb2.Listener(name=name)
    sa = ln.address.socket_address
    sa.address = next((a for a in svc.addresses if "/" not in a), "0.0.0.0")
    sa.port_value = port
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"outbound_{svc.hostname}_{port}")
    hcm.http_filters.extend([_fault_filter(), _router()])
    hcm.rds.config_source.ads.SetInParent()
    hcm.rds.config_source.resource_api_version = config_source_pb2.V3
    hcm.rds.route_config_name = cluster_name(port, "", svc.hostname)
    ln.api_listener.api_listener.CopyFrom(pack(hcm))
    return ln


def _path_normalization(hcm: hcm_pb2.HttpConnectionManager, mode: str) -> None:
    """meshConfig ``pathNormalization`` on an inbound HCM, set as istiod sets a sidecar's."""
    hcm.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.KEEP_UNCHANGED
    hcm.normalize_path.value = mode != "NONE"
    hcm.merge_slashes = mode in ("MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")
    if mode == "DECODE_AND_MERGE_SLASHES":
        hcm.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.UNESCAPE_AND_FORWARD


def _inbound_chain(  # noqa: PLR0917
    config: MeshConfig,
    node: ProxyNode,
    port: int,
    suffix: str,
    tls: tls_pb2.DownstreamTlsContext | None,
    transport: str,
) -> listener_components_pb2.FilterChain:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"inbound_{port}")
    _path_normalization(hcm, config.mesh_settings.path_normalization)
    hcm.http_filters.extend(rbac_filters(config, node, port))
    hcm.http_filters.append(_router())
    rcfg = hcm.route_config
    rcfg.name = "inbound"
    vh = rcfg.virtual_hosts.add(name="inbound", domains=["*"])
    route = vh.routes.add()
    route.match.prefix = "/"
    route.non_forwarding_action.SetInParent()
    fc = listener_components_pb2.FilterChain(name=f"inbound-{suffix}")
    if transport:
        fc.filter_chain_match.transport_protocol = transport
    f = fc.filters.add(name=f"inbound-hcm{suffix}")
    f.typed_config.CopyFrom(pack(hcm))
    if tls is not None:
        fc.transport_socket.name = TLS_SOCKET
        fc.transport_socket.typed_config.CopyFrom(pack(tls))
    return fc


def build_inbound_listener(
    config: MeshConfig, node: ProxyNode, name: str
) -> listener_pb2.Listener | None:
    address = name[len(INBOUND_PREFIX) :]
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        return None
    host = host.strip("[]")
    port = int(port_text)
    ln = listener_pb2.Listener(name=name)
    ln.address.socket_address.address = host
    ln.address.socket_address.port_value = port
    mode = mtls_mode(config, node, port)
    tls = None
    if mode in ("STRICT", "PERMISSIVE"):
        tls = tls_pb2.DownstreamTlsContext()
        tls.common_tls_context.CopyFrom(common_tls_context([], envoy=not node.proxyless))
        tls.require_client_certificate.value = True
    if mode == "STRICT":
        ln.filter_chains.append(_inbound_chain(config, node, port, "mtls", tls, ""))
    elif mode == "PERMISSIVE":
        ln.filter_chains.append(_inbound_chain(config, node, port, "mtls", tls, "tls"))
        ln.filter_chains.append(_inbound_chain(config, node, port, "plaintext", None, "raw_buffer"))
    else:
        ln.filter_chains.append(_inbound_chain(config, node, port, "plaintext", None, ""))
    _ = rc
    return ln
