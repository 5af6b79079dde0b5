"""gRPC metadata exchange: only inside the mesh, and never seen by the applications.

As Istio's sidecars do it: the client sends ``x-envoy-peer-metadata(-id)`` (and, for
grpcio peers, the exchange's ``baggage``) only to clusters inside the mesh; the server
reads the caller's exchange into its ``source_*`` labels and hides it from the handler
and the application's interceptors; the client reads the server's answer into its
``destination_*`` labels and hides it from the application's ``initial_metadata()``.
Real grpcio servers on loopback, the embedded control plane, the real scrape output."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import pymesh.grpc
import pymesh.grpc.aio
from pymesh import telemetry
from pymesh.controlplane import ControlPlane
from tests.integration.grpc.test_server_xds import SERVICE, echo_handlers
from tests.integration.telemetry.conftest import parse_prometheus, scrape, scrape_until, value
from tests.integration.telemetry.test_peer_exchange import (
    ECHO,
    REVIEWS_BAGGAGE,
    REVIEWS_V2,
    _grpc_yaml,
    _xds,
    control_plane,
    istio_header,
)

__all__ = ["control_plane"]  # the fixture, imported for the tests here

Install = Callable[..., telemetry.Telemetry]
CP = tuple[ControlPlane, Path]
MX_ID = "x-envoy-peer-metadata-id"
MX = "x-envoy-peer-metadata"
APP_BAGGAGE = "userid=42"
"""A ``baggage`` of the application's own: never hidden."""


def _strs(metadata: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in metadata or ():
        if isinstance(v, str):
            out.setdefault(k, []).append(v)
    return out


class _Recorder:
    """A plain grpcio server (no mesh): records each call's metadata, answers with the
    exchange of workload ``reviews-v2`` (``x-envoy-peer-metadata-id`` and the exchange's
    ``baggage``) and a header of its own in the initial metadata; method ``Fail`` then
    aborts, ``Stream`` streams two messages."""

    def __init__(self) -> None:
        self.seen: list[dict[str, list[str]]] = []
        answer = ((MX_ID, "sidecar~10.0.0.7~reviews-v2-x.bookinfo~bookinfo.svc.cluster.local"),
                  ("baggage", REVIEWS_BAGGAGE), ("x-app", "kept"))  # fmt: skip

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.seen.append(_strs(context.invocation_metadata()))
            context.send_initial_metadata(answer)
            return b"echo:" + request

        def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.send_initial_metadata(answer)
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
            raise AssertionError("unreachable")

        def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            context.send_initial_metadata(answer)
            yield b"1"
            yield b"2"

        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Fail": grpc.unary_unary_rpc_method_handler(fail),
                "Stream": grpc.unary_stream_rpc_method_handler(stream),
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None).wait(5)


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    r = _Recorder()
    yield r
    r.stop()


def _hidden(metadata: Any) -> None:
    """The server's exchange is not in ``metadata``; its own header is."""
    got = _strs(metadata)
    assert MX_ID not in got and MX not in got, got
    assert "baggage" not in got, got
    assert got["x-app"] == ["kept"]


# --------------------------------------------------------------------------- client


