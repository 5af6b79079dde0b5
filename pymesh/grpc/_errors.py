"""The gRPC statuses of the mesh's own answers, and the ``grpc.RpcError`` that carries them.

A call the mesh refuses or cannot complete fails with the status a *proxyless* gRPC client
(grpcio's C-core xDS client) produces for the same situation, raised as :class:`MeshRpcError`,
a ``grpc.RpcError`` that is also a ``grpc.Call`` (``code()``, ``details()``,
``trailing_metadata()``), so application code catching ``grpc.RpcError`` works unchanged.

====================================  =========================================================
mesh local reply (``ReplyKind``)      gRPC status
====================================  =========================================================
no route / cluster not found          UNAVAILABLE (C-core: "no matching route found")
no healthy upstream, overflow,        UNAVAILABLE (Envoy answers these before any response:
upstream reset / connect failure      a proxyless client sees the RPC fail UNAVAILABLE)
route / per-try / stream timeout      DEADLINE_EXCEEDED
fault abort                           the fault's ``grpc_status``, else the HTTP status mapped
                                      by gRPC's ``http-grpc-status-mapping.md``
direct response, redirect             the HTTP status mapped the same way
====================================  =========================================================
"""

from __future__ import annotations

from typing import Any

import grpc

from pymesh.core.flow import CallResult, LocalReply, ReplyKind

__all__ = [
    "MeshRpcError",
    "error_of_reply",
    "grpc_status_of_http",
    "status_code_of",
]

_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_code_of(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a numeric status (unknown numbers -> ``UNKNOWN``)."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def grpc_status_of_http(status: int) -> grpc.StatusCode:
    """gRPC's mapping of an HTTP status with no ``grpc-status`` (http-grpc-status-mapping.md)."""
    if status == 400:
        return grpc.StatusCode.INTERNAL
    if status == 401:
        return grpc.StatusCode.UNAUTHENTICATED
    if status == 403:
        return grpc.StatusCode.PERMISSION_DENIED
    if status == 404:
        return grpc.StatusCode.UNIMPLEMENTED
    if status in (429, 502, 503, 504):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.UNKNOWN


class MeshRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc,type-arg]
    """A failed call, as grpcio's own ``RpcError`` behaves (``code``/``details``/metadata).

    ``result`` is the mesh's :class:`~pymesh.core.flow.CallResult` when the mesh answered
    itself (flags such as ``UH``/``UO``/``FI``), else ``None`` (e.g. a deadline of the caller,
    or a cancellation).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
        result: CallResult | None = None,
    ) -> None:
        super().__init__(f"<MeshRpcError {code.name}: {details}>")
        self._code = code
        self._details = details
        self._trailing = trailing_metadata
        self.result = result

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return ()

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:  # type: ignore[override]
        return self._trailing

    def debug_error_string(self) -> str:
        return f"pymesh: {self._code.name}: {self._details}"

    # grpc.Call / grpc.RpcContext
    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False

    def __str__(self) -> str:
        return (
            f"<MeshRpcError of RPC that terminated with:\n\tstatus = {self._code}\n"
            f'\tdetails = "{self._details}"\n>'
        )

    __repr__ = __str__


def _reply_code(reply: LocalReply) -> grpc.StatusCode:
    kind = reply.kind
    if kind == ReplyKind.TIMEOUT:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if kind == ReplyKind.FAULT_ABORT:
        if reply.grpc_status is not None:
            return status_code_of(reply.grpc_status)
        return grpc_status_of_http(reply.status)
    if kind in (ReplyKind.DIRECT_RESPONSE, ReplyKind.REDIRECT):
        for k, v in reply.headers:
            if k == "grpc-status" and v.isdigit():
                return status_code_of(int(v))
        return grpc_status_of_http(reply.status)
    return grpc.StatusCode.UNAVAILABLE


_DETAILS = {
    ReplyKind.NO_ROUTE: "no matching route found",
    ReplyKind.UNSUPPORTED_ROUTE: "matching route has an unsupported action",
    ReplyKind.CLUSTER_NOT_FOUND: "route cluster not found",
    ReplyKind.FAULT_ABORT: "Fault injected",
}


def error_of_reply(result: CallResult, target: str) -> MeshRpcError:
    """The error a proxyless gRPC client raises for the mesh's local reply in ``result``."""
    reply = result.local_reply
    assert reply is not None
    details = _DETAILS.get(reply.kind)
    if details is None:
        details = reply.body.decode("utf-8", "replace") or f"HTTP status {reply.status}"
    flags = ",".join(result.flags)
    trailing: tuple[tuple[str, str | bytes], ...] = (("x-pymesh-flags", flags),) if flags else ()
    return MeshRpcError(
        _reply_code(reply),
        f"{details} (pymesh: {target})",
        trailing_metadata=trailing,
        result=result,
    )
