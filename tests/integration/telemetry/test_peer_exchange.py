"""Istio's metadata exchange: ``x-envoy-peer-metadata`` (base64 of a protobuf ``Struct``)
and ``x-envoy-peer-metadata-id`` on requests and responses, HTTP and gRPC.

The peer is built and read here with protobuf's own ``struct_pb2`` (what Istio's Envoy
uses), so pymesh's hand-written encoding is checked against the real thing; the metrics
are scraped from the real Prometheus endpoint after known traffic."""

from __future__ import annotations

import base64
import json
import textwrap
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2

import pymesh.asgi
import pymesh.grpc
import pymesh.httpx
from pymesh import telemetry
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.telemetry._peer import decode_struct, encode_struct
from pymesh.xds.client import XdsClient
from tests.integration.grpc.test_server_xds import SERVICE, echo_handlers
from tests.integration.httpx.conftest import HOST, PORT, Backend, Mesh, Upstream, service_yaml
from tests.integration.telemetry.conftest import (
    parse_prometheus,
    scrape,
    scrape_until,
    select,
    value,
)

Make = Callable[..., tuple[Backend, Upstream]]
Install = Callable[..., telemetry.Telemetry]

REVIEWS_V2 = {
    "NAME": "reviews-v2-5b8b8f7d9-x2x4z",
    "NAMESPACE": "bookinfo",
    "WORKLOAD_NAME": "reviews-v2",
    "CLUSTER_ID": "Kubernetes",
    "MESH_ID": "cluster.local",
    "LABELS": {"app": "reviews", "version": "v2"},
}
"""A peer as Istio's agent describes it in node metadata."""


REVIEWS_BAGGAGE = (
    "k8s.cluster.name=Kubernetes,k8s.namespace.name=bookinfo,k8s.deployment.name=reviews-v2,"
    "service.name=reviews,service.version=v2"
)
"""The same peer as Istio's ambient data plane (ztunnel) writes it in ``baggage``."""


def istio_header(fields: dict[str, Any]) -> str:
    """``x-envoy-peer-metadata`` as Istio's Envoy writes it (protobuf's own encoding)."""
    s = struct_pb2.Struct()
    s.update(fields)
    return base64.b64encode(s.SerializeToString(deterministic=True)).decode()


def read_header(value: str) -> dict[str, Any]:
    s = struct_pb2.Struct()
    s.ParseFromString(base64.b64decode(value))
    return json.loads(json.dumps(dict(s.items()), default=lambda v: dict(v.items())))


