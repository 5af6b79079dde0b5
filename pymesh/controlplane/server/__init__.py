"""The control plane's ADS server: streams, pushes, file watching, admin port."""

from __future__ import annotations

from pymesh.controlplane.server._backend import Backend, IstioBackend, LoadResult
from pymesh.controlplane.server._debounce import Debouncer
from pymesh.controlplane.server._hub import HEALTH_TYPE_URL, Hub
from pymesh.controlplane.server._stream import AdsStream, Request, Resource, Response

__all__ = [
    "HEALTH_TYPE_URL",
    "AdsStream",
    "Backend",
    "Debouncer",
    "Hub",
    "IstioBackend",
    "LoadResult",
    "Request",
    "Resource",
    "Response",
]
