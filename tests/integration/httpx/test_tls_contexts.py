"""The httpx adapter's SSL contexts per upstream TLS settings: one context for equal
settings, found again without hashing the settings for the same settings object."""

from __future__ import annotations

import json
from pathlib import Path

from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.httpx._tls import UpstreamTls
from pymesh.model.matcher import StringMatcher
from pymesh.model.tls import (
    CertificateProviderInstance,
    CommonTlsContext,
    SanMatcher,
    UpstreamTlsContext,
    ValidationContext,
)
from tests.integration.httpx.test_mtls import write
from tests.unit.security.pki_helpers import ca_bundle, make_ca, spiffe


def _settings(sa: str) -> UpstreamTlsContext:
    source = CertificateProviderInstance("default")
    san = SanMatcher(StringMatcher.exact(spiffe("default", sa)))
    return UpstreamTlsContext(CommonTlsContext(source, ValidationContext(source, (san,))))


def test_contexts_shared_by_equal_settings_and_cached_per_object(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    certs = write(ca_bundle(ca, "default", "client"), tmp_path / "certs")
    data = generate_bootstrap(xds_address="127.0.0.1:1", cert_dir=str(certs))
    tls = UpstreamTls(parse_bootstrap(json.dumps(data), source="test"))
    try:
        web = _settings("web")
        first = tls.context(web)
        assert tls.context(web) is first  # the same object: the identity cache
        again = _settings("web")  # a later CDS update with the same settings
        assert again is not web and again == web
        assert tls.context(again) is first
        other = tls.context(_settings("db"))
        assert other is not first
        assert other.verifier.expected_sans == (StringMatcher.exact(spiffe("default", "db")),)
        assert tls.context(web) is first
    finally:
        tls.close()
