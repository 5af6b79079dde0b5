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

- ``mesh_wait`` (5 s) for names under the cluster domain (``*.svc.cluster.local``, and short
  names, which expand to it): they are meant to be mesh services, and failing over to plain
  DNS would fail anyway;
- ``external_wait`` (0.5 s) for any other host (external names, IP literals): a warm control
  plane answers a known ServiceEntry host in milliseconds.

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

__all__ = ["MeshTarget", "TargetResolver", "Verdict", "expand_host", "verdict_of"]


class Verdict(enum.Enum):
    MESH = "mesh"
    BROKEN = "broken"
    NOT_MESH = "not_mesh"
    UNKNOWN = "unknown"


def expand_host(host: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """The FQDN Kubernetes DNS search gives ``host`` from ``namespace``.

    ``reviews`` -> ``reviews.NS.svc.DOMAIN``; ``reviews.other`` -> ``reviews.other.svc.DOMAIN``
    (service.namespace); ``reviews.other.svc`` -> ``reviews.other.svc.DOMAIN``. Anything else
    (more labels, IP literals, ``localhost``) is used as is.
    """
    host = host.lower().rstrip(".")
    if not host or host == "localhost" or _is_ip(host):
        return host
    labels = host.split(".")
    if len(labels) == 1:
        return f"{host}.{namespace}.svc.{cluster_domain}" if namespace else host
    if len(labels) == 2:
        return f"{host}.svc.{cluster_domain}"
    if len(labels) == 3 and labels[2] == "svc":
        return f"{host}.{cluster_domain}"
    return host


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
    """One URL ``host:port``'s target: its name, handle, and until when (monotonic) its
    first requests may wait for the control plane's listener."""

    __slots__ = ("handle", "name", "wait_until")

    def __init__(self, name: str, handle: TargetHandle, wait_until: float) -> None:
        self.name = name
        self.handle = handle
        self.wait_until = wait_until

    def verdict(self) -> Verdict:
        return verdict_of(self.handle.state())

    def wait_sync(self) -> Verdict:
        """The verdict, blocking until ``wait_until`` at most while it is unknown."""
        verdict = verdict_of(self.handle.state())
        if verdict is Verdict.UNKNOWN:
            remaining = self.wait_until - time.monotonic()
            if remaining > 0:
                try:
                    self.handle.wait_ready(remaining)
                except XdsError:
                    pass
                verdict = verdict_of(self.handle.state())
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

    def target_name(self, host: str, port: int) -> str:
        fqdn = expand_host(host, self.namespace, self.cluster_domain)
        if ":" in fqdn:  # IPv6 literal
            fqdn = f"[{fqdn.strip('[]')}]"
        return f"{fqdn}:{port}"

    def lookup(self, host: str, port: int) -> MeshTarget:
        """The target of ``host:port`` (starting its watch on first use; never blocks)."""
        key = (host, port)
        found = self._cache.get(key)
        if found is not None:
            return found
        name = self.target_name(host, port)
        evicted: list[str] = []
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                return found
            wait = self.mesh_wait if self._mesh_suffix in name else self.external_wait
            found = MeshTarget(name, self._watch(name), time.monotonic() + wait)
            self._cache[key] = found
            while len(self._cache) > self._max:
                _, old = self._cache.popitem(last=False)
                evicted.append(old.name)
        for t in evicted:
            self._unwatch(t)
        return found

    def close(self) -> None:
        """Release every watch this resolver holds."""
        with self._lock:
            targets = [t.name for t in self._cache.values()]
            self._cache.clear()
        for t in targets:
            self._unwatch(t)
