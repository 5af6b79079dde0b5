"""The pymesh error tree.

Every error pymesh raises is a :class:`PymeshError`. Errors about configuration say *where*
the bad input is (a file, an xDS resource) and *which field*, so the message alone is enough
to fix it. Adapters translate foreign errors (``grpc.RpcError``, ``httpx`` and ``ssl`` errors)
into this tree at the edge; nothing deeper catches them.
"""

from __future__ import annotations

__all__ = [
    "BootstrapError",
    "ConfigError",
    "FaultAbortError",
    "MeshError",
    "NoHealthyUpstreamError",
    "NoRouteError",
    "NotInMeshError",
    "PymeshError",
    "ResourceError",
    "UpstreamConnectError",
    "UpstreamOverflowError",
    "UpstreamTimeoutError",
    "XdsError",
]


class PymeshError(Exception):
    """Base class of every error raised by pymesh."""


class ConfigError(PymeshError):
    """Configuration that cannot be used.

    ``source`` names where it came from (a file path, ``GRPC_XDS_BOOTSTRAP_CONFIG``, an xDS
    resource such as ``Cluster outbound|9080||reviews.default.svc.cluster.local``) and
    ``field`` the dotted path of the offending field inside it.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.message = message
        self.source = source
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.source or ""
        if self.field:
            where = f"{where}: field {self.field}" if where else f"field {self.field}"
        return f"{where}: {self.message}" if where else self.message


class BootstrapError(ConfigError):
    """The gRPC xDS bootstrap is missing or invalid."""


class ResourceError(ConfigError):
    """An xDS resource failed validation; the client NACKs it and keeps the last good one.

    ``resource_name`` may be empty when the resource could not even be parsed far enough to
    learn its name.
    """

    def __init__(
        self,
        message: str,
        *,
        type_name: str,
        resource_name: str = "",
        field: str | None = None,
    ):
        self.type_name = type_name
        self.resource_name = resource_name
        source = f"{type_name} {resource_name!r}" if resource_name else type_name
        super().__init__(message, source=source, field=field)


class XdsError(PymeshError):
    """A problem talking to the control plane (transient: the last good config keeps serving)."""


# --------------------------------------------------------------------------- data plane


class MeshError(PymeshError):
    """A request the mesh refused or could not complete, raised instead of Envoy's local
    reply when an adapter is built with ``raise_on_mesh_error=True``.

    ``status`` and ``body`` are the local reply Envoy would have sent, ``flags`` its response
    flags (``UH``, ``UO``, ...), ``target`` the mesh target (``HOST:PORT``).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        flags: tuple[str, ...] = (),
        body: bytes = b"",
        target: str = "",
    ) -> None:
        self.status = status
        self.flags = flags
        self.body = body
        self.target = target
        super().__init__(f"{target}: {message}" if target else message)


class NoRouteError(MeshError):
    """No route matched the request, or the route's cluster does not exist (``NR``/``NC``)."""


class NoHealthyUpstreamError(MeshError):
    """The cluster has no usable endpoint (503 ``no healthy upstream``, ``UH``)."""


class UpstreamOverflowError(MeshError):
    """A circuit breaker refused the request (503 + ``x-envoy-overloaded``, ``UO``)."""


class UpstreamTimeoutError(MeshError):
    """The route or per-try timeout expired (504 ``upstream request timeout``, ``UT``)."""


class UpstreamConnectError(MeshError):
    """Connecting to, or talking to, the endpoint failed before a response (``UF``/``UC``)."""


class FaultAbortError(MeshError):
    """Fault injection aborted the request (``FI``)."""


class NotInMeshError(MeshError):
    """The host is not a mesh service and the outbound policy is ``REGISTRY_ONLY``."""
