"""The inbound filter chain of xDS-managed servers: moved to :mod:`pymesh.core.inbound`
(shared with the ASGI server side); the gRPC server keeps importing it from here."""

from __future__ import annotations

from pymesh.core.inbound import (
    INTERNAL,
    OK,
    PERMISSION_DENIED,
    SERVE,
    UNAUTHENTICATED,
    UNAVAILABLE,
    UNIMPLEMENTED,
    UNKNOWN,
    InboundDecision,
    InboundState,
    decide,
    grpc_status_for_http,
    select_filter_chain,
    tls_only_message,
)

__all__ = [
    "INTERNAL",
    "OK",
    "PERMISSION_DENIED",
    "SERVE",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
    "UNKNOWN",
    "InboundDecision",
    "InboundState",
    "decide",
    "grpc_status_for_http",
    "select_filter_chain",
    "tls_only_message",
]
