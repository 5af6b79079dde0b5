"""Which URL hosts are mesh services, and which xDS target each one is.

A URL ``http://reviews:9080/`` names the target ``reviews.NS.svc.cluster.local:9080`` the way
Kubernetes DNS search would resolve it from the workload's namespace ``NS`` (the bootstrap
node's). A port-less URL uses 80 (``http``) or 443 (``https``).

**Is a host in the mesh?** The only authority is the control plane: we watch the listener
``HOST:PORT`` (what Istio serves for every service port, and what proxyless gRPC asks for).
The control plane answers with the listener (a mesh service) or leaves it out. The xDS client
declares a listener it never received "does not exist" only after its does-not-exist timer
(15 s, gRFC A27: a server may simply not have it yet), far too long to hold a request. So the
first request to a host waits a *bounded* time for the listener, once:

- ``mesh_wait`` (5 s) for one-label names and names under the cluster domain
  (``*.svc.cluster.local``): they are meant to be mesh services, and failing over to plain
  DNS would fail anyway;
- ``external_wait`` (0.5 s) for any other host (external names, two-label names, IP
  literals): a warm control plane answers a known host in milliseconds.

If no listener arrived by then, that request goes out as a non-mesh request (pass-through or
refused). The watch stays open (a bounded LRU of ``max_hosts``), so later requests read the
live verdict without blocking: the listener arriving later, or the control plane's definitive
does-not-exist, or a service appearing or disappearing, is picked up by the next request.

=====================================  =======================================================
handle state                           verdict
=====================================  =======================================================
``TargetSnapshot``                     in the mesh: route it
``TargetError`` LDS does-not-exist     not in the mesh (pass through, or refuse under
                                       ``REGISTRY_ONLY``)
other ``TargetError`` (RDS missing,    in the mesh but unusable: 503 ``no healthy upstream``
no virtual host, invalid listener)     (what a sidecar with that broken config answers)
nothing yet after ``mesh_wait``        unknown: as not in the mesh, for this request only
=====================================  =======================================================
"""

from __future__ import annotations

import enum
import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from pymesh.errors import XdsError
from pymesh.model.snapshot import ErrorKind, TargetError, TargetSnapshot
from pymesh.xds.watch import TargetHandle

__all__ = [
    "MeshTarget",
    "TargetResolver",
    "Verdict",
    "candidate_hosts",
    "expand_host",
    "verdict_of",
]


class Verdict(enum.Enum):
    MESH = "mesh"
    BROKEN = "broken"
    NOT_MESH = "not_mesh"
    UNKNOWN = "unknown"


