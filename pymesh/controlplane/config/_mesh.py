"""The validated mesh configuration: every service, route and policy, indexed for lookups.

A :class:`MeshConfig` is immutable. :meth:`MeshConfig.with_workloads` derives a new one with
extra (auto-registered) workloads; it shares every parsed object and only drops the endpoint
index, which is rebuilt lazily.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pymesh.controlplane.config._issues import ConfigIssue
from pymesh.controlplane.config._types import (
    ROOT_NAMESPACE,
    AuthorizationPolicySpec,
    DestinationRuleSpec,
    MeshSettings,
    PeerAuthenticationSpec,
    Resolution,
    ServicePort,
    ServiceSpec,
    VirtualServiceSpec,
    WorkloadEntrySpec,
    WorkloadGroupSpec,
)
from pymesh.model.common import Locality

__all__ = ["Endpoint", "MeshConfig", "exported_to", "labels_match"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of one service port, resolved from inline endpoints or workloads."""

    address: str
    port: int
    labels: Mapping[str, str]
    locality: Locality
    weight: int
    network: str
    service_account: str
    namespace: str
    health: str = "HEALTHY"


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def exported_to(export_to: Sequence[str], owner_namespace: str, namespace: str) -> bool:
    """Istio ``exportTo``: ``*`` everyone, ``.`` the owner's namespace, else named ones."""
    for e in export_to:
        if e == "*" or (e == "." and namespace == owner_namespace) or e == namespace:
            return True
    return False


_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ServiceSpec) if f.name != "endpoints")


def _service_shape(s: ServiceSpec) -> tuple[object, ...]:
    return tuple(getattr(s, name) for name in _SHAPE_FIELDS)


