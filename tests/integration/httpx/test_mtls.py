"""mTLS to mesh endpoints (DestinationRule ``ISTIO_MUTUAL``), as Istio gives it to proxyless
clients: the bootstrap's ``default`` file_watcher provider for our certificate and the
roots, the endpoints' SPIFFE IDs as the accepted SANs.

Certificates come from the embedded CA; the upstream is uvicorn requiring a client
certificate from the same roots.
"""

from __future__ import annotations

import collections
import ssl
import textwrap
from collections.abc import Callable
from pathlib import Path

import pymesh.httpx
from pymesh.security import CertificateBundle, peer_identity
from tests.integration.httpx.conftest import HOST, PORT, Backend, Mesh, Upstream
from tests.unit.security.pki_helpers import ca_bundle, make_ca

URL = f"http://{HOST}:{PORT}/"
Make = Callable[..., tuple[Backend, Upstream]]


def write(bundle: CertificateBundle, directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "cert-chain.pem").write_bytes(bundle.chain_pem)
    (directory / "key.pem").write_bytes(bundle.key_pem)
    (directory / "root-cert.pem").write_bytes(bundle.roots_pem)
    return directory


def mesh_yaml(endpoints: dict[str, tuple[int, str]]) -> str:
    eps = "\n".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {port}}}, serviceAccount: {sa}, "
        f"labels: {{version: {v}}}}}"
        for v, (port, sa) in endpoints.items()
    )
    return (
        textwrap.dedent(
            f"""\
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {{name: echo, namespace: default}}
            spec:
              hosts: [{HOST}]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
              endpoints:
            """
        )
        + eps
        + "\n"
        + textwrap.dedent(
            f"""\
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {{name: echo, namespace: default}}
            spec:
              host: {HOST}
              trafficPolicy:
                tls: {{mode: ISTIO_MUTUAL}}
            """
        )
    )


def test_istio_mutual_tls_with_spiffe_checks(mesh: Mesh, upstreams: Make, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server_dir = write(ca_bundle(ca, "default", "echo"), tmp_path / "server")
    client_dir = write(ca_bundle(ca, "default", "client"), tmp_path / "client")
    tls = {
        "ssl_certfile": str(server_dir / "cert-chain.pem"),
        "ssl_keyfile": str(server_dir / "key.pem"),
        "ssl_ca_certs": str(server_dir / "root-cert.pem"),
        "ssl_cert_reqs": ssl.CERT_REQUIRED,  # mTLS STRICT: no client certificate, no entry
    }
    _backend, up = upstreams("echo", **tls)
    mesh.write(mesh_yaml({"v1": (up.port, "echo")}))
    mesh.start(cert_dir=str(client_dir))
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        codes = collections.Counter(client.get(URL).status_code for _ in range(5))
        assert codes == {200: 5}
        r = client.get(URL)
        assert r.json()["name"] == "echo"
        ssl_object = r.extensions["network_stream"].get_extra_info("ssl_object")
        assert peer_identity(ssl_object) == "spiffe://cluster.local/ns/default/sa/echo"

        # The endpoint now claims another identity: the server's certificate (sa echo) no
        # longer matches the expected SAN, the handshake is refused, Envoy's 503 UF.
        mesh.write(mesh_yaml({"v1": (up.port, "someone-else")}))
        import time

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            r = client.get(URL)
            if r.status_code == 503:
                break
            time.sleep(0.05)
        assert r.status_code == 503, r.text
        assert r.text.startswith("upstream connect error or disconnect/reset before headers")
        assert "UF" in r.extensions[pymesh.httpx.RESULT_EXTENSION].flags


def test_istio_mutual_tls_on_asyncio(mesh: Mesh, upstreams: Make, tmp_path: Path) -> None:
    """The asyncio engine's TLS: same contexts, same SPIFFE SAN check."""
    import asyncio
    import time

    ca = make_ca(tmp_path / "ca")
    server_dir = write(ca_bundle(ca, "default", "echo"), tmp_path / "server")
    client_dir = write(ca_bundle(ca, "default", "client"), tmp_path / "client")
    tls = {
        "ssl_certfile": str(server_dir / "cert-chain.pem"),
        "ssl_keyfile": str(server_dir / "key.pem"),
        "ssl_ca_certs": str(server_dir / "root-cert.pem"),
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
    }
    _backend, up = upstreams("echo", **tls)
    mesh.write(mesh_yaml({"v1": (up.port, "echo")}))
    mesh.start(cert_dir=str(client_dir))

    async def run() -> None:
        async with pymesh.httpx.AsyncClient(xds_client=mesh.client, mesh_wait=10) as client:
            rs = await asyncio.gather(*(client.get(URL) for _ in range(8)))
            assert [r.status_code for r in rs] == [200] * 8
            assert rs[0].json()["name"] == "echo"
            ssl_object = rs[0].extensions["network_stream"].get_extra_info("ssl_object")
            assert peer_identity(ssl_object) == "spiffe://cluster.local/ns/default/sa/echo"
            mesh.write(mesh_yaml({"v1": (up.port, "someone-else")}))
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = await client.get(URL)
                if r.status_code == 503:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 503, r.text
            assert "UF" in r.extensions[pymesh.httpx.RESULT_EXTENSION].flags

    asyncio.run(run())
