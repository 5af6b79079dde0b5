"""The CA on the control plane's gRPC port (Istio's API): workloads get certificates with a
token, every impersonation is refused, the CA client renews on schedule (fake clock) and
backs off when the CA is down."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pymesh.controlplane import ControlPlane
from pymesh.controlplane.ca import CertificateAuthority
from pymesh.security import CaClient, CaClientProvider, CaError, SpiffeId, build_csr, generate_key
from pymesh.security._ca_proto import CREATE_CERTIFICATE

ME = SpiffeId("cluster.local", "default", "reviews")


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[ControlPlane, CertificateAuthority]]:
    (tmp_path / "config").mkdir()
    ca = CertificateAuthority(tmp_path / "ca")
    with ControlPlane(tmp_path / "config", xds_address="127.0.0.1:0", admin_port=None, ca=ca) as cp:
        yield cp, ca


def test_ca_client_provider_gets_and_renews(
    plane: tuple[ControlPlane, CertificateAuthority],
) -> None:
    cp, ca = plane
    now = [time.time()]  # a fake clock, frozen near the real CA's time
    provider = CaClientProvider(
        cp.address,
        ME,
        token=ca.create_token("default", "reviews"),
        ttl=600,
        jitter=0.0,
        clock=lambda: now[0],
        rng=random.Random(1),
        start=False,
    )
    try:
        # the first step fetches; renewal at half of the lifetime counted from receipt
        nxt = provider.step(now[0])
        first = provider.current()
        assert first.identity == ME.uri and first.has_identity
        assert nxt == pytest.approx(now[0] + 300.0, abs=1.0)  # 600 s, renewed at 0.5
        assert provider.step(now[0] + 100) == nxt  # not due: nothing happens
        assert provider.renewals == 1
        now[0] = nxt
        provider.step(now[0])
        assert provider.renewals == 2 and provider.current().version == 2
        assert provider.current().chain_pem != first.chain_pem
        assert ca.stats["issued"] == 2
    finally:
        provider.close()


def test_impersonation_and_missing_token_refused(
    plane: tuple[ControlPlane, CertificateAuthority],
) -> None:
    cp, ca = plane
    client = CaClient(cp.address)
    try:
        csr_other = build_csr(
            generate_key(), SpiffeId("cluster.local", "default", "ratings")
        ).decode()
        csr_ca = _ca_csr()
        mine = ca.create_token("default", "reviews")
        foreign = _foreign_token()
        cases = {
            "CSR for someone else's identity": (csr_other, mine, "PERMISSION_DENIED"),
            "CSR without a token": (
                build_csr(generate_key(), ME).decode(),
                None,
                "UNAUTHENTICATED",
            ),
            "forged token": (build_csr(generate_key(), ME).decode(), foreign, "UNAUTHENTICATED"),
            "CSR requesting CA:true": (csr_ca, mine, "PERMISSION_DENIED"),
        }
        refused = 0
        for csr, token, code in cases.values():
            with pytest.raises(CaError) as err:
                client.create_certificate(csr, 600, token)
            assert err.value.code == code
            refused += 1
        assert refused == len(cases) == 4
        assert ca.stats["issued"] == 0
        # and the honest request works
        assert (
            len(client.create_certificate(build_csr(generate_key(), ME).decode(), 600, mine)) == 2
        )
    finally:
        client.close()


def _foreign_token() -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return CertificateAuthority(d).create_token("default", "reviews")


def _ca_csr() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    b = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ME.uri)]), True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    )
    return b.sign(generate_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[arg-type]


def test_ca_api_is_istios_method(plane: tuple[ControlPlane, CertificateAuthority]) -> None:
    """A raw grpc call by method path and bytes, as istio-agent makes it."""
    cp, ca = plane
    from pymesh.security._ca_proto import CertificateRequest, decode_response, encode_request

    with grpc.insecure_channel(cp.address) as channel:
        call = channel.unary_unary(CREATE_CERTIFICATE)
        raw = call(
            encode_request(CertificateRequest(build_csr(generate_key(), ME).decode(), 600)),
            metadata=(("authorization", f"Bearer {ca.create_token('default', 'reviews')}"),),
            timeout=10,
        )
    chain = decode_response(raw)
    assert chain[-1].startswith("-----BEGIN CERTIFICATE-----")
    assert len(chain) == 2


def test_ca_down_backs_off_on_fake_clock() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = CaClientProvider(
        f"127.0.0.1:{port}",
        ME,
        token="x",
        timeout=0.5,
        retry_base=1.0,
        retry_cap=8.0,
        clock=lambda: 0.0,
        rng=random.Random(0),
        start=False,
    )
    try:
        times = []
        t = 0.0
        for _ in range(5):
            t = provider.step(t)
            times.append(t)
        assert provider.failures == 5 and provider.last_error is not None
        delays = [b - a for a, b in zip([0.0, *times], times, strict=False)]
        bounds = [1.0, 2.0, 4.0, 8.0, 8.0]
        assert all(0.1 <= d <= bound + 1e-9 for d, bound in zip(delays, bounds, strict=True))
        with pytest.raises(Exception, match="no certificate"):
            provider.current()
    finally:
        provider.close()


def test_control_plane_serves_a_ca_by_default(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    ca_dir = tmp_path / "state"
    with ControlPlane(
        tmp_path / "config", xds_address="127.0.0.1:0", admin_port=None, ca_dir=ca_dir
    ) as cp:
        assert not ca_dir.exists()  # nothing on disk until a workload asks
        token = CertificateAuthority(ca_dir).create_token("default", "reviews")  # the CLI's path
        client = CaClient(cp.address)
        try:
            chain = client.create_certificate(build_csr(generate_key(), ME).decode(), 600, token)
        finally:
            client.close()
    assert len(chain) == 2
    assert (ca_dir / "root-cert.pem").read_text() == chain[-1]
    with ControlPlane(
        tmp_path / "config", xds_address="127.0.0.1:0", admin_port=None, ca=False
    ) as cp:
        client = CaClient(cp.address)
        try:
            with pytest.raises(CaError) as err:
                client.create_certificate(build_csr(generate_key(), ME).decode(), 600, token)
            assert err.value.code == "UNIMPLEMENTED"
        finally:
            client.close()


def test_token_file_appearing_later_is_picked_up(
    plane: tuple[ControlPlane, CertificateAuthority], tmp_path: Path
) -> None:
    cp, ca = plane
    token_file = tmp_path / "token"
    provider = CaClientProvider(cp.address, ME, token=token_file, rng=random.Random(2), start=False)
    try:
        now = time.time()
        retry_at = provider.step(now)  # no token file yet: a failure, retried with backoff
        assert provider.failures == 1 and "token" in (provider.last_error or "")
        assert now < retry_at <= now + 1.0
        token_file.write_text(ca.create_token("default", "reviews") + "\n")
        provider.step(retry_at)
        assert provider.failures == 0 and provider.current().identity == ME.uri
    finally:
        provider.close()