class MeshConfig:
    """An immutable, validated mesh configuration (build it with ``load_config``)."""

    __slots__ = (
        "__weakref__",
        "_accounts_cache",
        "_changes_cache",
        "_dr_by_host",
        "_endpoint_cache",
        "_export_index",
        "_services_by_host",
        "_visible_cache",
        "_vs_by_host",
        "_vs_wildcard",
        "authorization_policies",
        "destination_rules",
        "files",
        "issues",
        "mesh_settings",
        "peer_authentications",
        "services",
        "version",
        "virtual_services",
        "workload_entries",
        "workload_groups",
    )

    def __init__(
        self,
        *,
        services: Iterable[ServiceSpec] = (),
        virtual_services: Iterable[VirtualServiceSpec] = (),
        destination_rules: Iterable[DestinationRuleSpec] = (),
        workload_entries: Iterable[WorkloadEntrySpec] = (),
        workload_groups: Iterable[WorkloadGroupSpec] = (),
        peer_authentications: Iterable[PeerAuthenticationSpec] = (),
        authorization_policies: Iterable[AuthorizationPolicySpec] = (),
        issues: Iterable[ConfigIssue] = (),
        files: Iterable[str] = (),
        version: str = "",
        mesh_settings: MeshSettings | None = None,
    ) -> None:
        self.services: tuple[ServiceSpec, ...] = tuple(services)
        self.virtual_services: tuple[VirtualServiceSpec, ...] = tuple(virtual_services)
        self.destination_rules: tuple[DestinationRuleSpec, ...] = tuple(destination_rules)
        self.workload_entries: tuple[WorkloadEntrySpec, ...] = tuple(workload_entries)
        self.workload_groups: tuple[WorkloadGroupSpec, ...] = tuple(workload_groups)
        self.peer_authentications: tuple[PeerAuthenticationSpec, ...] = tuple(peer_authentications)
        self.authorization_policies: tuple[AuthorizationPolicySpec, ...] = tuple(
            authorization_policies
        )
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        self.files: tuple[str, ...] = tuple(files)
        self.version = version
        self.mesh_settings = mesh_settings or MeshSettings()
        by_host: dict[str, ServiceSpec] = {}
        for s in self.services:
            by_host.setdefault(s.hostname, s)
        self._services_by_host: Mapping[str, ServiceSpec] = types.MappingProxyType(by_host)
        # Visibility index: positions (in ``services``) of the services exported to every
        # namespace (``None`` key) and of those exported to one named namespace, so
        # ``visible_services`` costs O(visible), computed once per namespace per config.
        index: dict[str | None, list[int]] = {}
        for i, s in enumerate(self.services):
            targets: set[str | None] = set()
            for e in s.export_to:
                if e == "*":
                    targets = {None}
                    break
                targets.add(s.namespace if e == "." else e)
            for t in targets:
                index.setdefault(t, []).append(i)
        self._export_index: Mapping[str | None, list[int]] = types.MappingProxyType(index)
        self._visible_cache: dict[
            str, tuple[tuple[ServiceSpec, ...], Mapping[str, ServiceSpec]]
        ] = {}
        drs: dict[str, list[DestinationRuleSpec]] = {}
        for dr in self.destination_rules:
            if dr.workload_selector is not None:
                continue
            same = drs.setdefault(dr.host, [])
            for i, prev in enumerate(same):
                if prev.namespace == dr.namespace:
                    # Istio merges rules for one host: the first one's traffic policy,
                    # every rule's subsets (the first definition of a name wins).
                    names = {x.name for x in prev.subsets}
                    extra = tuple(x for x in dr.subsets if x.name not in names)
                    same[i] = dataclasses.replace(prev, subsets=prev.subsets + extra)
                    break
            else:
                same.append(dr)
        self._dr_by_host: Mapping[str, list[DestinationRuleSpec]] = types.MappingProxyType(drs)
        vss: dict[str, list[VirtualServiceSpec]] = {}
        wild: list[VirtualServiceSpec] = []
        for vs in self.virtual_services:
            if "mesh" not in vs.gateways:
                continue
            for h in vs.hosts:
                if "*" in h:
                    if vs not in wild:
                        wild.append(vs)
                else:
                    vss.setdefault(h, []).append(vs)
        self._vs_by_host: Mapping[str, list[VirtualServiceSpec]] = types.MappingProxyType(vss)
        self._vs_wildcard: tuple[VirtualServiceSpec, ...] = tuple(wild)
        self._accounts_cache: dict[str, tuple[ServiceSpec, tuple[str, ...]]] = {}
        # The last endpoint_changes answer, for the config it compared with (held weakly:
        # a config must not keep its predecessors alive).
        self._changes_cache: tuple[weakref.ref[MeshConfig], frozenset[str]] | None = None
        self._endpoint_cache: dict[tuple[str, int], tuple[Endpoint, ...]] = {}

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, "_endpoint_cache"):
            raise AttributeError("MeshConfig is immutable")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (
            f"MeshConfig(version={self.version!r}, services={len(self.services)}, "
            f"workloads={len(self.workload_entries)})"
        )

    # --- derivation ------------------------------------------------------------------------

    def with_workloads(self, entries: Sequence[WorkloadEntrySpec]) -> MeshConfig:
        """A config with ``entries`` (auto-registered workloads) added to the file-defined
        WorkloadEntries. An entry whose (namespace, name) equals an existing one replaces it."""
        keys = {(e.namespace, e.name) for e in entries}
        kept = [e for e in self.workload_entries if (e.namespace, e.name) not in keys]
        return MeshConfig(
            services=self.services,
            virtual_services=self.virtual_services,
            destination_rules=self.destination_rules,
            workload_entries=[*kept, *entries],
            workload_groups=self.workload_groups,
            peer_authentications=self.peer_authentications,
            authorization_policies=self.authorization_policies,
            issues=self.issues,
            files=self.files,
            version=self.version,
            mesh_settings=self.mesh_settings,
        )

    # --- comparison with another version --------------------------------------------------

    def same_shape(self, other: MeshConfig) -> bool:
        """Whether ``other`` equals this config in everything but endpoints: the same
        services (every field but their inline ``endpoints``), routes, rules and policies.
        Only ``endpoints``/``service_accounts`` answers can then differ between the two
        (WorkloadEntries and inline endpoints are not compared)."""
        if other is self:
            return True
        if (
            len(self.services) != len(other.services)
            or self.virtual_services != other.virtual_services
            or self.destination_rules != other.destination_rules
            or self.workload_groups != other.workload_groups
            or self.peer_authentications != other.peer_authentications
            or self.authorization_policies != other.authorization_policies
            or self.mesh_settings.path_normalization != other.mesh_settings.path_normalization
        ):
            return False
        return all(
            a is b or _service_shape(a) == _service_shape(b)
            for a, b in zip(self.services, other.services, strict=True)
        )

    def endpoint_changes(self, other: MeshConfig) -> frozenset[str] | None:
        """Hostnames of the services whose endpoints (hence service accounts) may differ
        from ``other``'s; ``None`` when the two are not :meth:`same_shape`.

        A service whose spec is the same object (or has equal inline endpoints) under equal
        WorkloadEntries resolves to the same endpoints: it is not compared further, and this
        config takes ``other``'s already resolved endpoints and accounts for it (caches of
        equal values). Otherwise the resolved endpoints are compared."""
        cached = self._changes_cache
        if cached is not None and cached[0]() is other:
            return cached[1]
        if not self.same_shape(other):
            return None
        same_workloads = self.workload_entries == other.workload_entries
        changed: set[str] = set()
        for a, b in zip(self.services, other.services, strict=True):
            if same_workloads and (a is b or a.endpoints == b.endpoints):
                for p in a.ports:
                    key = (a.hostname, p.number)
                    hit = other._endpoint_cache.get(key)
                    if hit is not None and key not in self._endpoint_cache:
                        self._endpoint_cache[key] = hit
                accounts = other._accounts_cache.get(a.hostname)
                if accounts is not None and accounts[0] is b:
                    self._accounts_cache.setdefault(a.hostname, (a, accounts[1]))
                continue
            if any(self.endpoints(a, p.number) != other.endpoints(b, p.number) for p in a.ports):
                changed.add(a.hostname)
        result = frozenset(changed)
        object.__setattr__(self, "_changes_cache", (weakref.ref(other), result))
        return result

    def same_cluster_inputs(self, other: MeshConfig) -> bool:
        """``same_shape`` plus what clusters read from endpoints: for every service, whether
        it has inline endpoints, its workloads' service accounts and, for DNS services, its
        endpoints."""
        changes = self.endpoint_changes(other)
        if changes is None:
            return False
        for a, b in zip(self.services, other.services, strict=True):
            if a.hostname not in changes:
                continue  # same endpoints, hence the same accounts
            if bool(a.endpoints) != bool(b.endpoints):
                return False
            if self.service_accounts(a) != other.service_accounts(b):
                return False
            if a.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN) and any(
                self.endpoints(a, p.number) != other.endpoints(b, p.number) for p in a.ports
            ):
                return False
        return True

    # --- lookups ---------------------------------------------------------------------------

    def service(self, hostname: str) -> ServiceSpec | None:
        return self._services_by_host.get(hostname.lower())

    def visible_services(self, namespace: str) -> tuple[ServiceSpec, ...]:
        """Services exported to ``namespace`` (every service when ``namespace`` is empty)."""
        if not namespace:
            return self.services
        return self._visible(namespace)[0]

    def visible_by_host(self, namespace: str) -> Mapping[str, ServiceSpec]:
        """``visible_services(namespace)`` by hostname (the last service of a hostname wins,
        as in a dict built from that sequence)."""
        if not namespace:
            return self._visible("")[1]
        return self._visible(namespace)[1]

    def _visible(self, namespace: str) -> tuple[tuple[ServiceSpec, ...], Mapping[str, ServiceSpec]]:
        hit = self._visible_cache.get(namespace)
        if hit is not None:
            return hit
        if not namespace:
            services = self.services
        else:
            public = self._export_index.get(None, [])
            named = self._export_index.get(namespace, [])
            positions = sorted({*public, *named}) if named else public
            services = tuple(self.services[i] for i in positions)
        by_host: dict[str, ServiceSpec] = {}
        for s in services:
            by_host[s.hostname] = s
        hit = (services, types.MappingProxyType(by_host))
        self._visible_cache[namespace] = hit
        return hit

    def destination_rule(self, hostname: str, namespace: str) -> DestinationRuleSpec | None:
        """The DestinationRule for ``hostname`` as seen from ``namespace``: Istio looks in the
        client's namespace, then the service's, then the root namespace."""
        svc = self.service(hostname)
        order = [namespace]
        if svc is not None:
            order.append(svc.namespace)
        order.append(ROOT_NAMESPACE)
        candidates = self._dr_by_host.get(hostname.lower(), [])
        for ns in order:
            for dr in candidates:
                if dr.namespace == ns and (
                    not namespace or exported_to(dr.export_to, dr.namespace, namespace)
                ):
                    return dr
        for dr in candidates:
            if not namespace or exported_to(dr.export_to, dr.namespace, namespace):
                return dr
        return None

    def virtual_service(self, hostname: str, namespace: str) -> VirtualServiceSpec | None:
        """The mesh VirtualService routing ``hostname`` for clients in ``namespace`` (exact
        host beats wildcard; the client's namespace beats others)."""
        best: tuple[int, VirtualServiceSpec] | None = None
        hostname = hostname.lower()
        for vs in [*self._vs_by_host.get(hostname, ()), *self._vs_wildcard]:
            if namespace and not exported_to(vs.export_to, vs.namespace, namespace):
                continue
            for h in vs.hosts:
                score = -1
                if h == hostname:
                    score = 2
                elif h == "*" or (h.startswith("*.") and hostname.endswith(h[1:])):
                    score = 0
                if score < 0:
                    continue
                score = score * 2 + (1 if vs.namespace == namespace else 0)
                if best is None or score > best[0]:
                    best = (score, vs)
        return None if best is None else best[1]

    def workload_group(self, namespace: str, name: str) -> WorkloadGroupSpec | None:
        for g in self.workload_groups:
            if g.namespace == namespace and g.name == name:
                return g
        return None

    def match_workload_group(
        self, namespace: str, labels: Mapping[str, str]
    ) -> WorkloadGroupSpec | None:
        """The first WorkloadGroup (or Deployment) in ``namespace`` whose template labels are
        all carried by ``labels`` (``app`` and ``version`` of a node, typically)."""
        for g in self.workload_groups:
            if g.namespace == namespace and g.labels and labels_match(g.labels, labels):
                return g
        return None

    def endpoints(self, service: ServiceSpec, port: int) -> tuple[Endpoint, ...]:
        """Every endpoint of ``service`` on service port ``port`` (unfiltered by subset)."""
        key = (service.hostname, port)
        cached = self._endpoint_cache.get(key)
        if cached is not None:
            return cached
        sp = service.port(port)
        out: list[Endpoint] = []
        if sp is not None:
            out = self._resolve(service, sp)
        result = tuple(out)
        self._endpoint_cache[key] = result
        return result

    def _resolve(self, service: ServiceSpec, sp: ServicePort) -> list[Endpoint]:
        out: list[Endpoint] = []
        default_port = sp.target_port or sp.number
        for e in service.endpoints:
            out.append(
                Endpoint(
                    address=e.address,
                    port=e.ports.get(sp.name, default_port),
                    labels=e.labels,
                    locality=e.locality,
                    weight=e.weight,
                    network=e.network,
                    service_account=e.service_account or "default",
                    namespace=service.namespace,
                )
            )
        if service.selector is not None and service.selector:
            for w in self.workload_entries:
                if w.namespace != service.namespace or not labels_match(service.selector, w.labels):
                    continue
                port = w.ports.get(sp.name)
                if port is None and sp.target_port_name:
                    port = w.ports.get(sp.target_port_name)
                out.append(
                    Endpoint(
                        address=w.address,
                        port=port or default_port,
                        labels=w.labels,
                        locality=w.locality,
                        weight=w.weight,
                        network=w.network,
                        service_account=w.service_account,
                        namespace=w.namespace,
                        health=w.health,
                    )
                )
        if (
            not out
            and service.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN)
            and service.selector is None
        ):
            out.append(
                Endpoint(
                    address=service.hostname,
                    port=sp.number,
                    labels=types.MappingProxyType({}),
                    locality=Locality(),
                    weight=1,
                    network="",
                    service_account="",
                    namespace=service.namespace,
                )
            )
        return out

    def service_accounts(self, service: ServiceSpec) -> tuple[str, ...]:
        """Service accounts of the workloads behind ``service`` (sorted, unique)."""
        cached = self._accounts_cache.get(service.hostname)
        if cached is not None and cached[0] is service:
            return cached[1]
        names: set[str] = set()
        for p in service.ports:
            for e in self.endpoints(service, p.number):
                if e.service_account:
                    names.add(f"{e.namespace}/{e.service_account}")
        accounts = tuple(sorted(names))
        self._accounts_cache[service.hostname] = (service, accounts)
        return accounts
