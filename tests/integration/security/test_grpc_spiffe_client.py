"""gRPC client verification of SPIFFE-only servers (``MeshChannelCredentials``): grpcio
speaks plaintext into a private tunnel whose TLS connection checks the server's chain
against the trust bundle and its URI SAN against the expected SANs. Real TLS on loopback,
sync and aio; every attack case is counted and none may pass."""

from __future__ import annotations

import asyncio
import datetime
import json
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import pymesh.grpc
import pymesh.grpc.aio
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.controlplane.ca import CertificateAuthority
from pymesh.model.matcher import StringMatcher
from pymesh.security import (
    CertificateBundle,
    MeshChannelCredentials,
    StaticProvider,
    server_credentials,
)
from pymesh.security._pki import cert_pem, key_from_pem
from pymesh.xds.client import XdsClient
from tests.unit.security.pki_helpers import ca_bundle, new_root, raw_bundle, spiffe

SERVER = spiffe("default", "server")
CLIENT = spiffe("default", "client")
OPTS = [("grpc.use_local_subchannel_pool", 1)]


def _whoami(request: bytes, context: Any) -> bytes:
    # URI SANs only (pymesh-issued certificates also carry a DNS name derived from the ID)
    sans = [
        s
        for s in context.auth_context().get("x509_subject_alternative_name", [])
        if s.startswith(b"spiffe://")
    ]
    return b",".join(sans)


class Server:
    """A grpcio mTLS server whose certificate (a StaticProvider) the test swaps."""

    def __init__(self, bundle: CertificateBundle) -> None:
        self.provider = StaticProvider(bundle)
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "t.Who", {"Am": grpc.unary_unary_rpc_method_handler(_whoami)}
                ),
            )
        )
        self.port = self.server.add_secure_port(
            "127.0.0.1:0", server_credentials(self.provider, require_client_cert=True)
        )
        self.server.start()

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


@pytest.fixture
def server(ca: CertificateAuthority) -> Iterator[Server]:
    s = Server(ca_bundle(ca, "default", "server"))
    yield s
    s.stop()


def _creds(ca: CertificateAuthority, *sans: StringMatcher, **kw: Any) -> MeshChannelCredentials:
    return MeshChannelCredentials(
        StaticProvider(ca_bundle(ca, "default", "client")), expected_sans=sans, **kw
    )


def _call(creds: MeshChannelCredentials, key: str) -> bytes:
    channel = creds.open_subchannel(key, OPTS, None, None)
    try:
        return channel.unary_unary("/t.Who/Am")(b"", timeout=5)  # type: ignore[no-any-return]
    finally:
        channel.close()


def _refused(creds: MeshChannelCredentials, key: str, reason: str) -> int:
    with pytest.raises(grpc.RpcError) as err:
        _call(creds, key)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert creds.refused() >= 1
    assert reason in creds.tunnels[-1].stats.last_error, creds.tunnels[-1].stats.last_error
    return 1


def test_right_identity_passes_and_server_sees_client(
    ca: CertificateAuthority, server: Server
) -> None:
    creds = _creds(ca, StringMatcher.exact(SERVER), trust_domains=["cluster.local"])
    try:
        assert _call(creds, server.key) == CLIENT.encode()
        assert creds.refused() == 0
    finally:
        creds.close()
    assert all(t.stats.active == 0 for t in creds.tunnels)


def _attack_cases(ca: CertificateAuthority, tmp_path: Path) -> list[Any]:
    """(server certificate, client matchers, trust domains, expected reason) per attack."""
    root_key = key_from_pem((tmp_path / "ca" / "root-key.pem").read_bytes())
    root = ca.roots[0]
    trust = cert_pem(root)
    other_root, other_key = new_root()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)
    return [
        (ca_bundle(ca, "default", "server"), [spiffe("default", "other")], None, "match none"),
        (
            raw_bundle(root, root_key, "spiffe://evil.example/ns/default/sa/server"),
            [],
            ["cluster.local"],
            "trust domain",
        ),
        (
            raw_bundle(other_root, other_key, SERVER, trust=trust),
            [SERVER],
            None,
            "certificate verify failed",
        ),
        (
            raw_bundle(
                root,
                root_key,
                SERVER,
                not_before=past,
                not_after=past + datetime.timedelta(hours=1),
            ),
            [SERVER],
            None,
            "expired",
        ),
    ]


