"""Mesh-managed gRPC: ``pymesh.grpc.insecure_channel("xds:///HOST:PORT")`` and friends.

Same signatures as grpcio's constructors; ``xds:`` targets are routed by the mesh (the same
policy core as the httpx adapter), any other target is handed to grpcio unchanged. The
asyncio twins live in :mod:`pymesh.grpc.aio`.
"""

from __future__ import annotations

from pymesh.grpc._channel import MeshChannel, insecure_channel, secure_channel
from pymesh.grpc._errors import MeshRpcError
from pymesh.grpc._server import (
    ServingStatus,
    XdsServer,
    mesh_channel_credentials,
    mesh_server_credentials,
    server,
)

__all__ = [
    "MeshChannel",
    "MeshRpcError",
    "ServingStatus",
    "XdsServer",
    "insecure_channel",
    "mesh_channel_credentials",
    "mesh_server_credentials",
    "secure_channel",
    "server",
]
