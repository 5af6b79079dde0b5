"""Test helpers: a tiny config backend (so the server is tested alone) and a raw ADS client."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from pymesh.controlplane.registry import GroupTemplate, NodeInfo, RegisteredWorkload
from pymesh.controlplane.server._backend import LoadResult, node_info_from, to_jsonable

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


# -- a tiny backend ------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyNode:
    id: str
    namespace: str
    labels: Mapping[str, str]
    service_account: str
    ips: tuple[str, ...]
    generator: str
    locality: str
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class TinyConfig:
    """``services: {name: [port, ...endpoint ports]}``, ``groups: [{name, labels, ports}]``."""

    services: Mapping[str, Sequence[int]]
    groups: Sequence[Mapping[str, Any]]
    workloads: tuple[RegisteredWorkload, ...] = field(default=())


class TinyGenerator:
    def __init__(self, config: TinyConfig) -> None:
        self.config = config
        self.calls = 0

    def generate(self, node: Any, type_url: str, names: Collection[str] | None) -> dict[str, Any]:
        self.calls += 1
        if getattr(node, "metadata", {}).get("EXPLODE"):
            raise RuntimeError("generator exploded for this node")
        out: dict[str, Any] = {}
        for svc, ports in self.config.services.items():
            cname = f"outbound|80||{svc}"
            if type_url == CDS:
                out[cname] = cluster_pb2.Cluster(
                    name=cname, type=cluster_pb2.Cluster.EDS, connect_timeout={"seconds": 1}
                )
            elif type_url == EDS:
                eps = [
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address={"socket_address": {"address": "127.0.0.1", "port_value": p}}
                        )
                    )
                    for p in ports
                ]
                for w in self.config.workloads:
                    if w.labels.get("app") == svc:
                        eps.append(
                            endpoint_components_pb2.LbEndpoint(
                                endpoint=endpoint_components_pb2.Endpoint(
                                    address={
                                        "socket_address": {
                                            "address": w.address,
                                            "port_value": next(iter(w.ports.values()), 1),
                                        }
                                    }
                                ),
                                health_status={
                                    "HEALTHY": base_pb2.HEALTHY,
                                    "UNHEALTHY": base_pb2.UNHEALTHY,
                                    "DRAINING": base_pb2.DRAINING,
                                }[w.health],
                            )
                        )
                out[cname] = endpoint_pb2.ClusterLoadAssignment(
                    cluster_name=cname,
                    endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=eps)],
                )
            elif type_url == LDS:
                out[f"{svc}:80"] = listener_pb2.Listener(name=f"{svc}:80")
            elif type_url == RDS:
                out[cname] = route_pb2.RouteConfiguration(name=cname)
        if names is not None:
            out = {k: v for k, v in out.items() if k in names}
        return out


class TinyBackend:
    def __init__(self) -> None:
        self.loads = 0

    def load(self, paths: Sequence[Path]) -> LoadResult:
        self.loads += 1
        services: dict[str, list[int]] = {}
        groups: list[dict[str, Any]] = []
        for p in paths:
            files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
            for f in files:
                try:
                    doc = yaml.safe_load(f.read_text())
                except (OSError, yaml.YAMLError) as exc:
                    return LoadResult(None, (("Error", f"{f}: {exc}"),))
                if not isinstance(doc, dict) or "error" in doc:
                    return LoadResult(None, (("Error", f"{f}: bad document"),))
                services.update(doc.get("services") or {})
                groups.extend(doc.get("groups") or [])
        return LoadResult(TinyConfig(services, groups), ())

    def node(self, node_proto: Any) -> TinyNode:
        md = json_format.MessageToDict(node_proto.metadata)
        ips = md.get("INSTANCE_IPS", "")
        return TinyNode(
            id=node_proto.id,
            namespace=md.get("NAMESPACE", "default"),
            labels=md.get("LABELS", {}),
            service_account=md.get("SERVICE_ACCOUNT", ""),
            ips=tuple(i for i in ips.split(",") if i),
            generator=md.get("GENERATOR", ""),
            locality="",
            metadata=md,
        )

    def node_info(self, node: Any) -> NodeInfo:
        return node_info_from(node)

    def groups(self, config: TinyConfig) -> Sequence[GroupTemplate]:
        return [
            GroupTemplate(
                g.get("namespace", "default"), g["name"], g.get("labels", {}), g.get("ports", {})
            )
            for g in config.groups
        ]

    def with_workloads(
        self, config: TinyConfig, workloads: Sequence[RegisteredWorkload]
    ) -> TinyConfig:
        return TinyConfig(config.services, config.groups, tuple(workloads))

    def generator(self, config: TinyConfig) -> TinyGenerator:
        return TinyGenerator(config)

    def describe(self, config: TinyConfig) -> object:
        return to_jsonable(config)


# -- a raw ADS client ----------------------------------------------------------------------


def make_node(node_id: str, **metadata: Any) -> Any:
    md = struct_pb2.Struct()
    md.update(metadata)
    from envoy.config.core.v3 import base_pb2 as core

    return core.Node(id=node_id, metadata=md)


class RawAds:
    """A hand-driven ADS stream: ``send`` requests, ``recv`` responses."""

    def __init__(self, address: str, *, delta: bool = False) -> None:
        self.channel = grpc.insecure_channel(address)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self._out: queue.Queue[Any] = queue.Queue()
        self._in: queue.Queue[Any] = queue.Queue()
        self.delta = delta
        method = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self._call = method(self._requests())
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[Any]:
        while True:
            item = self._out.get()
            if item is None:
                return
            yield item

    def _pump(self) -> None:
        try:
            for resp in self._call:
                self._in.put(resp)
        except grpc.RpcError as exc:
            self.error = exc
        self._in.put(None)

    def send(self, **fields: Any) -> None:
        if "error" in fields:
            fields["error_detail"] = status_pb2.Status(code=3, message=fields.pop("error"))
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        self._out.put(cls(**fields))

    def recv(self, timeout: float = 5.0) -> Any:
        item = self._in.get(timeout=timeout)
        assert item is not None, f"stream ended: {self.error}"
        return item

    def no_response(self, within: float = 0.3) -> bool:
        try:
            self._in.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def ack(self, resp: Any, **fields: Any) -> None:
        if self.delta:
            self.send(type_url=resp.type_url, response_nonce=resp.nonce, **fields)
        else:
            self.send(
                type_url=resp.type_url,
                response_nonce=resp.nonce,
                version_info=resp.version_info,
                **fields,
            )

    def ended(self, timeout: float = 5.0) -> grpc.RpcError | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._in.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                return self.error
        raise AssertionError("stream did not end")

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()
        self.channel.close()
        self._thread.join(timeout=5)


# -- admin ---------------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def http_post(url: str) -> tuple[int, str]:
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def syncz(admin_url: str) -> list[dict[str, Any]]:
    code, body = http_get(admin_url + "/debug/syncz")
    assert code == 200, body
    out: list[dict[str, Any]] = json.loads(body)
    return out


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
