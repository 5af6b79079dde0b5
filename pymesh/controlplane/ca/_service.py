"""``istio.v1.auth.IstioCertificateService`` on a grpc (sync or aio) server."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from pymesh.controlplane.ca._authority import CaRefused, CertificateAuthority
from pymesh.security._ca_proto import SERVICE, CertificateRequest, decode_request, encode_response

__all__ = ["add_ca_service", "ca_handler", "default_ca_dir", "lazy_authority"]

AuthoritySource = CertificateAuthority | Callable[[], CertificateAuthority]


def default_ca_dir() -> Path:
    """``$PYMESH_CA_DIR``, else ``$XDG_STATE_HOME/pymesh/ca`` (``~/.local/state/pymesh/ca``)."""
    env = os.environ.get("PYMESH_CA_DIR")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "pymesh" / "ca"


def lazy_authority(**kwargs: Any) -> Callable[[], CertificateAuthority]:
    """A factory creating (or loading) the CA at its first use, once.

    The control plane serves the CA API by default without touching the disk until a
    workload first asks for a certificate.
    """
    lock = threading.Lock()
    made: list[CertificateAuthority] = []

    def get() -> CertificateAuthority:
        with lock:
            if not made:
                kwargs.setdefault("state_dir", default_ca_dir())
                made.append(CertificateAuthority(**kwargs))
            return made[0]

    return get


def _metadata(context: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def ca_handler(authority: AuthoritySource, *, aio: bool) -> grpc.GenericRpcHandler[Any, Any]:
    """A generic handler serving ``CreateCertificate`` from ``authority``."""

    def create(request: CertificateRequest, context: Any) -> tuple[str, ...]:
        ca = authority if isinstance(authority, CertificateAuthority) else authority()
        return ca.create_certificate(request.csr, request.validity, _metadata(context))

    if aio:

        async def create_aio(request: CertificateRequest, context: Any) -> tuple[str, ...]:
            try:
                return create(request, context)
            except CaRefused as exc:
                await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
                raise  # unreachable: abort raises

        behaviour: Any = create_aio
    else:

        def create_sync(request: CertificateRequest, context: Any) -> tuple[str, ...]:
            try:
                return create(request, context)
            except CaRefused as exc:
                context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
                raise

        behaviour = create_sync
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=decode_request,
                response_serializer=encode_response,
            )
        },
    )


def add_ca_service(server: Any, authority: AuthoritySource, *, aio: bool = False) -> None:
    """Register the CA service on a ``grpc.server`` (or ``grpc.aio.server`` with aio=True)."""
    server.add_generic_rpc_handlers((ca_handler(authority, aio=aio),))
