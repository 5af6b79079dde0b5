"""A running embedded control plane, two echo backends and two workloads (each an in-process
XdsClient with its own admin endpoint on port 0), with known traffic through them.

Workload ``productpage`` (plaintext) sends 6 httpx requests to ``echo`` (subset ``v1`` by a
VirtualService); workload ``reviews`` has a workload certificate (file_watcher, issued by a
test CA) and sends httpx requests to ``echo`` subset ``v2``, whose backend answers 503, so
outlier detection (``consecutive5xxErrors: 1``) ejects it. ``reviews`` also serves gRPC
(``pymesh.grpc.server``: an xDS-managed inbound listener) as ``ratings:7070``, and
``productpage`` sends 4 gRPC calls to it through a mesh channel. Everything is stopped at
the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest

import pymesh.grpc
import pymesh.httpx
from pymesh.admin import AdminServer
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.xds.client import XdsClient
from tests.integration.httpx.conftest import HOST, PORT, Backend, Upstream, service_yaml
from tests.unit.security.pki_helpers import ca_bundle, make_ca

__all__ = ["GRPC_HOST", "GRPC_PORT", "HOST", "PORT", "MeshWorld", "Workload", "wait_for"]

SERVICE = "test.Echo"
GRPC_HOST = "ratings.default.svc.cluster.local"
GRPC_PORT = 7070


def echo_handlers() -> list[grpc.GenericRpcHandler]:  # type: ignore[type-arg]
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo:" + request

    return [
        grpc.method_handlers_generic_handler(
            SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
        )
    ]


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@dataclass
class Workload:
    name: str
    client: XdsClient
    admin: AdminServer
    http: pymesh.httpx.Client


@dataclass
class MeshWorld:
    cp: ControlPlane
    v1: Backend
    v2: Backend
    productpage: Workload
    reviews: Workload
    trust_pem: bytes
    reviews_serial: str
    grpc_port: int


VS = """\
http:
- match: [{headers: {x-subset: {exact: v2}}}]
  route: [{destination: {host: echo.default.svc.cluster.local, subset: v2}}]
- route: [{destination: {host: echo.default.svc.cluster.local, subset: v1}}]
"""
RATINGS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [ratings.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7070, name: grpc, protocol: GRPC}}]
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {port}}}}}]
"""
DR = """\
trafficPolicy:
  outlierDetection: {consecutive5xxErrors: 1, interval: 60s, baseEjectionTime: 300s,
                     maxEjectionPercent: 100}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshWorld]:
    tmp = tmp_path_factory.mktemp("cli")
    mesh_dir = tmp / "mesh"
    mesh_dir.mkdir()
    v1, v2 = Backend("v1"), Backend("v2")
    v2.status = 503
    ups = [Upstream(v1).start(), Upstream(v2).start()]
    stops: list[Callable[[], None]] = [u.stop for u in ups]
    try:
        (mesh_dir / "echo.yaml").write_text(
            service_yaml(
                {"v1": ups[0].port, "v2": ups[1].port}, virtual_service=VS, destination_rule=DR
            )
        )
        cp = ControlPlane([mesh_dir], xds_address="127.0.0.1:0", admin_port=0, ca=False).start()
        stops.append(cp.stop)
        # The reviews workload's certificate, Istio's file names in its cert dir.
        ca = make_ca(tmp / "ca")
        bundle = ca_bundle(ca, "default", "reviews")
        certs = tmp / "certs"
        certs.mkdir()
        (certs / "cert-chain.pem").write_bytes(bundle.chain_pem)
        (certs / "key.pem").write_bytes(bundle.key_pem)
        (certs / "root-cert.pem").write_bytes(bundle.roots_pem)
        from cryptography import x509

        serial = format(x509.load_pem_x509_certificate(bundle.chain_pem).serial_number, "x")

        def workload(name: str, **extra: object) -> Workload:
            data = generate_bootstrap(
                xds_address=cp.address,
                namespace="default",
                service_account=name,
                labels={"app": name, "version": "v1"},
                **extra,  # type: ignore[arg-type]
            )
            client = XdsClient(parse_bootstrap(json.dumps(data), source=name))
            stops.append(client.close)
            admin = AdminServer(client, port=0).start()
            stops.append(admin.stop)
            http = pymesh.httpx.Client(xds_client=client, timeout=5)
            stops.append(http.close)
            return Workload(name, client, admin, http)

        productpage = workload("productpage")
        reviews = workload("reviews", cert_dir=str(certs))
        url = f"http://{HOST}:{PORT}/"
        for _ in range(6):
            assert productpage.http.get(url).status_code == 200
        for _ in range(3):
            reviews.http.get(url, headers={"x-subset": "v2"})
        # reviews serves gRPC (xDS-managed server), reached as ratings:7070 from productpage.
        server = pymesh.grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            handlers=echo_handlers(),
            xds_client=reviews.client,
        )
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stops.append(lambda: server.stop(None).wait(5))
        assert server.wait_for_serving(15)
        (mesh_dir / "ratings.yaml").write_text(RATINGS.format(port=grpc_port))
        channel = pymesh.grpc.insecure_channel(
            f"xds:///{GRPC_HOST}:{GRPC_PORT}", xds_client=productpage.client
        )
        stops.append(channel.close)
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        for _ in range(4):
            assert unary(b"hi", timeout=15, wait_for_ready=True) == b"echo:hi"
        wait_for(lambda: all(s["types"].get("EDS", {}).get("acked") for s in _syncz(cp)))
        yield MeshWorld(cp, v1, v2, productpage, reviews, bundle.roots_pem, serial, grpc_port)
    finally:
        for stop in reversed(stops):
            stop()


def _syncz(cp: ControlPlane) -> list[dict[str, object]]:
    import urllib.request

    with urllib.request.urlopen(cp.admin_url + "/debug/syncz", timeout=5) as resp:
        data: list[dict[str, object]] = json.loads(resp.read())
    return data
