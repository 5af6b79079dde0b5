"""Change detection and push scope with the real Istio backend: inotify wakes the control
plane as soon as a file is written (no poll needed), an endpoint change is pushed to the
clients that hold that service and to no other, and ``MeshConfig.endpoint_changes`` names
exactly the hosts whose endpoints differ."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from pymesh.controlplane import ControlPlane
from pymesh.controlplane.config import load_config
from tests.integration.controlplane._helpers import CDS, EDS, RawAds, make_node

PORT = 8080


def host(i: int) -> str:
    return f"svc-{i}.bench.svc.cluster.local"


def cluster(i: int) -> str:
    return f"outbound|{PORT}||{host(i)}"


def service_entry(i: int, ports: list[int], *, selector: bool = False) -> str:
    eps = "".join(
        f"  - {{address: 10.0.{i}.{n + 1}, ports: {{http: {p}}}}}\n" for n, p in enumerate(ports)
    )
    body = (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        f"metadata: {{name: svc-{i}, namespace: bench}}\n"
        f"spec:\n  hosts: [{host(i)}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n"
        f"  ports: [{{number: {PORT}, name: http, protocol: HTTP}}]\n"
    )
    if selector:
        return body + f"  workloadSelector: {{labels: {{app: svc-{i}}}}}\n"
    return body + f"  endpoints:\n{eps}"


def workload_entry(name: str, app: str, address: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        f"metadata: {{name: {name}, namespace: bench}}\n"
        f"spec: {{address: {address}, labels: {{app: {app}}}, ports: {{http: 9000}}}}\n"
    )


def write(path: Path, docs: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("---\n".join(docs))
    tmp.replace(path)  # as editors and kubectl-like tools do: a new file renamed in place


def ports(resp: object) -> set[int]:
    out: set[int] = set()
    for a in resp.resources:  # type: ignore[attr-defined]
        cla = endpoint_pb2.ClusterLoadAssignment()
        a.Unpack(cla)
        for group in cla.endpoints:
            out.update(e.endpoint.address.socket_address.port_value for e in group.lb_endpoints)
    return out


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    write(path, [service_entry(i, [9000, 9000]) for i in range(3)])
    return path


@pytest.fixture
def clients() -> Iterator[list[RawAds]]:
    made: list[RawAds] = []
    yield made
    for c in made:
        c.close()


def subscribe(plane: ControlPlane, clients: list[RawAds], i: int) -> RawAds:
    """A proxyless client holding service ``i``'s EDS (ACKed)."""
    c = RawAds(plane.address)
    clients.append(c)
    node = make_node(f"client-{i}", GENERATOR="grpc", NAMESPACE="bench")
    c.send(node=node, type_url=EDS, resource_names=[cluster(i)])
    resp = c.recv()
    assert ports(resp) == {9000}
    c.ack(resp, resource_names=[cluster(i)])
    return c


def test_inotify_wakes_without_polling(config: Path, clients: list[RawAds]) -> None:
    # Polling every 60 s: only inotify can notice the write within the test.
    plane = ControlPlane(
        [config], xds_address="127.0.0.1:0", admin_port=None, debounce=0.05, poll_interval=60
    )
    with plane:
        assert plane.call(lambda: plane.hub.watching) == "inotify"
        c = subscribe(plane, clients, 0)
        before = plane.call(lambda: plane.hub.version)
        t0 = time.monotonic()
        write(
            config,
            [service_entry(0, [9001, 9001]), service_entry(1, [9000]), service_entry(2, [9000])],
        )
        resp = c.recv(timeout=5)
        assert ports(resp) == {9001}
        assert time.monotonic() - t0 < 5
        assert plane.call(lambda: plane.hub.version) == before + 1


