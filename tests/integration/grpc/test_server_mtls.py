"""A pymesh server on an mTLS port (credentials from ``pymesh.security`` following a
``file_watcher`` provider) under a STRICT listener: RBAC ``authenticated`` principals are the
client certificates' SPIFFE URI SANs, as behind an Istio sidecar."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.type.matcher.v3 import string_pb2

import pymesh.grpc
from pymesh.bootstrap import parse_bootstrap
from pymesh.grpc._server import mesh_server_credentials
from pymesh.security._pki import cert_pem, generate_key, issue_cert, key_pem, make_root
from pymesh.xds.client import XdsClient
from tests.integration.grpc.test_server_xds import (
    SERVICE,
    echo_handlers,
    inbound_listener,
    listener_name,
    make_bootstrap_dict,
    rbac_filter,
)
from tests.xdsserver import LDS, XdsTestServer

GOOD = "spiffe://cluster.local/ns/default/sa/productpage"
BAD = "spiffe://cluster.local/ns/other/sa/intruder"
SERVER_NAME = "echo.default.svc"


class Pki:
    def __init__(self, tmp: Path) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.root_key = generate_key()
        self.root = make_root(
            self.root_key, org="pymesh-test", now=now, lifetime=datetime.timedelta(hours=1)
        )
        self.root_pem = cert_pem(self.root)
        self.now = now
        # The server's certificate carries a DNS SAN too: grpcio clients check the host name.
        key = generate_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
            .issuer_name(self.root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(SERVER_NAME),
                        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/echo"),
                    ]
                ),
                critical=False,
            )
            .sign(self.root_key, hashes.SHA256())
        )
        self.files = {
            "cert": tmp / "cert-chain.pem",
            "key": tmp / "key.pem",
            "ca": tmp / "root-cert.pem",
        }
        self.files["cert"].write_bytes(cert_pem(cert))
        self.files["key"].write_bytes(key_pem(key))
        self.files["ca"].write_bytes(self.root_pem)

    def client(self, identity: str) -> tuple[bytes, bytes]:
        key = generate_key()
        cert = issue_cert(
            key.public_key(),
            identity,
            issuer=self.root,
            issuer_key=self.root_key,
            not_before=self.now - datetime.timedelta(minutes=1),
            not_after=self.now + datetime.timedelta(hours=1),
        )
        return key_pem(key), cert_pem(cert)


def principal_policy(spiffe: str) -> rbac_config_pb2.Policy:
    return rbac_config_pb2.Policy(
        permissions=[rbac_config_pb2.Permission(any=True)],
        principals=[
            rbac_config_pb2.Principal(
                authenticated=rbac_config_pb2.Principal.Authenticated(
                    principal_name=string_pb2.StringMatcher(exact=spiffe)
                )
            )
        ],
    )


@pytest.fixture
def ads() -> Iterator[XdsTestServer]:
    with XdsTestServer() as server:
        yield server


def _code(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=5)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_mtls_port_strict_listener_rbac_on_spiffe_identity(
    ads: XdsTestServer, tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    # The bootstrap's file_watcher provider points at the workload's files, as Istio's
    # agent writes it; mesh_server_credentials() serves them.
    data = json.loads(json.dumps(make_bootstrap_dict(ads)))
    data["certificate_providers"]["default"]["config"].update(
        certificate_file=str(pki.files["cert"]),
        private_key_file=str(pki.files["key"]),
        ca_certificate_file=str(pki.files["ca"]),
    )
    client = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
    server = pymesh.grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), handlers=echo_handlers(), xds_client=client
    )
    creds = mesh_server_credentials(xds_client=client)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    channels: list[grpc.Channel] = []

    def channel(identity: str | None) -> grpc.Channel:
        if identity is None:
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        else:
            key, chain = pki.client(identity)
            creds = grpc.ssl_channel_credentials(pki.root_pem, key, chain)
            ch = grpc.secure_channel(
                f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
            )
        channels.append(ch)
        return ch

    try:
        # STRICT: one chain, TLS with a required client certificate; only GOOD is allowed.
        ads.set_resources(
            LDS,
            {
                listener_name("127.0.0.1", port): inbound_listener(
                    port, tls=True, filters=[rbac_filter("ALLOW", {"good": principal_policy(GOOD)})]
                )
            },
        )
        assert server.wait_for_serving(10), server.serving_status
        assert _code(channel(GOOD)) is grpc.StatusCode.OK
        bad = channel(BAD)
        assert _code(bad) is grpc.StatusCode.PERMISSION_DENIED
        # A plaintext client cannot even connect to the mTLS port.
        assert _code(channel(None)) is grpc.StatusCode.UNAVAILABLE
    finally:
        for ch in channels:
            ch.close()
        server.stop(None).wait(5)
        client.close()
