"""CSDS: a real grpcio CSDS client asks a real gRPC server about a real XdsClient.

The XdsClient talks to ``tests/xdsserver.py`` over loopback; the CSDS service is added to a
separate ``grpc.Server`` with ``add_csds_servicer`` and queried with the Envoy protos, as
``grpcdebug`` / ``istioctl x describe`` would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.service.status.v3 import csds_pb2

from pymesh.xds.client import XdsClient
from pymesh.xds.resource_types import ResourceType
from pymesh.xds.status import config_dump, decoded
from pymesh.xds.transport.csds import add_csds_servicer
from tests.xdsserver import CDS, XdsTestServer

FETCH = "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus"
STREAM = "/envoy.service.status.v3.ClientStatusDiscoveryService/StreamClientStatus"


def cluster_proto(name: str, *, bad: bool = False) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource()
            )
        ),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if bad:
        cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    return cluster


class Watcher:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.cond = threading.Condition()

    def _add(self, kind: str, name: str) -> None:
        with self.cond:
            self.events.append((kind, name))
            self.cond.notify_all()

    def on_resource_changed(self, rtype: ResourceType, name: str, value: object) -> None:
        self._add("changed", name)

    def on_resource_does_not_exist(self, rtype: ResourceType, name: str) -> None:
        self._add("does_not_exist", name)

    def on_ambient_error(self, rtype: ResourceType, name: str, error: str) -> None:
        self._add("error", name)

    def wait(self, kind: str, name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while (kind, name) not in self.events:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {kind} for {name}: {self.events}"
                self.cond.wait(remaining)


@pytest.fixture
def xds() -> Iterator[tuple[XdsTestServer, XdsClient, Watcher]]:
    with XdsTestServer() as server, XdsClient(server.bootstrap()) as client:
        server.set_resources(
            CDS,
            {
                "good": cluster_proto("good"),
                "bad": cluster_proto("bad", bad=True),
                "gone": cluster_proto("gone"),
            },
        )
        watcher = Watcher()
        cancels = [
            client.watch(ResourceType.CLUSTER, name, watcher) for name in ("good", "bad", "gone")
        ]
        cancels.append(client.watch(ResourceType.CLUSTER_LOAD_ASSIGNMENT, "pending", watcher))
        watcher.wait("changed", "good")
        watcher.wait("changed", "gone")
        server.remove_resources(CDS, ["gone"])  # SotW CDS: absent from a response = deleted
        watcher.wait("does_not_exist", "gone")
        server.wait_for_nack(CDS)
        yield server, client, watcher
        for cancel in cancels:
            cancel()


@pytest.fixture
def csds_channel(xds: tuple[XdsTestServer, XdsClient, Watcher]) -> Iterator[grpc.Channel]:
    _, client, _ = xds
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_csds_servicer(server, client)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(None).wait()


def by_name(response: csds_pb2.ClientStatusResponse) -> dict[str, object]:
    [config] = response.config
    return {c.name: c for c in config.generic_xds_configs}


def fetch(channel: grpc.Channel, **kwargs: object) -> csds_pb2.ClientStatusResponse:
    call = channel.unary_unary(
        FETCH,
        request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
        response_deserializer=csds_pb2.ClientStatusResponse.FromString,
    )
    response: csds_pb2.ClientStatusResponse = call(
        csds_pb2.ClientStatusRequest(**kwargs), timeout=10
    )
    return response


def test_fetch_client_status_reports_every_resource(
    xds: tuple[XdsTestServer, XdsClient, Watcher], csds_channel: grpc.Channel
) -> None:
    server, client, _ = xds
    response = fetch(csds_channel)
    [config] = response.config
    assert config.node.id == client.bootstrap.node.id
    assert config.node.user_agent_name == "pymesh"
    configs = by_name(response)
    assert set(configs) == {"good", "bad", "gone", "pending"}

    good = configs["good"]
    assert good.type_url == CDS  # type: ignore[attr-defined]
    assert good.client_status == config_dump_shared_pb2.ACKED  # type: ignore[attr-defined]
    assert good.version_info == server.version(CDS)  # type: ignore[attr-defined]
    assert good.xds_config.type_url == CDS  # type: ignore[attr-defined]
    unpacked = cluster_pb2.Cluster()
    assert good.xds_config.Unpack(unpacked)  # type: ignore[attr-defined]
    assert unpacked == cluster_proto("good")
    assert good.last_updated.seconds > 0  # type: ignore[attr-defined]

    bad = configs["bad"]
    assert bad.client_status == config_dump_shared_pb2.NACKED  # type: ignore[attr-defined]
    assert "lb_policy" in bad.error_state.details  # type: ignore[attr-defined]
    assert bad.error_state.version_info == server.version(CDS)  # type: ignore[attr-defined]

    gone = configs["gone"]
    assert gone.client_status == config_dump_shared_pb2.DOES_NOT_EXIST  # type: ignore[attr-defined]
    pending = configs["pending"]
    assert pending.client_status == config_dump_shared_pb2.REQUESTED  # type: ignore[attr-defined]
    assert not pending.HasField("xds_config")  # type: ignore[attr-defined]


def test_exclude_resource_contents(
    xds: tuple[XdsTestServer, XdsClient, Watcher], csds_channel: grpc.Channel
) -> None:
    configs = by_name(fetch(csds_channel, exclude_resource_contents=True))
    good = configs["good"]
    assert good.client_status == config_dump_shared_pb2.ACKED  # type: ignore[attr-defined]
    assert not good.HasField("xds_config")  # type: ignore[attr-defined]


def test_stream_client_status_answers_each_request_with_fresh_state(
    xds: tuple[XdsTestServer, XdsClient, Watcher], csds_channel: grpc.Channel
) -> None:
    server, _, watcher = xds
    call = csds_channel.stream_stream(
        STREAM,
        request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
        response_deserializer=csds_pb2.ClientStatusResponse.FromString,
    )
    requests: list[csds_pb2.ClientStatusRequest] = []
    cond = threading.Condition()

    def request_iter() -> Iterator[csds_pb2.ClientStatusRequest]:
        for _ in range(2):
            with cond:
                while not requests:
                    cond.wait(10)
                yield requests.pop()

    def send() -> None:
        with cond:
            requests.append(csds_pb2.ClientStatusRequest())
            cond.notify_all()

    responses: Iterator[csds_pb2.ClientStatusResponse] = iter(call(request_iter(), timeout=20))
    send()
    first = by_name(next(responses))
    assert first["bad"].client_status == config_dump_shared_pb2.NACKED  # type: ignore[attr-defined]
    # Fix the bad cluster; the next answer on the same stream shows it ACKED.
    server.set_resources(CDS, {"bad": cluster_proto("bad")})
    watcher.wait("changed", "bad")
    send()
    second = by_name(next(responses))
    assert second["bad"].client_status == config_dump_shared_pb2.ACKED  # type: ignore[attr-defined]
    assert not second["bad"].HasField("error_state")  # type: ignore[attr-defined]


def test_config_dump_is_json_and_matches_csds(
    xds: tuple[XdsTestServer, XdsClient, Watcher],
) -> None:
    server, client, _ = xds
    rows = config_dump(client)
    text = json.dumps(rows)  # JSON-able all the way down
    assert "lb_policy" in text
    by = {r["name"]: r for r in rows}
    assert by["good"]["type"] == "CDS" and by["good"]["status"] == "ACKED"
    assert by["good"]["config"]["name"] == "good"
    assert by["good"]["version"] == server.version(CDS)
    assert by["bad"]["status"] == "NACKED" and "lb_policy" in by["bad"]["error"]
    assert by["gone"]["status"] == "DOES_NOT_EXIST" and by["gone"]["config"] is None
    assert by["pending"]["type"] == "EDS" and by["pending"]["status"] == "REQUESTED"
    models = {d.status.name: d.value for d in decoded(client)}
    assert getattr(models["good"], "name", None) == "good"
    assert models["pending"] is None


def test_csds_on_a_grpc_aio_server(xds: tuple[XdsTestServer, XdsClient, Watcher]) -> None:
    """The same servicer works on ``grpc.aio`` servers (the async adapters' servers)."""
    import asyncio

    _, client, _ = xds

    async def run() -> tuple[csds_pb2.ClientStatusResponse, csds_pb2.ClientStatusResponse]:
        server = grpc.aio.server()
        add_csds_servicer(server, client)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                fetch_call = channel.unary_unary(
                    FETCH,
                    request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
                    response_deserializer=csds_pb2.ClientStatusResponse.FromString,
                )
                fetched = await fetch_call(csds_pb2.ClientStatusRequest(), timeout=10)
                stream_call = channel.stream_stream(
                    STREAM,
                    request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
                    response_deserializer=csds_pb2.ClientStatusResponse.FromString,
                )(timeout=10)
                await stream_call.write(csds_pb2.ClientStatusRequest())
                streamed = await stream_call.read()
                await stream_call.done_writing()
                assert await stream_call.read() is grpc.aio.EOF  # the server ends the stream
                return fetched, streamed
        finally:
            await server.stop(None)

    fetched, streamed = asyncio.run(run())
    for response in (fetched, streamed):
        by = by_name(response)
        assert by["good"].client_status == config_dump_shared_pb2.ACKED  # type: ignore[attr-defined]
        assert by["gone"].client_status == config_dump_shared_pb2.DOES_NOT_EXIST  # type: ignore[attr-defined]
