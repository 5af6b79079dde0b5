"""The I/O-free ADS protocol core: wire messages, the stream state machine, backoff.

See :mod:`pymesh.xds.ads._state` for the theory of operation and the state table.
"""

from __future__ import annotations

from pymesh.xds.ads._backoff import Backoff
from pymesh.xds.ads._messages import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    RawResource,
)
from pymesh.xds.ads._state import (
    DOES_NOT_EXIST_TIMEOUT,
    AdsState,
    AmbientError,
    Changed,
    DoesNotExist,
    Effect,
    ResourceStatus,
    Send,
)

__all__ = [
    "DOES_NOT_EXIST_TIMEOUT",
    "AdsState",
    "AmbientError",
    "Backoff",
    "Changed",
    "DeltaDiscoveryRequest",
    "DeltaDiscoveryResponse",
    "DiscoveryRequest",
    "DiscoveryResponse",
    "DoesNotExist",
    "Effect",
    "RawResource",
    "ResourceStatus",
    "Send",
]
