"""Mesh-managed ``grpc.aio``: ``pymesh.grpc.aio.insecure_channel("xds:///HOST:PORT")``.

Same signatures as ``grpc.aio``'s constructors; ``xds:`` targets are routed by the mesh,
any other target is handed to grpc.aio unchanged.
"""

from __future__ import annotations

from pymesh.grpc.aio._channel import AioMeshChannel, insecure_channel, secure_channel
from pymesh.grpc.aio._server import AioXdsServer, server

__all__ = ["AioMeshChannel", "AioXdsServer", "insecure_channel", "secure_channel", "server"]