def test_grpc_client_sends_no_exchange_outside_the_mesh(
    control_plane: CP, recorder: _Recorder, installed: Install
) -> None:
    """A MESH_EXTERNAL ServiceEntry (istiod marks its cluster ``istio.external``): no
    exchange metadata goes there, sync and aio, nor the application's own; the trace
    context still does. Then the same service inside the mesh gets it."""
    cp, mesh_dir = control_plane
    mesh_dir.joinpath("mesh.yaml").write_text(
        _grpc_yaml(recorder.port).replace("MESH_INTERNAL", "MESH_EXTERNAL")
    )
    client_xds = _xds(cp, "client-v1", {"app": "client", "version": "v1"})
    channel = pymesh.grpc.insecure_channel(f"xds:///{ECHO}:7070", xds_client=client_xds)
    forged = ((MX_ID, "forged"), (MX, istio_header(REVIEWS_V2)), ("baggage", APP_BAGGAGE))

    async def aio_call() -> None:
        achannel = pymesh.grpc.aio.insecure_channel(f"xds:///{ECHO}:7070", xds_client=client_xds)
        try:
            await achannel.unary_unary(f"/{SERVICE}/Unary")(b"hi", metadata=forged, timeout=10)
        finally:
            await achannel.close()

    try:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        assert unary(b"hi", timeout=15) == b"echo:hi"  # config loaded
        installed(node=client_xds.bootstrap.node, trace_sampling=0.0)  # unsampled: "-00"
        assert unary(b"hi", metadata=forged, timeout=10) == b"echo:hi"
        asyncio.run(aio_call())
        external = recorder.seen[-2:]
        mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(recorder.port))
        for _ in range(200):  # until the new config is applied (bounded: 20 s)
            unary(b"hi", timeout=10)
            if MX_ID in recorder.seen[-1]:
                break
            time.sleep(0.1)
        internal = recorder.seen[-1]
    finally:
        channel.close()
        client_xds.close()
    for seen in external:
        assert MX_ID not in seen and MX not in seen, seen
        assert seen["baggage"] == [APP_BAGGAGE]  # the application's own only
        assert seen["traceparent"][0].endswith("-00")
    assert internal[MX_ID] == [client_xds.bootstrap.node.id]
    assert "k8s.deployment.name=client-v1" in internal["baggage"][0].split(",")


def test_grpc_client_hides_the_servers_answer(
    control_plane: CP, recorder: _Recorder, installed: Install
) -> None:
    """The server's exchange in its initial metadata is read into ``destination_*`` and
    hidden from the application: ``with_call``, futures, streams, errors."""
    cp, mesh_dir = control_plane
    mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(recorder.port))
    client_xds = _xds(cp, "client-v1", {"app": "client", "version": "v1"})
    channel = pymesh.grpc.insecure_channel(f"xds:///{ECHO}:7070", xds_client=client_xds)
    try:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        assert unary(b"hi", timeout=15) == b"echo:hi"
        tel = installed(node=client_xds.bootstrap.node)
        value_, call = unary.with_call(b"hi", timeout=10)
        assert value_ == b"echo:hi"
        _hidden(call.initial_metadata())
        fut = unary.future(b"hi", timeout=10)
        assert fut.result() == b"echo:hi"
        _hidden(fut.initial_metadata())
        stream = channel.unary_stream(f"/{SERVICE}/Stream")(b"hi", timeout=10)
        assert list(stream) == [b"1", b"2"]
        _hidden(stream.initial_metadata())
        with pytest.raises(grpc.RpcError) as failed:
            channel.unary_unary(f"/{SERVICE}/Fail").with_call(b"hi", timeout=10)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        _hidden(failed.value.initial_metadata())
        samples = scrape(tel.serve_prometheus(port=0).url)
    finally:
        channel.close()
        client_xds.close()
    assert value(samples, "istio_requests_total", reporter="source",
                 destination_workload="reviews-v2", destination_app="reviews",
                 grpc_response_status="0") == 3  # fmt: skip
    assert value(samples, "istio_requests_total", reporter="source",
                 destination_workload="reviews-v2", grpc_response_status="5") == 1  # fmt: skip


def test_grpc_aio_client_hides_the_servers_answer(
    control_plane: CP, recorder: _Recorder, installed: Install
) -> None:
    cp, mesh_dir = control_plane
    mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(recorder.port))
    client_xds = _xds(cp, "client-v1", {"app": "client", "version": "v1"})

    async def main() -> str:
        channel = pymesh.grpc.aio.insecure_channel(f"xds:///{ECHO}:7070", xds_client=client_xds)
        try:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            assert await unary(b"hi", timeout=15) == b"echo:hi"
            tel = installed(node=client_xds.bootstrap.node)
            call = unary(b"hi", timeout=10)
            assert await call == b"echo:hi"
            _hidden(await call.initial_metadata())
            stream = channel.unary_stream(f"/{SERVICE}/Stream")(b"hi", timeout=10)
            assert [m async for m in stream] == [b"1", b"2"]
            _hidden(await stream.initial_metadata())
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary(f"/{SERVICE}/Fail")(b"hi", timeout=10)
            _hidden(failed.value.initial_metadata())
            return tel.prometheus_text()
        finally:
            await channel.close()

    try:
        text = asyncio.run(main())
    finally:
        client_xds.close()
    samples = parse_prometheus(text)
    assert value(samples, "istio_requests_total", reporter="source",
                 destination_workload="reviews-v2", grpc_response_status="0") == 2  # fmt: skip
    assert value(samples, "istio_requests_total", reporter="source",
                 destination_workload="reviews-v2", grpc_response_status="5") == 1  # fmt: skip


