"""ASGI apps on the mesh: ``MeshMiddleware``, ``serve``, ``MeshServer``, ``peer``.

```python
import pymesh

app = pymesh.asgi.MeshMiddleware(app)   # inbound policy (RBAC, faults) for any ASGI server
pymesh.serve(app, port=9080)            # uvicorn + the listener's mTLS (STRICT/PERMISSIVE/DISABLE)
```

``pymesh.asgi.peer(scope)`` is the caller's identity (SPIFFE ID, principal, namespace).
``serve``/``MeshServer`` need uvicorn (``pip install pymesh[asgi]``) and are imported on
first use. See ``docs/asgi.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pymesh.asgi._middleware import MeshMiddleware
from pymesh.asgi._peer import Peer, peer

if TYPE_CHECKING:
    from pymesh.asgi._serve import MeshServer, serve

__all__ = ["MeshMiddleware", "MeshServer", "Peer", "peer", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("MeshServer", "serve"):
        value = getattr(importlib.import_module("pymesh.asgi._serve"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pymesh.asgi' has no attribute {name!r}")
