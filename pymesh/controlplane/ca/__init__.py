"""The embedded CA: Istio's ``IstioCertificateService`` and workload tokens."""

from pymesh.controlplane.ca._authority import CaRefused, CertificateAuthority
from pymesh.controlplane.ca._service import (
    add_ca_service,
    ca_handler,
    default_ca_dir,
    lazy_authority,
)

__all__ = [
    "CaRefused",
    "CertificateAuthority",
    "add_ca_service",
    "ca_handler",
    "default_ca_dir",
    "lazy_authority",
]
