"""End to end on loopback: a ``pymesh.httpx.Client`` (DestinationRule ``ISTIO_MUTUAL``, its
certificate from the bootstrap's file_watcher provider) calls a ``pymesh.serve`` app under
STRICT mTLS with an AuthorizationPolicy; the server's certificate rotates without restart."""

from __future__ import annotations

import socket
import textwrap
import time

from cryptography import x509

import pymesh.httpx
from pymesh.security import FileWatcherProvider
from tests.integration.asgi.conftest import SERVER_ID, Mesh, peer_authentication, write_bundle

HOST = "web.default.svc.cluster.local"


def mesh_yaml(port: int) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: web, namespace: default}}
        spec:
          hosts: [{HOST}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 9080, name: http, protocol: HTTP}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {port}}}, serviceAccount: web}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: web, namespace: default}}
        spec:
          host: {HOST}
          trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: web-viewer, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: web}}}}
          action: ALLOW
          rules:
          - from: [{{source: {{principals: [cluster.local/ns/default/sa/productpage]}}}}]
            to: [{{operation: {{methods: [GET]}}}}]
        """
    )


def _server_serial(port: int, mesh: Mesh) -> int:
    ctx = mesh.client_context(mesh.identity("default", "probe"), (SERVER_ID,))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_pymesh_httpx_istio_mutual_to_pymesh_serve(mesh: Mesh) -> None:
    mesh.write("pa.yaml", peer_authentication("STRICT"))
    provider = FileWatcherProvider(
        certificate_file=str(mesh.cert_dir / "cert-chain.pem"),
        private_key_file=str(mesh.cert_dir / "key.pem"),
        ca_certificate_file=str(mesh.cert_dir / "root-cert.pem"),
        start=False,  # polled by the test: rotation observed deterministically
    )
    try:
        server = mesh.serve(certificate_provider=provider)
        mesh.write("web.yaml", mesh_yaml(server.port))
        pp_dir = write_bundle(mesh.identity("default", "productpage"), mesh.tmp / "pp")
        rv_dir = write_bundle(mesh.identity("default", "reviews"), mesh.tmp / "rv")
        productpage = mesh.xds_client(service_account="productpage", cert_dir=str(pp_dir))
        reviews = mesh.xds_client(service_account="reviews", cert_dir=str(rv_dir))
        url = f"http://{HOST}:9080/items/1"
        with (
            pymesh.httpx.Client(xds_client=productpage, mesh_wait=10) as pp,
            pymesh.httpx.Client(xds_client=reviews, mesh_wait=10) as rv,
        ):
            deadline = time.monotonic() + 15
            while (r := pp.get(url)).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.05)
            body = r.json()
            assert body["tls"] is True
            assert body["spiffe_id"] == "spiffe://cluster.local/ns/default/sa/productpage"
            assert [pp.get(url).status_code for _ in range(20)] == [200] * 20
            assert pp.post(url).status_code == 403
            denied = rv.get(url)
            assert denied.status_code == 403
            assert denied.text == "RBAC: access denied"

            # Rotation: new files, one poll; new connections get the new certificate,
            # the pooled connection keeps working.
            before = _server_serial(server.port, mesh)
            write_bundle(mesh.identity("default", "web"), mesh.cert_dir)
            assert provider.poll()
            after = _server_serial(server.port, mesh)
            assert after != before
            assert [pp.get(url).status_code for _ in range(5)] == [200] * 5
            assert server.handshake_failures == 0
    finally:
        provider.close()
