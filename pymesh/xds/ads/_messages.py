"""Proto-free forms of the ADS wire messages (the codec converts them to and from bytes)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "DeltaDiscoveryRequest",
    "DeltaDiscoveryResponse",
    "DiscoveryRequest",
    "DiscoveryResponse",
    "RawResource",
]

_EMPTY: Mapping[str, str] = types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RawResource:
    """One resource of a response, still serialized.

    ``type_url`` and ``data`` are those of the resource itself (an
    ``envoy.service.discovery.v3.Resource`` wrapper is unwrapped by the codec; its ``name``,
    ``version`` and ``ttl`` land here). ``data`` is ``None`` for a wrapper without a body.
    """

    type_url: str
    data: bytes | None
    name: str = ""
    version: str = ""
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class DiscoveryRequest:
    """A State-of-the-World request: the full set of names wanted for one type.

    An ACK carries the response's version and nonce; a NACK the previous version, the
    response's nonce and ``error_detail``. ``include_node`` is set on the first request of a
    stream (the node is sent once per stream, as gRPC does).
    """

    type_url: str
    resource_names: tuple[str, ...] = ()
    version_info: str = ""
    response_nonce: str = ""
    error_detail: str | None = None
    include_node: bool = False


@dataclass(frozen=True, slots=True)
class DeltaDiscoveryRequest:
    """An incremental request: names added and removed, or an ACK/NACK of a response."""

    type_url: str
    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    initial_resource_versions: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    response_nonce: str = ""
    error_detail: str | None = None
    include_node: bool = False


@dataclass(frozen=True, slots=True)
class DiscoveryResponse:
    """A State-of-the-World response."""

    type_url: str
    version_info: str
    nonce: str
    resources: tuple[RawResource, ...] = ()


@dataclass(frozen=True, slots=True)
class DeltaDiscoveryResponse:
    """An incremental response: resources added or changed, and names removed."""

    type_url: str
    system_version_info: str
    nonce: str
    resources: tuple[RawResource, ...] = ()
    removed_resources: tuple[str, ...] = ()
