"""httpx through the mesh: ``Client``, ``AsyncClient``, ``MeshTransport``,
``AsyncMeshTransport``.

```python
import pymesh.httpx

with pymesh.httpx.Client() as client:
    client.get("http://reviews:9080/reviews/0")
```

Requests to mesh services are routed, load-balanced, retried, timed out, circuit-broken,
outlier-ejected and fault-injected in process, as an Istio sidecar would; other hosts pass
through (``outbound_traffic_policy="ALLOW_ANY"``) or are refused (``"REGISTRY_ONLY"``).
See ``docs/httpx.md``.
"""

from pymesh.httpx._client import AsyncClient, Client
from pymesh.httpx._transport import (
    RESULT_EXTENSION,
    AsyncMeshTransport,
    MeshTransport,
    OutboundTrafficPolicy,
)

__all__ = [
    "RESULT_EXTENSION",
    "AsyncClient",
    "AsyncMeshTransport",
    "Client",
    "MeshTransport",
    "OutboundTrafficPolicy",
]