# --------------------------------------------------------------------------- server


class _Seen(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """The application's own interceptor: records what it is shown."""

    def __init__(self) -> None:
        self.seen: list[dict[str, list[str]]] = []

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.seen.append(_strs(details.invocation_metadata))  # type: ignore[attr-defined]
        return continuation(details)


class _AioSeen(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.seen: list[dict[str, list[str]]] = []

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.seen.append(_strs(details.invocation_metadata))  # type: ignore[attr-defined]
        return await continuation(details)


CALLER = (
    (MX_ID, "sidecar~10.0.0.7~reviews-v2-x.bookinfo~bookinfo.svc.cluster.local"),
    (MX, istio_header(REVIEWS_V2)),
    ("baggage", REVIEWS_BAGGAGE),
    ("baggage", APP_BAGGAGE),
    ("x-app", "kept"),
)
"""A mesh caller's exchange (as a pymesh client sends it) with the application's own."""


def _check_server(seen: list[dict[str, list[str]]], samples: Any) -> None:
    assert len(seen) == 4  # interceptor and handler, two calls
    for got in seen:
        assert MX_ID not in got and MX not in got, got
        assert got["baggage"] == [APP_BAGGAGE]
        assert got["x-app"] == ["kept"]
    assert value(samples, "istio_requests_total", reporter="destination",
                 source_workload="reviews-v2", source_app="reviews",
                 destination_workload="echo-v1", grpc_response_status="0") == 2  # fmt: skip


def _server_handlers(seen: list[dict[str, list[str]]]) -> list[grpc.GenericRpcHandler]:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(_strs(context.invocation_metadata()))
        return b"echo:" + request

    return [
        grpc.method_handlers_generic_handler(
            SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
        )
    ]


def test_grpc_server_hides_the_callers_exchange(control_plane: CP, installed: Install) -> None:
    """The handler and the application's interceptors never see the caller's exchange
    (read into ``source_*`` first), as behind Istio's sidecar."""
    cp, mesh_dir = control_plane
    server_xds = _xds(cp, "echo-v1", {"app": "echo", "version": "v1"})
    interceptor = _Seen()
    server = pymesh.grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        handlers=_server_handlers(interceptor.seen),
        interceptors=[interceptor],
        xds_client=server_xds,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(port))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")  # a plain gRPC peer
    try:
        assert server.wait_for_serving(15), server.serving_status
        tel = installed(node=server_xds.bootstrap.node)
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        for _ in range(2):
            assert unary(b"hi", metadata=CALLER, timeout=10) == b"echo:hi"
        samples = scrape_until(tel.serve_prometheus(port=0).url, "istio_requests_total", 2,
                               reporter="destination", source_workload="reviews-v2")  # fmt: skip
    finally:
        channel.close()
        server.stop(None).wait(5)
        server_xds.close()
    _check_server(interceptor.seen, samples)


def test_grpc_aio_server_hides_the_callers_exchange(control_plane: CP, installed: Install) -> None:
    cp, mesh_dir = control_plane
    server_xds = _xds(cp, "echo-v1", {"app": "echo", "version": "v1"})
    interceptor = _AioSeen()

    async def main() -> str:
        server = pymesh.grpc.aio.server(interceptors=[interceptor], xds_client=server_xds)
        for h in _server_handlers(interceptor.seen):
            server.add_generic_rpc_handlers((h,))
        port = server.add_insecure_port("127.0.0.1:0")
        mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(port))
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            assert await server.wait_for_serving(15)
            tel = installed(node=server_xds.bootstrap.node)
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            for _ in range(2):
                assert await unary(b"hi", metadata=CALLER, timeout=10) == b"echo:hi"
            return tel.prometheus_text()
        finally:
            await channel.close()
            await server.stop(None)

    try:
        text = asyncio.run(main())
    finally:
        server_xds.close()
    _check_server(interceptor.seen, parse_prometheus(text))


