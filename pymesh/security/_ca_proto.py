"""Istio's CA API messages, built from a hand-written descriptor (not in xds-protos).

``istio/api security/v1alpha1/ca.proto``::

    package istio.v1.auth;
    message IstioCertificateRequest {
      string csr = 1; int64 validity_duration = 3; google.protobuf.Struct metadata = 4; }
    message IstioCertificateResponse { repeated string cert_chain = 1; }
    service IstioCertificateService {
      rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse); }

Same field numbers and types, hence the same wire format as istiod's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

__all__ = [
    "CREATE_CERTIFICATE",
    "SERVICE",
    "CertificateRequest",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

SERVICE = "istio.v1.auth.IstioCertificateService"
CREATE_CERTIFICATE = f"/{SERVICE}/CreateCertificate"

_F = descriptor_pb2.FieldDescriptorProto


def _build() -> tuple[Any, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    fdp = descriptor_pb2.FileDescriptorProto(
        name="pymesh/istio/v1/auth/ca.proto",
        package="istio.v1.auth",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    req = fdp.message_type.add(name="IstioCertificateRequest")
    req.field.add(name="csr", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    req.field.add(name="validity_duration", number=3, type=_F.TYPE_INT64, label=_F.LABEL_OPTIONAL)
    req.field.add(
        name="metadata",
        number=4,
        type=_F.TYPE_MESSAGE,
        label=_F.LABEL_OPTIONAL,
        type_name=".google.protobuf.Struct",
    )
    resp = fdp.message_type.add(name="IstioCertificateResponse")
    resp.field.add(name="cert_chain", number=1, type=_F.TYPE_STRING, label=_F.LABEL_REPEATED)
    svc = fdp.service.add(name="IstioCertificateService")
    svc.method.add(
        name="CreateCertificate",
        input_type=".istio.v1.auth.IstioCertificateRequest",
        output_type=".istio.v1.auth.IstioCertificateResponse",
    )
    pool.Add(fdp)
    fd = pool.FindFileByName(fdp.name)
    return (
        message_factory.GetMessageClass(fd.message_types_by_name["IstioCertificateRequest"]),
        message_factory.GetMessageClass(fd.message_types_by_name["IstioCertificateResponse"]),
    )


_Request, _Response = _build()


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    """A decoded ``IstioCertificateRequest`` (``validity`` in seconds, 0 = CA default)."""

    csr: str
    validity: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


def encode_request(request: CertificateRequest) -> bytes:
    msg = _Request(csr=request.csr, validity_duration=request.validity)
    if request.metadata:
        msg.metadata.update(request.metadata)
    data: bytes = msg.SerializeToString()
    return data


def decode_request(data: bytes) -> CertificateRequest:
    """Raises ``ValueError`` on bytes that are not an ``IstioCertificateRequest``."""
    msg = _Request()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(f"bad IstioCertificateRequest: {exc}") from exc
    metadata: dict[str, Any] = {}
    if msg.HasField("metadata"):
        from google.protobuf import json_format

        metadata = json_format.MessageToDict(msg.metadata)
    return CertificateRequest(str(msg.csr), int(msg.validity_duration), metadata)


def encode_response(chain: tuple[str, ...] | list[str]) -> bytes:
    data: bytes = _Response(cert_chain=list(chain)).SerializeToString()
    return data


def decode_response(data: bytes) -> tuple[str, ...]:
    msg = _Response()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise ValueError(f"bad IstioCertificateResponse: {exc}") from exc
    return tuple(str(c) for c in msg.cert_chain)
