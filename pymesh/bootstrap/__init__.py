"""The gRPC xDS bootstrap: which control plane to talk to, and who this workload is.

:func:`load_bootstrap` reads ``GRPC_XDS_BOOTSTRAP`` (a path) or ``GRPC_XDS_BOOTSTRAP_CONFIG``
(inline JSON) into a frozen :class:`Bootstrap`; :func:`generate_bootstrap` writes one for a
workload (what ``pymesh bootstrap`` prints). No protos and no grpc here: the xDS codec turns
:class:`Node` into the wire message.
"""

from pymesh.bootstrap._generate import (
    DEFAULT_XDS_ADDRESS,
    ISTIO_SERVER_LISTENER_TEMPLATE,
    generate_bootstrap,
)
from pymesh.bootstrap._json import JsonValue, thaw_json
from pymesh.bootstrap._model import (
    DEFAULT_TRUST_DOMAIN,
    SERVER_FEATURE_DELTA,
    SERVER_FEATURE_IGNORE_RESOURCE_DELETION,
    SERVER_FEATURE_XDS_V3,
    SUPPORTED_CHANNEL_CREDENTIALS,
    Authority,
    Bootstrap,
    CertificateProviderInstance,
    ChannelCredentials,
    FileWatcherConfig,
    Node,
    WorkloadPort,
    XdsServer,
)
from pymesh.bootstrap._parse import (
    ENV_BOOTSTRAP,
    ENV_BOOTSTRAP_CONFIG,
    load_bootstrap,
    parse_bootstrap,
)
from pymesh.bootstrap._templates import xdstp_authority

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "DEFAULT_XDS_ADDRESS",
    "ENV_BOOTSTRAP",
    "ENV_BOOTSTRAP_CONFIG",
    "ISTIO_SERVER_LISTENER_TEMPLATE",
    "SERVER_FEATURE_DELTA",
    "SERVER_FEATURE_IGNORE_RESOURCE_DELETION",
    "SERVER_FEATURE_XDS_V3",
    "SUPPORTED_CHANNEL_CREDENTIALS",
    "Authority",
    "Bootstrap",
    "CertificateProviderInstance",
    "ChannelCredentials",
    "FileWatcherConfig",
    "JsonValue",
    "Node",
    "WorkloadPort",
    "XdsServer",
    "generate_bootstrap",
    "load_bootstrap",
    "parse_bootstrap",
    "thaw_json",
    "xdstp_authority",
]