def test_echo_handlers_still_serve_without_an_exchange(
    control_plane: CP, installed: Install
) -> None:
    """No exchange from the caller: the handler gets grpcio's own context (nothing
    wrapped) and its metadata as sent."""
    cp, mesh_dir = control_plane
    server_xds = _xds(cp, "echo-v1", {"app": "echo", "version": "v1"})
    contexts: list[Any] = []

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        contexts.append((type(context).__module__, _strs(context.invocation_metadata())))
        return b"echo:" + request

    handlers = [
        *echo_handlers(),
        grpc.method_handlers_generic_handler(
            "test.Plain", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
        ),
    ]
    server = pymesh.grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), handlers=handlers, xds_client=server_xds
    )
    port = server.add_insecure_port("127.0.0.1:0")
    mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(port))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        assert server.wait_for_serving(15), server.serving_status
        installed(node=server_xds.bootstrap.node)
        md = (("baggage", APP_BAGGAGE), ("x-app", "kept"))
        assert channel.unary_unary("/test.Plain/Unary")(b"hi", metadata=md, timeout=10)
    finally:
        channel.close()
        server.stop(None).wait(5)
        server_xds.close()
    module, got = contexts[0]
    assert module.startswith("grpc")
    assert got["baggage"] == [APP_BAGGAGE] and got["x-app"] == ["kept"]


# --------------------------------------------------------------------------- asking once


class _Answering:
    """A plain grpcio server that answers the exchange as a pymesh server does: only to a
    request carrying ``x-envoy-peer-metadata-id``; records whether each call carried it."""

    def __init__(self) -> None:
        self.asked: list[bool] = []
        self.told: list[bool] = []
        answer = ((MX_ID, "sidecar~10.0.0.7~reviews-v2-x.bookinfo~bookinfo.svc.cluster.local"),
                  ("baggage", REVIEWS_BAGGAGE))  # fmt: skip

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            got = _strs(context.invocation_metadata())
            self.asked.append(MX_ID in got)
            self.told.append("k8s.deployment.name=client-v1" in got.get("baggage", [""])[0])
            if MX_ID in got:
                context.send_initial_metadata(answer)
            return b"echo:" + request

        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_grpc_client_asks_an_endpoint_once_then_reuses_its_answer(
    control_plane: CP, installed: Install, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call to an endpoint carries ``x-envoy-peer-metadata-id`` (the server
    answers, one frame more); the next ones, until ``LEARNED_FOR`` seconds have passed
    (fake clock), do not, and are labelled with the learned workload all the same: plain
    sync calls (``stub.Method(request)``) included."""
    from pymesh.telemetry import _grpc

    now = [1000.0]
    monkeypatch.setattr(_grpc, "_clock", lambda: now[0])
    monkeypatch.setattr(_grpc, "_LEARNED", {})
    server = _Answering()
    cp, mesh_dir = control_plane
    mesh_dir.joinpath("mesh.yaml").write_text(_grpc_yaml(server.port))
    client_xds = _xds(cp, "client-v1", {"app": "client", "version": "v1"})
    channel = pymesh.grpc.insecure_channel(f"xds:///{ECHO}:7070", xds_client=client_xds)
    try:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        assert unary(b"hi", timeout=15) == b"echo:hi"  # config loaded (telemetry off)
        tel = installed(node=client_xds.bootstrap.node)
        for _ in range(3):
            assert unary(b"hi", timeout=10) == b"echo:hi"
        now[0] += _grpc.LEARNED_FOR + 1  # learned too long ago: asked again
        for _ in range(2):
            assert unary(b"hi", timeout=10) == b"echo:hi"
        samples = scrape(tel.serve_prometheus(port=0).url)
    finally:
        channel.close()
        server.server.stop(None).wait(5)
        client_xds.close()
    assert server.asked == [False, True, False, False, True, False]
    assert server.told == [False, True, True, True, True, True]  # the caller always told
    assert value(samples, "istio_requests_total", reporter="source", source_workload="client-v1",
                 destination_workload="reviews-v2", destination_app="reviews",
                 destination_version="v2", grpc_response_status="0") == 5  # fmt: skip