def test_attacks_are_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    cases = _attack_cases(ca, tmp_path)
    refused = 0
    for bundle, sans, domains, reason in cases:
        s = Server(bundle)
        creds = _creds(ca, *(StringMatcher.exact(x) for x in sans), trust_domains=domains)
        try:
            refused += _refused(creds, s.key, reason)
        finally:
            creds.close()
            s.stop()
    assert refused == len(cases) == 4


@pytest.mark.parametrize("native", ["off", "auto"])
def test_rotation_new_connections_present_the_new_certificate(
    ca: CertificateAuthority, server: Server, native: str
) -> None:
    """Both client paths: the tunnel (``off``) and grpcio's own TLS (``auto``: the server's
    certificate is pymesh-issued, so the native path is taken)."""
    client = StaticProvider(ca_bundle(ca, "default", "client"))
    creds = MeshChannelCredentials(
        client, expected_sans=[StringMatcher.exact(SERVER)], native=native
    )
    try:
        old = creds.open_subchannel(server.key, OPTS, None, None)
        assert old.unary_unary("/t.Who/Am")(b"", timeout=5) == CLIENT.encode()
        client.update(ca_bundle(ca, "default", "client-next"))
        if native == "off":
            # the open channel keeps its connection (and certificate)
            assert old.unary_unary("/t.Who/Am")(b"", timeout=5) == CLIENT.encode()
        else:
            # the endpoint's grpcio channel is replaced by one on the new credentials
            assert creds.stats["native_endpoints"] == 1 and not creds.tunnels
            nxt = old.unary_unary("/t.Who/Am")(b"", timeout=5)
            assert nxt == spiffe("default", "client-next").encode()
            assert creds.stats["native_channels"] == 2
        old.close()
        assert _call(creds, server.key) == spiffe("default", "client-next").encode()
    finally:
        creds.close()


def test_aio_right_identity_and_wrong_san(ca: CertificateAuthority, server: Server) -> None:
    good = _creds(ca, StringMatcher.exact(SERVER))
    bad = _creds(ca, StringMatcher.prefix("spiffe://cluster.local/ns/other/"))

    async def main() -> tuple[bytes, grpc.StatusCode]:
        ch = good.open_aio_subchannel(server.key, OPTS, None, None, None)
        try:
            ok = await ch.unary_unary("/t.Who/Am")(b"", timeout=5)
        finally:
            await ch.close()
        ch = bad.open_aio_subchannel(server.key, OPTS, None, None, None)
        try:
            await ch.unary_unary("/t.Who/Am")(b"", timeout=5)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        finally:
            await ch.close()
        return ok, code

    try:
        ok, code = asyncio.run(main())
        assert ok == CLIENT.encode()
        assert code == grpc.StatusCode.UNAVAILABLE
        assert bad.refused() >= 1 and good.refused() == 0
    finally:
        good.close()
        bad.close()


def _mesh_yaml(port: int) -> str:
    docs = []
    for host, sa in (("good", "server"), ("bad", "someone-else")):
        docs.append(
            textwrap.dedent(
                f"""\
                apiVersion: networking.istio.io/v1
                kind: ServiceEntry
                metadata: {{name: {host}, namespace: default}}
                spec:
                  hosts: [{host}.default.svc.cluster.local]
                  location: MESH_INTERNAL
                  resolution: STATIC
                  ports: [{{number: 7070, name: grpc, protocol: GRPC}}]
                  endpoints:
                  - {{address: 127.0.0.1, ports: {{grpc: {port}}}, serviceAccount: {sa}}}
                ---
                apiVersion: networking.istio.io/v1
                kind: DestinationRule
                metadata: {{name: {host}, namespace: default}}
                spec:
                  host: {host}.default.svc.cluster.local
                  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
                """
            )
        )
    return "---\n".join(docs)