def expand_host(host: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """The first name Kubernetes DNS search tries for ``host`` from ``namespace``.

    ``reviews`` -> ``reviews.NS.svc.DOMAIN``; ``reviews.other`` -> ``reviews.other.svc.DOMAIN``
    (service.namespace); ``reviews.other.svc`` -> ``reviews.other.svc.DOMAIN``. Anything else
    (more labels, IP literals, ``localhost``) is used as is.
    """
    return candidate_hosts(host, namespace, cluster_domain)[0]


def candidate_hosts(
    host: str, namespace: str, cluster_domain: str = "cluster.local"
) -> tuple[str, ...]:
    """The names ``host`` may mean, in the order DNS search tries them.

    A two-label name is ambiguous: ``reviews.other`` is service ``reviews`` in namespace
    ``other``, but ``httpbin.org`` is an external host (a ServiceEntry host in Istio's
    examples). Both are candidates; the first the control plane has a listener for wins.
    """
    host = host.lower().rstrip(".")
    if not host or host == "localhost" or _is_ip(host):
        return (host,)
    labels = host.split(".")
    if len(labels) == 1:
        return (f"{host}.{namespace}.svc.{cluster_domain}",) if namespace else (host,)
    if len(labels) == 2:
        return (f"{host}.svc.{cluster_domain}", host)
    if len(labels) == 3 and labels[2] == "svc":
        return (f"{host}.{cluster_domain}",)
    return (host,)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def verdict_of(state: TargetSnapshot | TargetError | None) -> Verdict:
    if state is None:
        return Verdict.UNKNOWN
    if isinstance(state, TargetSnapshot):
        return Verdict.MESH
    if state.kind is ErrorKind.DOES_NOT_EXIST and state.resource.startswith("LDS"):
        return Verdict.NOT_MESH
    if state.ambient:
        return Verdict.UNKNOWN
    return Verdict.BROKEN


class MeshTarget:
    """One URL ``host:port``: its candidate targets (usually one) with their handles, and
    until when (monotonic) its first requests may wait for the control plane's answer."""

    __slots__ = ("handles", "name", "wait_until")

    def __init__(self, handles: tuple[tuple[str, TargetHandle], ...], wait_until: float) -> None:
        self.handles = handles
        self.name = handles[0][0]
        self.wait_until = wait_until

    def current(self) -> tuple[str, TargetSnapshot] | None:
        """The first candidate with a usable snapshot, and its target name."""
        for name, handle in self.handles:
            snapshot = handle.current()
            if snapshot is not None:
                return name, snapshot
        return None

    def verdict(self) -> Verdict:
        verdicts = [verdict_of(h.state()) for _, h in self.handles]
        if Verdict.MESH in verdicts:
            return Verdict.MESH
        if Verdict.UNKNOWN in verdicts:
            return Verdict.UNKNOWN
        if Verdict.BROKEN in verdicts:
            return Verdict.BROKEN
        return Verdict.NOT_MESH

    def error(self) -> TargetError | None:
        """The error of a broken candidate (for the 503 it answers)."""
        for _, handle in self.handles:
            state = handle.state()
            if isinstance(state, TargetError) and verdict_of(state) is Verdict.BROKEN:
                return state
        return None

    def wait_sync(self) -> Verdict:
        """The verdict, blocking until ``wait_until`` at most while it is unknown."""
        verdict = self.verdict()
        if verdict is Verdict.UNKNOWN and len(self.handles) == 1:
            remaining = self.wait_until - time.monotonic()
            if remaining > 0:
                try:
                    self.handles[0][1].wait_ready(remaining)
                except XdsError:
                    pass
                verdict = self.verdict()
        while verdict is Verdict.UNKNOWN and time.monotonic() < self.wait_until:
            time.sleep(0.005)  # several candidates: poll (first requests of a host only)
            verdict = self.verdict()
        return verdict


class TargetResolver:
    """Maps ``(host, port)`` of a URL to its target and handle, with the mesh verdict.

    ``watch(target)`` returns the shared handle (the :class:`~pymesh.core.runtime.MeshRuntime`
    keeps one per target); ``unwatch(target)`` releases it when the LRU evicts the host.
    """

    def __init__(
        self,
        watch: Callable[[str], TargetHandle],
        unwatch: Callable[[str], None],
        *,
        namespace: str,
        cluster_domain: str = "cluster.local",
        mesh_wait: float = 5.0,
        external_wait: float = 0.5,
        max_hosts: int = 512,
    ) -> None:
        self._watch = watch
        self._unwatch = unwatch
        self.namespace = namespace
        self.cluster_domain = cluster_domain
        self.mesh_wait = mesh_wait
        self.external_wait = external_wait
        self._mesh_suffix = f".svc.{cluster_domain}:"
        self._max = max_hosts
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int], MeshTarget] = OrderedDict()

    def target_names(self, host: str, port: int) -> tuple[str, ...]:
        out = []
        for fqdn in candidate_hosts(host, self.namespace, self.cluster_domain):
            if ":" in fqdn:  # IPv6 literal
                fqdn = f"[{fqdn.strip('[]')}]"
            out.append(f"{fqdn}:{port}")
        return tuple(out)

    def lookup(self, host: str, port: int) -> MeshTarget:
        """The target of ``host:port`` (starting its watches on first use; never blocks)."""
        key = (host, port)
        found = self._cache.get(key)
        if found is not None:
            return found
        names = self.target_names(host, port)
        evicted: list[MeshTarget] = []
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                return found
            # Names meant for the cluster may wait longer for a slow control plane.
            expected = len(names) == 1 and self._mesh_suffix in names[0]
            wait = self.mesh_wait if expected else self.external_wait
            found = MeshTarget(tuple((n, self._watch(n)) for n in names), time.monotonic() + wait)
            self._cache[key] = found
            while len(self._cache) > self._max:
                evicted.append(self._cache.popitem(last=False)[1])
        for old in evicted:
            for n, _ in old.handles:
                self._unwatch(n)
        return found

    def close(self) -> None:
        """Release every watch this resolver holds."""
        with self._lock:
            targets = [n for t in self._cache.values() for n, _ in t.handles]
            self._cache.clear()
        for n in targets:
            self._unwatch(n)
