"""grpc mTLS with provider-backed credentials: the server picks up a rotated certificate
for new connections without restarting (dynamic_ssl_server_credentials), an open channel
keeps working, clients without a valid certificate are refused."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from pymesh.controlplane.ca import CertificateAuthority
from pymesh.security import (
    CertificateBundle,
    StaticProvider,
    channel_credentials,
    server_credentials,
)
from pymesh.security._pki import cert_pem, key_from_pem
from tests.unit.security.pki_helpers import ca_bundle, new_root, raw_bundle, spiffe

NAME = "server.test"  # grpc's ssl credentials check a DNS name / CN, not URI SANs
OPTS = [("grpc.ssl_target_name_override", NAME), ("grpc.use_local_subchannel_pool", 1)]


def _whoami(request: bytes, context: Any) -> bytes:
    # URI SANs only (pymesh-issued certificates also carry a DNS name derived from the ID)
    sans = [
        s
        for s in context.auth_context().get("x509_subject_alternative_name", [])
        if s.startswith(b"spiffe://")
    ]
    return b",".join(sans)


@pytest.fixture
def grpc_server(tmp_path: Path) -> Iterator[tuple[int, StaticProvider, CertificateAuthority, Any]]:
    ca = CertificateAuthority(tmp_path / "ca")
    root_key = key_from_pem((tmp_path / "ca" / "root-key.pem").read_bytes())
    sp = StaticProvider(
        raw_bundle(ca.roots[0], root_key, spiffe("default", "server"), common_name=NAME)
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.Who", {"Am": grpc.unary_unary_rpc_method_handler(_whoami)}
            ),
        )
    )
    creds = server_credentials(sp, require_client_cert=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield port, sp, ca, root_key
    server.stop(0).wait(5)


def _call(port: int, creds: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=OPTS) as ch:
        return ch.unary_unary("/t.Who/Am")(b"", timeout=5)  # type: ignore[no-any-return]


def test_grpc_mtls_identity_and_refusals(
    grpc_server: tuple[int, StaticProvider, CertificateAuthority, Any],
) -> None:
    port, _sp, ca, _ = grpc_server
    client = StaticProvider(ca_bundle(ca, "default", "client"))
    assert _call(port, channel_credentials(client)) == spiffe("default", "client").encode()
    other_root, other_key = new_root()
    trust = cert_pem(ca.roots[0])
    refused = 0
    for bundle in (
        CertificateBundle.from_pem(b"", b"", trust),  # no client certificate
        raw_bundle(other_root, other_key, spiffe("default", "client"), trust=trust),  # other CA
    ):
        with pytest.raises(grpc.RpcError) as err:
            _call(port, channel_credentials(StaticProvider(bundle)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        refused += 1
    assert refused == 2


def test_grpc_server_rotates_without_restart(
    grpc_server: tuple[int, StaticProvider, CertificateAuthority, Any], tmp_path: Path
) -> None:
    port, sp, ca, _root_key = grpc_server
    client = ca_bundle(ca, "default", "client")
    old_trust = channel_credentials(StaticProvider(client))
    # the open channel made before the rotation
    channel = grpc.secure_channel(f"127.0.0.1:{port}", old_trust, options=OPTS)
    try:
        assert channel.unary_unary("/t.Who/Am")(b"", timeout=5)
        # rotate the server to a certificate under a new root (the server keeps trusting
        # the client's root): only clients trusting the new root can connect now
        new_root_cert, new_root_key = new_root("next")
        both = cert_pem(new_root_cert) + cert_pem(ca.roots[0])
        sp.update(
            raw_bundle(
                new_root_cert,
                new_root_key,
                spiffe("default", "server"),
                common_name=NAME,
                trust=both,
            )
        )
        new_trust = CertificateBundle.from_pem(
            client.chain_pem, client.key_pem, cert_pem(new_root_cert)
        )
        assert _call(port, channel_credentials(StaticProvider(new_trust)))  # new cert served
        with pytest.raises(grpc.RpcError):
            _call(port, old_trust)  # a new connection no longer gets the old certificate
        # the channel opened before the rotation keeps its connection and works
        assert channel.unary_unary("/t.Who/Am")(b"", timeout=5)
    finally:
        channel.close()
