"""pymesh: Istio's data plane as a Python library (proxyless xDS for httpx and grpcio)."""

from pymesh._version import __version__

__all__ = ["__version__"]