def test_mesh_channel_takes_tls_and_sans_from_cds(
    ca: CertificateAuthority, server: Server, tmp_path: Path
) -> None:
    """``pymesh.grpc.secure_channel`` with ``MeshChannelCredentials``: the cluster's
    ISTIO_MUTUAL context (bootstrap ``default`` file_watcher, SANs from the endpoints'
    service account) decides; a service whose endpoints claim another identity is refused."""
    bundle = ca_bundle(ca, "default", "client")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "cert-chain.pem").write_bytes(bundle.chain_pem)
    (certs / "key.pem").write_bytes(bundle.key_pem)
    (certs / "root-cert.pem").write_bytes(bundle.roots_pem)
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "mesh.yaml").write_text(_mesh_yaml(server.port))
    with ControlPlane([tmp_path / "mesh"], xds_address="127.0.0.1:0", admin_port=None) as cp:
        data = generate_bootstrap(xds_address=cp.address, namespace="default", cert_dir=str(certs))
        xds = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
        creds = pymesh.grpc.mesh_channel_credentials(xds_client=xds)
        assert isinstance(creds, MeshChannelCredentials)
        good = pymesh.grpc.secure_channel(
            "xds:///good.default.svc.cluster.local:7070", creds, xds_client=xds
        )
        bad = pymesh.grpc.secure_channel(
            "xds:///bad.default.svc.cluster.local:7070", creds, xds_client=xds
        )
        try:
            assert good.unary_unary("/t.Who/Am")(b"", timeout=15) == CLIENT.encode()
            # the server's certificate is pymesh-issued: grpcio's own TLS (the native path)
            assert creds.stats["native_endpoints"] == 1 and not creds.tunnels
            with pytest.raises(grpc.RpcError) as err:
                bad.unary_unary("/t.Who/Am")(b"", timeout=15)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert creds.refused() >= 1
            assert "match none" in creds.tunnels[-1].stats.last_error

            async def aio() -> bytes:
                ch = pymesh.grpc.aio.secure_channel(
                    "xds:///good.default.svc.cluster.local:7070", creds, xds_client=xds
                )
                try:
                    return await ch.unary_unary("/t.Who/Am")(b"", timeout=15)  # type: ignore[no-any-return]
                finally:
                    await ch.close()

            assert asyncio.run(aio()) == CLIENT.encode()
        finally:
            good.close()
            bad.close()
            creds.close()
            xds.close()


def test_aio_attacks_are_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    cases = _attack_cases(ca, tmp_path)

    async def attempt(creds: MeshChannelCredentials, key: str) -> grpc.StatusCode:
        ch = creds.open_aio_subchannel(key, OPTS, None, None, None)
        try:
            await ch.unary_unary("/t.Who/Am")(b"", timeout=5)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            await ch.close()

    refused = 0
    for bundle, sans, domains, reason in cases:
        s = Server(bundle)
        creds = _creds(ca, *(StringMatcher.exact(x) for x in sans), trust_domains=domains)
        try:
            assert asyncio.run(attempt(creds, s.key)) == grpc.StatusCode.UNAVAILABLE
            assert reason in creds.tunnels[-1].stats.last_error
            refused += 1
        finally:
            creds.close()
            s.stop()
    assert refused == len(cases) == 4


def test_dns_only_san_matchers_fail_closed(ca: CertificateAuthority, server: Server) -> None:
    """A context whose matchers are all DNS-typed cannot be checked by the tunnel (URI SANs
    only): every connection is refused rather than accepted unchecked."""
    from pymesh.model.tls import (
        CertificateProviderInstance,
        CommonTlsContext,
        SanMatcher,
        SanType,
        UpstreamTlsContext,
        ValidationContext,
    )

    source = CertificateProviderInstance("default")
    tls = UpstreamTlsContext(
        CommonTlsContext(
            identity=source,
            validation=ValidationContext(
                source, (SanMatcher(StringMatcher.exact("echo.example"), SanType.DNS),)
            ),
        )
    )
    creds = MeshChannelCredentials(StaticProvider(ca_bundle(ca, "default", "client")))
    try:
        tunnel = creds.tunnel_for(server.key, tls)
        with (
            grpc.insecure_channel(tunnel.target, OPTS) as ch,
            pytest.raises(grpc.RpcError) as err,
        ):
            ch.unary_unary("/t.Who/Am")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "URI SANs only" in tunnel.stats.last_error
    finally:
        creds.close()