def test_polling_alone_still_reloads(config: Path, clients: list[RawAds]) -> None:
    plane = ControlPlane(
        [config], xds_address="127.0.0.1:0", admin_port=None, debounce=0.05, poll_interval=0.05
    )
    plane.hub.use_inotify = False
    with plane:
        assert plane.call(lambda: plane.hub.watching) == "polling"
        c = subscribe(plane, clients, 0)
        write(
            config, [service_entry(0, [9002]), service_entry(1, [9000]), service_entry(2, [9000])]
        )
        assert ports(c.recv(timeout=5)) == {9002}


def test_endpoint_change_reaches_only_its_clients(config: Path, clients: list[RawAds]) -> None:
    plane = ControlPlane(
        [config], xds_address="127.0.0.1:0", admin_port=None, debounce=0.05, poll_interval=0.05
    )
    with plane:
        a, b = subscribe(plane, clients, 0), subscribe(plane, clients, 1)
        # An Envoy-like client: wildcard CDS, so cluster changes would reach it; EDS of all.
        envoy = RawAds(plane.address)
        clients.append(envoy)
        envoy.send(node=make_node("envoy-1", NAMESPACE="bench"), type_url=CDS)
        envoy.ack(envoy.recv())
        every = [cluster(i) for i in range(3)]
        envoy.send(type_url=EDS, resource_names=every)
        envoy.ack(envoy.recv(), resource_names=every)

        written_at = time.time()
        write(
            config,
            [service_entry(0, [9000, 9000]), service_entry(1, [9005]), service_entry(2, [9000])],
        )
        assert ports(b.recv()) == {9005}
        resp = envoy.recv()
        assert resp.type_url == EDS and ports(resp) == {9000, 9005}
        assert a.no_response(0.3)  # service 0 did not change: client a is not touched
        push = plane.call(lambda: dict(plane.hub.last_push))
        assert push["clients_skipped"] == 1
        # the push says when the files it carries were read (what `apply` tools wait on)
        assert push["config_loaded_at"] >= written_at - 0.01

        # A change of shape (a new service) cannot be scoped: every client is visited, and
        # still only those whose resources differ get a response.
        write(
            config,
            [
                service_entry(0, [9000, 9000]),
                service_entry(1, [9005]),
                service_entry(2, [9000]),
                service_entry(3, [9000]),
            ],
        )
        resp = envoy.recv()
        assert resp.type_url == CDS
        assert cluster(3) in {_cluster_name(r) for r in resp.resources}
        assert a.no_response(0.3)
        assert plane.call(lambda: dict(plane.hub.last_push))["clients_skipped"] == 0


def _cluster_name(any_msg: object) -> str:
    from envoy.config.cluster.v3 import cluster_pb2

    c = cluster_pb2.Cluster()
    any_msg.Unpack(c)  # type: ignore[attr-defined]
    return c.name


def test_endpoint_changes_names_the_changed_hosts(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    base = [service_entry(0, [9000]), service_entry(1, [9000]), service_entry(2, [], selector=True)]
    write(path, [*base, workload_entry("w1", "svc-2", "10.9.0.1")])
    old, _ = load_config([path])
    write(
        path,
        [
            service_entry(0, [9000]),
            service_entry(1, [9001]),
            *base[2:],
            workload_entry("w1", "svc-2", "10.9.0.1"),
        ],
    )
    new, _ = load_config([path])
    assert old is not None and new is not None
    assert new.endpoint_changes(old) == frozenset({host(1)})
    # A WorkloadEntry moves: the service selecting it changed, the others did not.
    write(path, [*base, workload_entry("w1", "svc-2", "10.9.0.2")])
    moved, _ = load_config([path])
    assert moved is not None
    assert moved.endpoint_changes(old) == frozenset({host(2)})
    assert moved.same_cluster_inputs(old)
    # Not the same shape (another port): no answer, everything may differ.
    write(path, [*base, workload_entry("w1", "svc-2", "10.9.0.1"), service_entry(3, [9000])])
    grown, _ = load_config([path])
    assert grown is not None and grown.endpoint_changes(old) is None
