"""Table tests of the TLS context decoders (gRFC A29 rules, widened to Istio's SDS names)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from pymesh.errors import ResourceError
from pymesh.model.matcher import MatchKind, StringMatcher
from pymesh.model.tls import (
    CertificateProviderInstance,
    SanMatcher,
    SanType,
    SdsSecret,
    ValidationContext,
)
from pymesh.xds.codec._common import Ctx
from pymesh.xds.codec.tls import (
    decode_downstream_tls_context,
    decode_downstream_transport_socket,
    decode_upstream_tls_context,
    decode_upstream_transport_socket,
)
from tests.fixtures.xds.cds_eds_fixtures import message_from_dict

CTX = Ctx("Cluster", "c")
UPSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"

# What istiod sends proxyless gRPC (gRFC A29 fields).
GRPC_UPSTREAM: dict[str, Any] = {
    "commonTlsContext": {
        "tlsCertificateProviderInstance": {"instanceName": "default", "certificateName": "default"},
        "combinedValidationContext": {
            "defaultValidationContext": {
                "matchSubjectAltNames": [{"exact": "spiffe://cluster.local/ns/default/sa/ratings"}]
            },
            "validationContextCertificateProviderInstance": {
                "instanceName": "default",
                "certificateName": "ROOTCA",
            },
        },
    },
    "sni": "outbound_.9080_._.ratings.default.svc.cluster.local",
}


def upstream(data: dict[str, Any]) -> tls_pb2.UpstreamTlsContext:
    return message_from_dict(data, tls_pb2.UpstreamTlsContext)


def downstream(data: dict[str, Any]) -> tls_pb2.DownstreamTlsContext:
    return message_from_dict(data, tls_pb2.DownstreamTlsContext)


def with_common(**common: Any) -> dict[str, Any]:
    return {"commonTlsContext": common}


CA_INSTANCE = {"validationContextCertificateProviderInstance": {"instanceName": "roots"}}


# ----------------------------------------------------------------------------- accepted


def test_proxyless_grpc_upstream_context() -> None:
    got = decode_upstream_tls_context(upstream(GRPC_UPSTREAM), CTX, "transport_socket")
    assert got.sni == "outbound_.9080_._.ratings.default.svc.cluster.local"
    assert got.common.identity == CertificateProviderInstance("default", "default")
    assert got.common.validation == ValidationContext(
        ca=CertificateProviderInstance("default", "ROOTCA"),
        subject_alt_names=(
            SanMatcher(StringMatcher.exact("spiffe://cluster.local/ns/default/sa/ratings")),
        ),
    )
    assert got.common.alpn_protocols == ()


@pytest.mark.parametrize(
    ("common", "identity", "validation"),
    [
        pytest.param(
            {
                "tlsCertificateSdsSecretConfigs": [{"name": "default"}],
                "combinedValidationContext": {
                    "defaultValidationContext": {},
                    "validationContextSdsSecretConfig": {"name": "ROOTCA"},
                },
                "tlsParams": {"tlsMinimumProtocolVersion": "TLSv1_2"},
                "alpnProtocols": ["istio-peer-exchange", "istio"],
            },
            SdsSecret("default"),
            ValidationContext(ca=SdsSecret("ROOTCA")),
            id="istio-sidecar-sds-names",
        ),
        pytest.param(
            {"validationContext": {"caCertificateProviderInstance": {"instanceName": "r"}}},
            None,
            ValidationContext(ca=CertificateProviderInstance("r")),
            id="ca-in-validation-context-no-client-cert",
        ),
        pytest.param(
            {
                "tlsCertificateCertificateProviderInstance": {"instanceName": "old"},
                "validationContextCertificateProviderInstance": {"instanceName": "old"},
            },
            CertificateProviderInstance("old"),
            ValidationContext(ca=CertificateProviderInstance("old")),
            id="deprecated-provider-instance-fields",
        ),
        pytest.param(
            {"validationContextSdsSecretConfig": {"name": "ROOTCA"}},
            None,
            ValidationContext(ca=SdsSecret("ROOTCA")),
            id="validation-by-sds-name",
        ),
        pytest.param(
            {"validationContext": {"systemRootCerts": {}}},
            None,
            ValidationContext(ca=None, system_root_certs=True),
            id="system-root-certs-A82",
        ),
        pytest.param(
            {
                "combinedValidationContext": {
                    "defaultValidationContext": {
                        "matchTypedSubjectAltNames": [
                            {"sanType": "URI", "matcher": {"prefix": "spiffe://td/"}},
                            {"sanType": "DNS", "matcher": {"suffix": ".svc"}},
                        ],
                        "matchSubjectAltNames": [{"safeRegex": {"regex": "spiffe://.*/sa/a"}}],
                    },
                    **CA_INSTANCE,
                }
            },
            None,
            ValidationContext(
                ca=CertificateProviderInstance("roots"),
                subject_alt_names=(
                    SanMatcher(StringMatcher.prefix("spiffe://td/"), SanType.URI),
                    SanMatcher(StringMatcher.suffix(".svc"), SanType.DNS),
                    SanMatcher(StringMatcher.regex("spiffe://.*/sa/a")),
                ),
            ),
            id="typed-and-legacy-san-matchers",
        ),
    ],
)
def test_upstream_accepted(
    common: dict[str, Any], identity: object, validation: ValidationContext
) -> None:
    got = decode_upstream_tls_context(upstream(with_common(**common)), CTX, "ts")
    assert got.common.identity == identity
    assert got.common.validation == validation


def test_upstream_alpn_kept_in_order() -> None:
    got = decode_upstream_tls_context(
        upstream(with_common(alpnProtocols=["h2", "http/1.1"], **CA_INSTANCE)), CTX, "ts"
    )
    assert got.common.alpn_protocols == ("h2", "http/1.1")


def test_regex_san_matcher_compiles() -> None:
    data = with_common(
        combinedValidationContext={
            "defaultValidationContext": {"matchSubjectAltNames": [{"safeRegex": {"regex": "a.c"}}]},
            **CA_INSTANCE,
        }
    )
    got = decode_upstream_tls_context(upstream(data), CTX, "ts")
    assert got.common.validation is not None
    san = got.common.validation.subject_alt_names[0]
    assert san.matcher.kind is MatchKind.REGEX
    assert san.matcher.matches("abc") and not san.matcher.matches("abcd")


def test_downstream_mtls_and_plain_server_tls() -> None:
    mtls = downstream(
        {
            "commonTlsContext": {
                "tlsCertificateProviderInstance": {"instanceName": "default"},
                **CA_INSTANCE,
            },
            "requireClientCertificate": True,
        }
    )
    got = decode_downstream_tls_context(mtls, CTX, "ts")
    assert got.require_client_certificate is True
    assert got.common.identity == CertificateProviderInstance("default")
    assert got.common.validation == ValidationContext(ca=CertificateProviderInstance("roots"))

    plain = downstream(
        {"commonTlsContext": {"tlsCertificateSdsSecretConfigs": [{"name": "default"}]}}
    )
    got = decode_downstream_tls_context(plain, CTX, "ts")
    assert got.require_client_certificate is False
    assert got.common.validation is None


def test_transport_socket_raw_buffer_and_tls() -> None:
    raw = message_from_dict(
        {
            "name": "envoy.transport_sockets.raw_buffer",
            "typedConfig": {
                "@type": RAW_BUFFER,
            },
        },
        base_pb2.TransportSocket,
    )
    assert decode_upstream_transport_socket(raw, CTX, "transport_socket") is None
    bare = base_pb2.TransportSocket(name="envoy.transport_sockets.raw_buffer")
    assert decode_downstream_transport_socket(bare, CTX, "transport_socket") is None

    tls = message_from_dict(
        {
            "name": "envoy.transport_sockets.tls",
            "typedConfig": {"@type": UPSTREAM, **GRPC_UPSTREAM},
        },
        base_pb2.TransportSocket,
    )
    got = decode_upstream_transport_socket(tls, CTX, "transport_socket")
    assert got is not None and got.sni.startswith("outbound_.9080_")


def test_transport_socket_in_typed_struct() -> None:
    data = {
        "name": "envoy.transport_sockets.tls",
        "typedConfig": {
            "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
            "typeUrl": UPSTREAM,
            "value": copy.deepcopy(GRPC_UPSTREAM),
        },
    }
    got = decode_upstream_transport_socket(
        message_from_dict(data, base_pb2.TransportSocket), CTX, "transport_socket"
    )
    assert got is not None
    assert got.common.identity == CertificateProviderInstance("default", "default")


# ----------------------------------------------------------------------------- rejected

REJECTED_UPSTREAM = [
    pytest.param({}, "ts.common_tls_context", "no root certificate source", id="no-validation"),
    pytest.param(
        {"tlsCertificateProviderInstance": {"instanceName": "default"}},
        "ts.common_tls_context",
        "no root certificate source",
        id="identity-only",
    ),
    pytest.param(
        {"validationContext": {"trustedCa": {"inlineString": "PEM"}}},
        "ts.common_tls_context.validation_context.trusted_ca",
        "not supported",
        id="inline-trusted-ca",
    ),
    pytest.param(
        {"validationContext": {"verifyCertificateSpki": ["x"]}},
        "ts.common_tls_context.validation_context.verify_certificate_spki",
        "SPKI",
        id="spki-pinning",
    ),
    pytest.param(
        {"validationContext": {"crl": {"inlineString": "CRL"}}},
        "ts.common_tls_context.validation_context.crl",
        "revocation",
        id="crl",
    ),
    pytest.param(
        {
            "validationContext": {
                "customValidatorConfig": {"name": "envoy.tls.cert_validator.spiffe"}
            }
        },
        "ts.common_tls_context.validation_context.custom_validator_config",
        "custom validators",
        id="custom-validator",
    ),
    pytest.param(
        {"validationContext": {"trustChainVerification": "ACCEPT_UNTRUSTED"}},
        "ts.common_tls_context.validation_context.trust_chain_verification",
        "ACCEPT_UNTRUSTED",
        id="accept-untrusted",
    ),
    pytest.param(
        {
            "combinedValidationContext": {
                "defaultValidationContext": {
                    "matchTypedSubjectAltNames": [{"matcher": {"exact": "a"}}]
                },
                **CA_INSTANCE,
            }
        },
        "ts.common_tls_context.combined_validation_context.default_validation_context"
        ".match_typed_subject_alt_names[0].san_type",
        "unsupported SAN type SAN_TYPE_UNSPECIFIED",
        id="san-type-unspecified",
    ),
    pytest.param(
        {
            "combinedValidationContext": {
                "defaultValidationContext": {
                    "matchSubjectAltNames": [{"exact": "a"}, {"prefix": ""}]
                },
                **CA_INSTANCE,
            }
        },
        "ts.common_tls_context.combined_validation_context.default_validation_context"
        ".match_subject_alt_names[1].prefix",
        "empty prefix",
        id="empty-prefix-san",
    ),
    pytest.param(
        {
            "combinedValidationContext": {
                "defaultValidationContext": {
                    "matchSubjectAltNames": [{"safeRegex": {"regex": "(a"}}]
                },
                **CA_INSTANCE,
            }
        },
        "ts.common_tls_context.combined_validation_context.default_validation_context"
        ".match_subject_alt_names[0].safe_regex.regex",
        "invalid regex",
        id="bad-regex-san",
    ),
    pytest.param(
        {"tlsCertificates": [{"certificateChain": {"inlineString": "PEM"}}], **CA_INSTANCE},
        "ts.common_tls_context.tls_certificates",
        "inline certificates",
        id="inline-certificate",
    ),
    pytest.param(
        {"tlsCertificateSdsSecretConfigs": [{"name": "a"}, {"name": "b"}], **CA_INSTANCE},
        "ts.common_tls_context.tls_certificate_sds_secret_configs",
        "at most one",
        id="two-sds-certificates",
    ),
    pytest.param(
        {"tlsCertificateSdsSecretConfigs": [{}], **CA_INSTANCE},
        "ts.common_tls_context.tls_certificate_sds_secret_configs[0].name",
        "SDS secret name is empty",
        id="sds-without-name",
    ),
    pytest.param(
        {"tlsCertificateProviderInstance": {"certificateName": "x"}, **CA_INSTANCE},
        "ts.common_tls_context.tls_certificate_provider_instance.instance_name",
        "instance_name is empty",
        id="provider-instance-without-name",
    ),
    pytest.param(
        {"validationContextCertificateProvider": {"name": "plugin"}},
        "ts.common_tls_context.validation_context_certificate_provider",
        "plugins are not supported",
        id="provider-plugin",
    ),
    pytest.param(
        {"customHandshaker": {"name": "alts"}, **CA_INSTANCE},
        "ts.common_tls_context.custom_handshaker",
        "custom handshakers",
        id="custom-handshaker",
    ),
]


@pytest.mark.parametrize(("common", "field", "message"), REJECTED_UPSTREAM)
def test_upstream_rejected(common: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ResourceError) as err:
        decode_upstream_tls_context(upstream(with_common(**common)), CTX, "ts")
    assert err.value.resource_name == "c"
    assert err.value.field == field
    assert message in err.value.message


def test_upstream_sni_too_long() -> None:
    with pytest.raises(ResourceError) as err:
        decode_upstream_tls_context(
            upstream({**with_common(**CA_INSTANCE), "sni": "a" * 256}), CTX, "ts"
        )
    assert err.value.field == "ts.sni"


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        pytest.param(
            {"commonTlsContext": CA_INSTANCE}, "ts.common_tls_context", "identity", id="no-identity"
        ),
        pytest.param(
            {
                "commonTlsContext": {"tlsCertificateProviderInstance": {"instanceName": "d"}},
                "requireClientCertificate": True,
            },
            "ts.common_tls_context",
            "require_client_certificate",
            id="mtls-without-ca",
        ),
        pytest.param(
            {
                "commonTlsContext": {"tlsCertificateProviderInstance": {"instanceName": "d"}},
                "requireSni": True,
            },
            "ts.require_sni",
            "not supported",
            id="require-sni",
        ),
        pytest.param(
            {
                "commonTlsContext": {"tlsCertificateProviderInstance": {"instanceName": "d"}},
                "ocspStaplePolicy": "MUST_STAPLE",
            },
            "ts.ocsp_staple_policy",
            "OCSP",
            id="ocsp",
        ),
    ],
)
def test_downstream_rejected(data: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ResourceError) as err:
        decode_downstream_tls_context(downstream(data), CTX, "ts")
    assert err.value.field == field
    assert message in err.value.message


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        pytest.param(
            {"name": "envoy.transport_sockets.tls"},
            "transport_socket.typed_config",
            "has no config",
            id="tls-without-config",
        ),
        pytest.param(
            {
                "name": "envoy.transport_sockets.tls",
                "typedConfig": {"@type": DOWNSTREAM, "commonTlsContext": {}},
            },
            "transport_socket.typed_config",
            "unsupported transport socket type",
            id="downstream-context-in-cluster",
        ),
        pytest.param(
            {
                "name": "envoy.transport_sockets.alts",
                "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts"
                },
            },
            "transport_socket.typed_config",
            "unsupported transport socket type",
            id="alts",
        ),
    ],
)
def test_transport_socket_rejected(data: dict[str, Any], field: str, message: str) -> None:
    ts = message_from_dict(data, base_pb2.TransportSocket)
    with pytest.raises(ResourceError) as err:
        decode_upstream_transport_socket(ts, CTX, "transport_socket")
    assert err.value.field == field
    assert message in err.value.message
