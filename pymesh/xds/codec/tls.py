"""Decode TLS transport sockets: ``UpstreamTlsContext`` (clusters) and
``DownstreamTlsContext`` (listeners) into :mod:`pymesh.model.tls`.

Rules follow gRFC A29 (xDS-based security for gRPC), widened to what Istio sends sidecars:

* Certificates come from a certificate provider instance (A29) or from an SDS secret *by
  name* (Istio: ``default`` / ``ROOTCA``). Inline certificates (``tls_certificates``,
  ``trusted_ca``), certificate provider *plugins*, custom handshakers, custom certificate
  selectors and custom validators are NACKed.
* Verification features we do not implement and that would weaken or change security if
  ignored are NACKed: SPKI/hash pinning, CRLs, signed certificate timestamps,
  ``trust_chain_verification: ACCEPT_UNTRUSTED``, ``require_sni``, OCSP stapling policy.
* A client must be able to verify the server: an upstream context needs a root certificate
  source (a CA or ``system_root_certs``, gRFC A82). A server needs an identity certificate,
  and a CA when it requires client certificates.
* ``tls_params`` (protocol versions, ciphers) are ignored, as Istio sets them on every
  sidecar cluster to values Python's ``ssl`` defaults already satisfy.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2

from pymesh.model.tls import (
    CertificateProviderInstance,
    CertificateSource,
    CommonTlsContext,
    DownstreamTlsContext,
    SanMatcher,
    SanType,
    SdsSecret,
    UpstreamTlsContext,
    ValidationContext,
)
from pymesh.xds.codec._common import (
    AnyConfig,
    Ctx,
    decode_string_matcher,
    index,
    join,
    unpack_any,
    unwrap_any,
)

__all__ = [
    "RAW_BUFFER_SOCKET",
    "RAW_BUFFER_TYPE",
    "TLS_TRANSPORT_SOCKET",
    "decode_common_tls_context",
    "decode_downstream_tls_context",
    "decode_downstream_transport_socket",
    "decode_upstream_tls_context",
    "decode_upstream_transport_socket",
]

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER_SOCKET = "envoy.transport_sockets.raw_buffer"
RAW_BUFFER_TYPE = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
_UPSTREAM_TYPE = tls_pb2.UpstreamTlsContext.DESCRIPTOR.full_name
_DOWNSTREAM_TYPE = tls_pb2.DownstreamTlsContext.DESCRIPTOR.full_name

_SAN_TYPES = {
    common_pb2.SubjectAltNameMatcher.DNS: SanType.DNS,
    common_pb2.SubjectAltNameMatcher.URI: SanType.URI,
    common_pb2.SubjectAltNameMatcher.EMAIL: SanType.EMAIL,
    common_pb2.SubjectAltNameMatcher.IP_ADDRESS: SanType.IP_ADDRESS,
}


def _provider_instance(
    msg: common_pb2.CertificateProviderPluginInstance, ctx: Ctx, path: str
) -> CertificateProviderInstance:
    if not msg.instance_name:
        raise ctx.error(join(path, "instance_name"), "certificate provider instance_name is empty")
    return CertificateProviderInstance(msg.instance_name, msg.certificate_name)


def _sds_secret(msg: secret_pb2.SdsSecretConfig, ctx: Ctx, path: str) -> SdsSecret:
    if not msg.name:
        raise ctx.error(join(path, "name"), "SDS secret name is empty")
    return SdsSecret(msg.name)


def _decode_validation(
    vc: common_pb2.CertificateValidationContext, ctx: Ctx, path: str
) -> ValidationContext:
    """A ``CertificateValidationContext``; its ``ca`` may be ``None`` (set by the caller from
    a combined context's provider instance or SDS secret)."""
    unsupported = (
        ("trusted_ca", vc.HasField("trusted_ca"), "inline or file trusted_ca"),
        ("verify_certificate_spki", bool(vc.verify_certificate_spki), "SPKI pinning"),
        ("verify_certificate_hash", bool(vc.verify_certificate_hash), "certificate hash pinning"),
        ("require_signed_certificate_timestamp", vc.HasField("require_signed_certificate_timestamp")
         and vc.require_signed_certificate_timestamp.value, "signed certificate timestamps"),
        ("crl", vc.HasField("crl"), "certificate revocation lists"),
        ("custom_validator_config", vc.HasField("custom_validator_config"), "custom validators"),
        ("trust_chain_verification",
         vc.trust_chain_verification != common_pb2.CertificateValidationContext.VERIFY_TRUST_CHAIN,
         "ACCEPT_UNTRUSTED trust chains"),
    )  # fmt: skip
    for field, present, what in unsupported:
        if present:
            raise ctx.error(join(path, field), f"{what} not supported")
    ca: CertificateSource | None = None
    if vc.HasField("ca_certificate_provider_instance"):
        ca = _provider_instance(
            vc.ca_certificate_provider_instance, ctx, join(path, "ca_certificate_provider_instance")
        )
    sans: list[SanMatcher] = []
    typed_path = join(path, "match_typed_subject_alt_names")
    for i, typed in enumerate(vc.match_typed_subject_alt_names):
        p = index(typed_path, i)
        san_type = _SAN_TYPES.get(typed.san_type)
        if san_type is None:
            name = common_pb2.SubjectAltNameMatcher.SanType.Name(typed.san_type)
            raise ctx.error(join(p, "san_type"), f"unsupported SAN type {name}")
        if not typed.HasField("matcher"):
            raise ctx.error(join(p, "matcher"), "SAN matcher is required")
        matcher = decode_string_matcher(typed.matcher, ctx, join(p, "matcher"))
        sans.append(SanMatcher(matcher, san_type))
    legacy_path = join(path, "match_subject_alt_names")
    for i, m in enumerate(vc.match_subject_alt_names):
        sans.append(SanMatcher(decode_string_matcher(m, ctx, index(legacy_path, i))))
    system = vc.HasField("system_root_certs")
    return ValidationContext(ca=ca, subject_alt_names=tuple(sans), system_root_certs=system)


def _decode_validation_type(
    ctc: tls_pb2.CommonTlsContext, ctx: Ctx, path: str
) -> ValidationContext | None:
    kind = ctc.WhichOneof("validation_context_type")
    p = join(path, kind or "")
    if kind is None:
        return None
    if kind == "validation_context":
        return _decode_validation(ctc.validation_context, ctx, p)
    if kind == "validation_context_sds_secret_config":
        return ValidationContext(ca=_sds_secret(ctc.validation_context_sds_secret_config, ctx, p))
    if kind == "validation_context_certificate_provider_instance":
        inst = _provider_instance(ctc.validation_context_certificate_provider_instance, ctx, p)
        return ValidationContext(ca=inst)
    if kind != "combined_validation_context":
        raise ctx.error(p, "certificate provider plugins are not supported (use an instance)")
    combined = ctc.combined_validation_context
    base = _decode_validation(
        combined.default_validation_context, ctx, join(p, "default_validation_context")
    )
    ca: CertificateSource | None = base.ca
    if combined.HasField("validation_context_certificate_provider"):
        raise ctx.error(
            join(p, "validation_context_certificate_provider"),
            "certificate provider plugins are not supported (use an instance)",
        )
    if combined.HasField("validation_context_certificate_provider_instance"):
        ca = _provider_instance(
            combined.validation_context_certificate_provider_instance,
            ctx,
            join(p, "validation_context_certificate_provider_instance"),
        )
    elif combined.HasField("validation_context_sds_secret_config"):
        ca = _sds_secret(
            combined.validation_context_sds_secret_config,
            ctx,
            join(p, "validation_context_sds_secret_config"),
        )
    return ValidationContext(ca, base.subject_alt_names, base.system_root_certs)


def _decode_identity(
    ctc: tls_pb2.CommonTlsContext, ctx: Ctx, path: str
) -> CertificateSource | None:
    if ctc.tls_certificates:
        raise ctx.error(join(path, "tls_certificates"), "inline certificates are not supported")
    if ctc.HasField("custom_tls_certificate_selector"):
        raise ctx.error(
            join(path, "custom_tls_certificate_selector"),
            "custom certificate selectors are not supported",
        )
    if ctc.HasField("tls_certificate_certificate_provider"):
        raise ctx.error(
            join(path, "tls_certificate_certificate_provider"),
            "certificate provider plugins are not supported (use an instance)",
        )
    if ctc.HasField("tls_certificate_provider_instance"):
        p = join(path, "tls_certificate_provider_instance")
        return _provider_instance(ctc.tls_certificate_provider_instance, ctx, p)
    if ctc.HasField("tls_certificate_certificate_provider_instance"):
        p = join(path, "tls_certificate_certificate_provider_instance")
        return _provider_instance(ctc.tls_certificate_certificate_provider_instance, ctx, p)
    sds = ctc.tls_certificate_sds_secret_configs
    if len(sds) > 1:
        raise ctx.error(
            join(path, "tls_certificate_sds_secret_configs"), "at most one SDS certificate"
        )
    if sds:
        return _sds_secret(sds[0], ctx, index(join(path, "tls_certificate_sds_secret_configs"), 0))
    return None


def decode_common_tls_context(
    ctc: tls_pb2.CommonTlsContext, ctx: Ctx, path: str
) -> CommonTlsContext:
    """A ``CommonTlsContext`` (no client/server requirements checked here)."""
    if ctc.HasField("custom_handshaker"):
        raise ctx.error(join(path, "custom_handshaker"), "custom handshakers are not supported")
    identity = _decode_identity(ctc, ctx, path)
    validation = _decode_validation_type(ctc, ctx, path)
    return CommonTlsContext(identity, validation, tuple(ctc.alpn_protocols))


def decode_upstream_tls_context(
    msg: tls_pb2.UpstreamTlsContext, ctx: Ctx, path: str
) -> UpstreamTlsContext:
    """An ``UpstreamTlsContext``; the server must be verifiable (a root source is required)."""
    cpath = join(path, "common_tls_context")
    common = decode_common_tls_context(msg.common_tls_context, ctx, cpath)
    v = common.validation
    if v is None or (v.ca is None and not v.system_root_certs):
        raise ctx.error(cpath, "no root certificate source to verify the server")
    if len(msg.sni) > 255:
        raise ctx.error(join(path, "sni"), "sni longer than 255 characters")
    return UpstreamTlsContext(common, msg.sni)


def decode_downstream_tls_context(
    msg: tls_pb2.DownstreamTlsContext, ctx: Ctx, path: str
) -> DownstreamTlsContext:
    """A ``DownstreamTlsContext``; an identity is required, and a CA when client
    certificates are required."""
    cpath = join(path, "common_tls_context")
    common = decode_common_tls_context(msg.common_tls_context, ctx, cpath)
    if common.identity is None:
        raise ctx.error(cpath, "a server TLS context needs an identity certificate")
    if msg.HasField("require_sni") and msg.require_sni.value:
        raise ctx.error(join(path, "require_sni"), "require_sni is not supported")
    if msg.ocsp_staple_policy != tls_pb2.DownstreamTlsContext.LENIENT_STAPLING:
        raise ctx.error(join(path, "ocsp_staple_policy"), "OCSP stapling is not supported")
    require = msg.HasField("require_client_certificate") and msg.require_client_certificate.value
    v = common.validation
    if require and (v is None or (v.ca is None and not v.system_root_certs)):
        raise ctx.error(
            cpath, "require_client_certificate needs a root certificate source to verify clients"
        )
    return DownstreamTlsContext(common, bool(require))


def _tls_config(ts: base_pb2.TransportSocket, want: str, ctx: Ctx, path: str) -> AnyConfig | None:
    """The TLS ``typed_config`` of a transport socket, or ``None`` for ``raw_buffer``."""
    if not ts.HasField("typed_config"):
        if ts.name == RAW_BUFFER_SOCKET:
            return None
        raise ctx.error(join(path, "typed_config"), f"transport socket {ts.name!r} has no config")
    tpath = join(path, "typed_config")
    cfg = unwrap_any(ts.typed_config, ctx, tpath)
    if cfg.type_name == RAW_BUFFER_TYPE:
        return None
    if cfg.type_name != want:
        raise ctx.error(tpath, f"unsupported transport socket type {cfg.type_url!r}")
    return cfg


def decode_upstream_transport_socket(
    ts: base_pb2.TransportSocket, ctx: Ctx, path: str
) -> UpstreamTlsContext | None:
    """A cluster's ``core.v3.TransportSocket``: TLS context, or ``None`` for plaintext
    (``raw_buffer``). Any other transport socket is NACKed: ignoring it could silently
    downgrade security."""
    cfg = _tls_config(ts, _UPSTREAM_TYPE, ctx, path)
    if cfg is None:
        return None
    tpath = join(path, "typed_config")
    msg = unpack_any(cfg, tls_pb2.UpstreamTlsContext, ctx, tpath)
    return decode_upstream_tls_context(msg, ctx, tpath)


def decode_downstream_transport_socket(
    ts: base_pb2.TransportSocket, ctx: Ctx, path: str
) -> DownstreamTlsContext | None:
    """A listener filter chain's ``core.v3.TransportSocket``: TLS context, or ``None``."""
    cfg = _tls_config(ts, _DOWNSTREAM_TYPE, ctx, path)
    if cfg is None:
        return None
    tpath = join(path, "typed_config")
    msg = unpack_any(cfg, tls_pb2.DownstreamTlsContext, ctx, tpath)
    return decode_downstream_tls_context(msg, ctx, tpath)
