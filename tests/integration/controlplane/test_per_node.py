"""Per-node output through the real Istio backend: what a node sees depends on who it is."""

from __future__ import annotations

import textwrap
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2

from pymesh.controlplane import ControlPlane
from tests.integration.controlplane._helpers import CDS, RawAds, make_node

MESH = textwrap.dedent(
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: private, namespace: team-a}
    spec:
      hosts: [private.team-a.svc.cluster.local]
      exportTo: ["."]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 80, name: http, protocol: HTTP}]
      endpoints: [{address: 127.0.0.1}]
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: public, namespace: team-a}
    spec:
      hosts: [public.team-a.svc.cluster.local]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 80, name: http, protocol: HTTP}]
      endpoints: [{address: 127.0.0.1}]
    """
)


def cluster_names(resp: object) -> set[str]:
    out = set()
    for a in resp.resources:  # type: ignore[attr-defined]
        c = cluster_pb2.Cluster()
        a.Unpack(c)
        out.add(c.name)
    return out


def test_wildcard_cds_depends_on_the_nodes_namespace(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    with ControlPlane([tmp_path], xds_address="127.0.0.1:0", admin_port=None) as cp:
        seen = {}
        for ns in ("team-a", "team-b"):
            c = RawAds(cp.address)
            try:
                c.send(
                    node=make_node(
                        f"sidecar~127.0.0.1~envoy.{ns}~{ns}.svc.cluster.local", NAMESPACE=ns
                    ),
                    type_url=CDS,
                )
                seen[ns] = {n for n in cluster_names(c.recv()) if n.startswith("outbound|80|")}
            finally:
                c.close()
        assert seen["team-a"] == {
            "outbound|80||private.team-a.svc.cluster.local",
            "outbound|80||public.team-a.svc.cluster.local",
        }
        assert seen["team-b"] == {"outbound|80||public.team-a.svc.cluster.local"}
