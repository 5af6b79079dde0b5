"""A minimal client of ``IstioCertificateService/CreateCertificate`` (grpcio, sync)."""

from __future__ import annotations

import threading
from typing import Any

import grpc

from pymesh.errors import PymeshError
from pymesh.security._ca_proto import (
    CREATE_CERTIFICATE,
    CertificateRequest,
    decode_response,
    encode_request,
)

__all__ = ["CaClient", "CaError"]


class CaError(PymeshError):
    """The CA refused or could not be reached. ``code`` is the gRPC status name."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class CaClient:
    """One channel to a CA. ``channel_credentials`` (a ``grpc.ChannelCredentials``) secures
    it (istiod's 15012 is TLS); ``None`` uses a plaintext channel (loopback only)."""

    def __init__(
        self, address: str, *, channel_credentials: object | None = None, timeout: float = 10.0
    ) -> None:
        self.address = address
        self._creds = channel_credentials
        self._timeout = timeout
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def _call(self) -> Any:
        with self._lock:
            if self._channel is None:
                if self._creds is None:
                    self._channel = grpc.insecure_channel(self.address)
                else:
                    self._channel = grpc.secure_channel(self.address, self._creds)  # type: ignore[arg-type]
            return self._channel.unary_unary(
                CREATE_CERTIFICATE,
                request_serializer=encode_request,
                response_deserializer=decode_response,
            )

    def create_certificate(self, csr_pem: str, validity: int, token: str | None) -> tuple[str, ...]:
        """Send the CSR; return the PEM chain. Raises :class:`CaError`."""
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            result: tuple[str, ...] = self._call()(
                CertificateRequest(csr_pem, validity),
                metadata=metadata,
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            name = code.name if code is not None else "UNKNOWN"
            raise CaError(
                f"CreateCertificate at {self.address}: {name}: {details}", code=name
            ) from exc
        return result

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
