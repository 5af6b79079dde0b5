"""pymesh: Istio's data plane as a Python library (proxyless xDS for httpx and grpcio).

The adapters are subpackages, imported on first use so that an httpx service never loads
grpcio's adapter and the other way round::

    import pymesh

    with pymesh.httpx.Client() as client:
        client.get("http://reviews.default.svc.cluster.local:9080/reviews/0")

    channel = pymesh.grpc.insecure_channel("xds:///ratings.default.svc.cluster.local:9080")

    pymesh.serve(app, port=9080)  # an ASGI app with the mesh's inbound mTLS and RBAC
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pymesh._version import __version__

if TYPE_CHECKING:
    from pymesh import asgi as asgi
    from pymesh import errors, grpc, httpx
    from pymesh.asgi import serve as serve

__all__ = ["__version__", "asgi", "errors", "grpc", "httpx", "serve"]

_LAZY = frozenset({"errors", "grpc", "httpx", "asgi"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"pymesh.{name}")
        globals()[name] = module
        return module
    if name == "serve":
        from pymesh.asgi import serve as serve_

        globals()["serve"] = serve_
        return serve_
    raise AttributeError(f"module 'pymesh' has no attribute {name!r}")