def test_struct_codec_matches_protobuf() -> None:
    fields = {**REVIEWS_V2, "n": 1.5, "on": True, "none": None, "list": ["a", 2.0, {"k": "v"}]}
    s = struct_pb2.Struct()
    s.update(fields)
    ours = struct_pb2.Struct()
    ours.ParseFromString(encode_struct(fields))  # protobuf reads what we write
    assert ours == s
    assert decode_struct(s.SerializeToString()) == fields  # we read what protobuf writes
    for bad in (b"\x0a\x05\x0a", b"\x0f", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"):
        with pytest.raises(ValueError):
            decode_struct(bad)


def test_http_client_sends_its_metadata_and_labels_the_real_peer(
    mesh: Mesh, upstreams: Make, installed: Install
) -> None:
    seen: list[dict[str, str]] = []
    answer = istio_header(REVIEWS_V2)

    raw_seen: list[list[tuple[bytes, bytes]]] = []

    async def reviews(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw_seen.append(list(scope["headers"]))
        seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-envoy-peer-metadata", answer.encode())],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})

    _, up = upstreams("v1", app=reviews)
    mesh.write(service_yaml({"v1": up.port}))
    mesh.start(workload="productpage-v1", labels={"app": "productpage", "version": "v1"})
    assert mesh.client is not None
    node = mesh.client.bootstrap.node
    tel = installed(node=node)
    server = tel.serve_prometheus(port=0)
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        for _ in range(2):
            assert client.get(f"http://{HOST}:{PORT}/").status_code == 200
        # headers of the same names set by the application are replaced, not doubled,
        # and the application's request object is left as it built it
        forged = {"x-envoy-peer-metadata": "Zm9yZ2Vk", "traceparent": "00-" + "a" * 32 + "-"
                  + "b" * 16 + "-01"}  # fmt: skip
        request = client.build_request("GET", f"http://{HOST}:{PORT}/", headers=forged)
        assert client.send(request).status_code == 200
        assert request.headers["x-envoy-peer-metadata"] == "Zm9yZ2Vk"
    last = [k for k, _ in raw_seen[-1]]
    assert last.count(b"x-envoy-peer-metadata") == last.count(b"traceparent") == 1
    assert seen[-1]["x-envoy-peer-metadata"] == seen[0]["x-envoy-peer-metadata"]
    assert "a" * 32 not in seen[-1]["traceparent"]
    # what the upstream saw: our node, as Istio's Envoy would send it
    assert seen[0]["x-envoy-peer-metadata-id"] == node.id
    sent = read_header(seen[0]["x-envoy-peer-metadata"])
    assert sent["WORKLOAD_NAME"] == "productpage-v1"
    assert sent["NAMESPACE"] == "default"
    assert sent["LABELS"] == {"app": "productpage", "version": "v1"}
    assert sent["NAME"] == node.pod_name
    # the client reporter names the peer the server described, not the endpoint's labels
    samples = scrape(server.url)
    got = select(samples, "istio_requests_total", reporter="source", response_code="200")
    assert [s[2] for s in got] == [3]
    labels = got[0][1]
    assert {k: labels[k] for k in labels if k.startswith("destination_")} == {
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": "unknown",
        "destination_app": "reviews",
        "destination_version": "v2",
        "destination_service": HOST,
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2",
        "destination_service_name": "echo",
        "destination_service_namespace": "default",
        "destination_cluster": "Kubernetes",
    }
    assert labels["source_workload"] == "productpage-v1"


def test_http_client_sends_no_metadata_outside_the_mesh(
    mesh: Mesh, upstreams: Make, installed: Install
) -> None:
    """A MESH_EXTERNAL ServiceEntry (istiod marks its cluster ``istio.external``): no
    ``x-envoy-peer-metadata`` headers go there, as Istio's ``skip_external_clusters``."""
    seen: list[dict[str, str]] = []

    async def external(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    _, up = upstreams("v1", app=external)
    mesh.write(service_yaml({"v1": up.port}).replace("MESH_INTERNAL", "MESH_EXTERNAL"))
    mesh.start(workload="productpage-v1", labels={"app": "productpage", "version": "v1"})
    assert mesh.client is not None
    installed(node=mesh.client.bootstrap.node, trace_sampling=0.0)  # unsampled: "-00"
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        forged = {"x-envoy-peer-metadata": "Zm9yZ2Vk"}  # the application's own: not sent either
        assert client.get(f"http://{HOST}:{PORT}/", headers=forged).status_code == 200
    assert len(seen) == 1
    assert "x-envoy-peer-metadata" not in seen[0]
    assert "x-envoy-peer-metadata-id" not in seen[0]
    assert seen[0]["traceparent"].endswith("-00")  # the trace context still goes


@pytest.fixture
def asgi_server(tmp_path: Path) -> Iterator[Callable[..., pymesh.asgi.MeshServer]]:
    """A ``pymesh.asgi.MeshServer`` (defaults: telemetry on) as workload ``ratings-v1``."""
    from tests.integration.asgi.conftest import Mesh as AsgiMesh
    from tests.integration.asgi.conftest import peer_authentication, whoami

    m = AsgiMesh(tmp_path)
    m.write("pa.yaml", peer_authentication("PERMISSIVE"))

    def make(**kw: Any) -> pymesh.asgi.MeshServer:
        client = m.xds_client(workload="ratings-v1", labels={"app": "ratings", "version": "v1"})
        server = pymesh.asgi.MeshServer(
            whoami, host="127.0.0.1", port=0, xds_client=client, **kw
        ).start()
        m.servers.append(server)
        assert server.wait_for_serving(15), server.middleware.message
        return server

    yield make
    m.stop()


def test_asgi_server_reads_the_caller_and_answers_with_its_own(
    asgi_server: Callable[..., pymesh.asgi.MeshServer], installed: Install
) -> None:
    server = asgi_server()
    node = server.middleware._client.bootstrap.node  # type: ignore[union-attr]
    tel = installed(node=node)
    prom = tel.serve_prometheus(port=0)
    caller = {**REVIEWS_V2, "WORKLOAD_NAME": "reviews-v3", "LABELS": {"app": "reviews",
              "version": "v3", "service.istio.io/canonical-name": "reviews-canonical"}}  # fmt: skip
    headers = {"x-envoy-peer-metadata": istio_header(caller), "x-envoy-peer-metadata-id": "x"}
    with httpx.Client() as client:
        for _ in range(3):
            r = client.get(f"http://127.0.0.1:{server.port}/", headers=headers)
            assert r.status_code == 200
        anonymous = client.get(f"http://127.0.0.1:{server.port}/")
        assert anonymous.status_code == 200
        assert "x-envoy-peer-metadata" not in anonymous.headers  # not told to outsiders
    # the response carries the server's own metadata
    assert r.headers["x-envoy-peer-metadata-id"] == node.id
    answered = read_header(r.headers["x-envoy-peer-metadata"])
    assert answered["WORKLOAD_NAME"] == "ratings-v1"
    assert answered["LABELS"] == {"app": "ratings", "version": "v1"}
    samples = scrape_until(prom.url, "istio_requests_total", 4, reporter="destination")
    common = {"reporter": "destination", "destination_workload": "ratings-v1",
              "destination_app": "ratings", "response_code": "200"}  # fmt: skip
    known = select(samples, "istio_requests_total", **common, source_workload="reviews-v3")
    assert [s[2] for s in known] == [3]
    labels = known[0][1]
    assert {k: labels[k] for k in labels if k.startswith("source_")} == {
        "source_workload": "reviews-v3",
        "source_canonical_service": "reviews-canonical",
        "source_canonical_revision": "v3",
        "source_workload_namespace": "bookinfo",
        "source_principal": "unknown",
        "source_app": "reviews",
        "source_version": "v3",
        "source_cluster": "Kubernetes",
    }
    assert value(samples, "istio_requests_total", **common, source_workload="unknown") == 1


def test_asgi_server_telemetry_can_be_turned_off(
    asgi_server: Callable[..., pymesh.asgi.MeshServer], installed: Install
) -> None:
    server = asgi_server(telemetry=False)
    tel = installed(node=server.middleware._client.bootstrap.node)  # type: ignore[union-attr]
    r = httpx.get(f"http://127.0.0.1:{server.port}/")
    assert r.status_code == 200 and "x-envoy-peer-metadata" not in r.headers
    assert select(scrape(tel.serve_prometheus(port=0).url), "istio_requests_total") == []


# --------------------------------------------------------------------------- gRPC

ECHO = "echo.default.svc.cluster.local"


def _grpc_yaml(port: int) -> str:
    return textwrap.dedent(
        f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: echo, namespace: default}}
        spec:
          hosts: [{ECHO}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 7070, name: grpc, protocol: GRPC}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{grpc: {port}}}, labels: {{app: echo}}}}
        """
    )


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[tuple[ControlPlane, Path]]:
    d = tmp_path / "mesh"
    d.mkdir()
    with ControlPlane([d], xds_address="127.0.0.1:0", admin_port=None) as cp:
        yield cp, d


def _xds(cp: ControlPlane, workload: str, labels: dict[str, str]) -> XdsClient:
    data = generate_bootstrap(
        xds_address=cp.address, namespace="default", workload=workload, labels=labels
    )
    return XdsClient(parse_bootstrap(json.dumps(data), source="test"))


def test_grpc_server_reads_the_caller_and_answers_in_initial_metadata(
    control_plane: tuple[ControlPlane, Path], installed: Install
) -> None:
    cp, mesh_dir = control_plane
    server_xds = _xds(cp, "echo-v1", {"app": "echo", "version": "v1"})
    server = pymesh.grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), handlers=echo_handlers(), xds_client=server_xds
    )
    port = server.add_insecure_port("127.0.0.1:0")
    mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(port))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")  # a plain gRPC peer
    try:
        assert server.wait_for_serving(15), server.serving_status
        tel = installed(node=server_xds.bootstrap.node)
        prom = tel.serve_prometheus(port=0)
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        md = (
            ("x-envoy-peer-metadata-id", "sidecar~10.0.0.7~reviews-v2-x.bookinfo~bookinfo.svc"),
            ("x-envoy-peer-metadata", istio_header(REVIEWS_V2)),
            ("baggage", REVIEWS_BAGGAGE),
        )
        for _ in range(2):
            value_, call = unary.with_call(b"hi", metadata=md, timeout=10)
            assert value_ == b"echo:hi"
        answered = dict(call.initial_metadata())
        # without the id, the caller is still read but not answered (Envoy answers its id
        # only to a request that carried one)
        _, quiet = unary.with_call(b"hi", metadata=md[1:], timeout=10)
        unanswered = dict(quiet.initial_metadata())
        samples = scrape_until(prom.url, "istio_requests_total", 3, reporter="destination",
                               source_workload="reviews-v2")  # fmt: skip
    finally:
        channel.close()
        server.stop(None).wait(5)
        server_xds.close()
    # grpcio's core keeps x-envoy-peer-metadata to itself on receipt (it still goes on the
    # wire for Envoy peers): the id and the ambient baggage reach the application
    assert answered["x-envoy-peer-metadata-id"] == server_xds.bootstrap.node.id
    assert answered["baggage"] == (
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=echo-v1,"
        "service.name=echo,service.version=v1"
    )
    assert "x-envoy-peer-metadata-id" not in unanswered and "baggage" not in unanswered
    assert value(samples, "istio_requests_total", reporter="destination",
                 source_workload="reviews-v2", source_app="reviews", source_version="v2",
                 source_workload_namespace="bookinfo", destination_workload="echo-v1",
                 grpc_response_status="0") == 3  # fmt: skip


def test_grpc_client_labels_the_peer_from_its_initial_metadata(
    control_plane: tuple[ControlPlane, Path], installed: Install
) -> None:
    cp, mesh_dir = control_plane
    seen: list[dict[str, str]] = []

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        context.send_initial_metadata((("baggage", REVIEWS_BAGGAGE),))
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(port))
    server.start()
    client_xds = _xds(cp, "client-v1", {"app": "client", "version": "v1"})
    channel = pymesh.grpc.insecure_channel(f"xds:///{ECHO}:7070", xds_client=client_xds)
    try:
        call = channel.unary_unary(f"/{SERVICE}/Unary")
        assert call(b"hi", timeout=15) == b"echo:hi"  # warm up before counting
        tel = installed(node=client_xds.bootstrap.node)
        for _ in range(2):
            assert call.with_call(b"hi", timeout=10)[0] == b"echo:hi"
        samples = scrape(tel.serve_prometheus(port=0).url)
    finally:
        channel.close()
        server.stop(None).wait(5)
        client_xds.close()
    # the first call asks the endpoint (its id); the next reuse the answer (no id)
    assert seen[1]["x-envoy-peer-metadata-id"] == client_xds.bootstrap.node.id
    assert "x-envoy-peer-metadata-id" not in seen[2]
    assert "k8s.deployment.name=client-v1" in seen[-1]["baggage"].split(",")
    assert value(samples, "istio_requests_total", reporter="source", source_workload="client-v1",
                 destination_workload="reviews-v2", destination_app="reviews",
                 destination_version="v2", destination_workload_namespace="bookinfo",
                 destination_service=ECHO, grpc_response_status="0") == 2  # fmt: skip


def test_grpc_aio_client_labels_the_peer_from_its_initial_metadata(
    control_plane: tuple[ControlPlane, Path], installed: Install
) -> None:
    import asyncio

    import pymesh.grpc.aio

    cp, mesh_dir = control_plane

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.send_initial_metadata((("baggage", REVIEWS_BAGGAGE),))
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(port))
    server.start()
    client_xds = _xds(cp, "client-v1", {"app": "client", "version": "v1"})

    async def main() -> str:
        channel = pymesh.grpc.aio.insecure_channel(f"xds:///{ECHO}:7070", xds_client=client_xds)
        try:
            call = channel.unary_unary(f"/{SERVICE}/Unary")
            assert await call(b"hi", timeout=15) == b"echo:hi"
            tel = installed(node=client_xds.bootstrap.node)
            for _ in range(2):
                assert await call(b"hi", timeout=10) == b"echo:hi"
            return tel.prometheus_text()
        finally:
            await channel.close()

    try:
        text = asyncio.run(main())
    finally:
        server.stop(None).wait(5)
        client_xds.close()
    samples = parse_prometheus(text)
    labels = {
        "reporter": "source",
        "source_workload": "client-v1",
        "destination_workload": "reviews-v2",
        "destination_app": "reviews",
        "destination_workload_namespace": "bookinfo",
        "grpc_response_status": "0",
    }
    assert value(samples, "istio_requests_total", **labels) == 2
