"""tests/xdsserver.py's scriptable ADS server in its own process, driven by JSON lines.

``python _xds_driver.py`` prints ``{"port": N}`` and then answers one JSON line per command
line on stdin (so the server's own CPU is not charged to the clients measured in the test
process). Commands (``op`` plus arguments):

- ``serve`` ``backend``: listener, route, cluster and one endpoint ``127.0.0.1:backend``;
- ``delay`` ``seconds``: sleep that long before every response from now on;
- ``eds`` ``backend``, ``extra``, ``tag``: the endpoint at priority 0 (locality weight
  ``tag``) plus ``extra`` unroutable endpoints at priority 1 (a 100k-endpoint response);
- ``flood`` ``backend``, ``rate``, ``seconds``: EDS updates at ``rate`` per second;
- ``route`` ``marker`` / ``bad_route``: a good route (its responses carry
  ``x-config: marker``) or one every client must NACK (an invalid regex);
- ``nacked`` / ``acked`` ``since``: streams that NACKed / ACKed RDS since request ``since``;
- ``mark``: the current request index; ``streams``: open streams.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2

from tests.integration.xds.test_snapshots import RDS_NAME, TARGET, cluster_proto, listener_proto
from tests.xdsserver import CDS, EDS, LDS, RDS, XdsTestServer

CLUSTER = "outbound|9080||reviews.default.svc.cluster.local"


def cla(backend: int, extra: int = 0, tag: int = 1) -> endpoint_pb2.ClusterLoadAssignment:
    def ep(ip: str, port: int) -> endpoint_components_pb2.LbEndpoint:
        return endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
                )
            )
        )

    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=CLUSTER)
    out.endpoints.add(
        locality=base_pb2.Locality(region="r1", zone="z1"),
        load_balancing_weight={"value": tag},
        lb_endpoints=[ep("127.0.0.1", backend)],
    )
    if extra:
        far = out.endpoints.add(locality=base_pb2.Locality(region="r2", zone="z2"), priority=1)
        far.lb_endpoints.extend(
            ep(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 9080) for i in range(1, extra + 1)
        )
    return out


def route(marker: str, *, bad: bool = False) -> route_pb2.RouteConfiguration:
    match = route_components_pb2.RouteMatch(prefix="/")
    if bad:
        match = route_components_pb2.RouteMatch(safe_regex={"regex": "(unclosed"})
    r = route_components_pb2.Route(
        match=match, route=route_components_pb2.RouteAction(cluster=CLUSTER)
    )
    r.response_headers_to_add.add(header={"key": "x-config", "value": marker})
    return route_pb2.RouteConfiguration(
        name=RDS_NAME,
        virtual_hosts=[
            route_components_pb2.VirtualHost(name="vh", domains=[TARGET, "*"], routes=[r])
        ],
    )


def streams_since(server: XdsTestServer, since: int, nack: bool) -> int:
    return len(
        {
            r.stream
            for r in server.requests[since:]
            if r.type_url == RDS and r.is_nack == nack and r.request.response_nonce
        }
    )


def handle(server: XdsTestServer, cmd: dict[str, Any]) -> Any:
    op = cmd["op"]
    if op == "serve":
        server.set_resources(CDS, {CLUSTER: cluster_proto(CLUSTER)})
        server.set_resources(EDS, {CLUSTER: cla(cmd["backend"])})
        server.set_resources(RDS, {RDS_NAME: route("initial")})
        return server.set_resources(LDS, {TARGET: listener_proto()})
    if op == "delay":
        server.delay = float(cmd["seconds"])
        return server.delay
    if op == "eds":
        return server.set_resources(
            EDS, {CLUSTER: cla(cmd["backend"], cmd.get("extra", 0), cmd.get("tag", 1))}
        )
    if op == "flood":
        n = int(cmd["rate"] * cmd["seconds"])
        start = time.monotonic()
        for i in range(n):
            server.set_resources(EDS, {CLUSTER: cla(cmd["backend"], 0, 1 + i % 50)})
            pause = start + (i + 1) / cmd["rate"] - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        return {"updates": n, "seconds": time.monotonic() - start}
    if op == "route":
        return server.set_resources(RDS, {RDS_NAME: route(cmd["marker"])})
    if op == "bad_route":
        return server.set_resources(RDS, {RDS_NAME: route("bad", bad=True)})
    if op == "nacked":
        return streams_since(server, cmd["since"], True)
    if op == "acked":
        return streams_since(server, cmd["since"], False)
    if op == "mark":
        return len(server.requests)
    if op == "streams":
        return server.active_streams()
    raise ValueError(op)


def main() -> None:
    with XdsTestServer() as server:
        print(json.dumps({"port": int(server.address.rsplit(":", 1)[1])}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                reply = {"ok": handle(server, json.loads(line))}
            except Exception as exc:  # reported to the test, which fails on it
                reply = {"error": repr(exc)}
            print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
