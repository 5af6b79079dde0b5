"""``pymesh demo``: start the embedded control plane and a client, print what the client resolved.

Everything runs in this process on loopback: the control plane reads a small Istio config
(``demo-mesh.yaml`` beside this file, or ``--config``), an xDS client connects to it exactly as
a workload would (bootstrap written by :func:`pymesh.bootstrap.generate_bootstrap`), watches
one target, and prints the listener, route configuration, clusters and endpoints it received.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.model.route import Route, RouteAction
from pymesh.model.snapshot import ClusterConfig, TargetSnapshot
from pymesh.xds.client import XdsClient
from pymesh.xds.watch import watch_target

DEMO_CONFIG = Path(__file__).with_name("demo-mesh.yaml")
DEMO_TARGET = "reviews.default.svc.cluster.local:9080"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="start a control plane and a client on loopback; print what the client resolved",
        description=__doc__,
    )
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="Istio YAML file or dir")
    parser.add_argument("--target", default=DEMO_TARGET, help="HOST:PORT to resolve")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for config")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with ControlPlane(args.config, xds_address="127.0.0.1:0", admin_port=None) as cp:
        data = generate_bootstrap(xds_address=cp.address, namespace="default", workload="demo")
        bootstrap = parse_bootstrap(json.dumps(data), source="pymesh demo")
        with XdsClient(bootstrap) as client, watch_target(client, args.target) as handle:
            snapshot = handle.wait_ready(args.timeout)
            if args.json:
                print(json.dumps(describe(snapshot), indent=2))
            else:
                print(f"control plane  {cp.address} (config: {args.config})")
                print(render(snapshot))
    return 0


def _action_summary(route: Route) -> str:
    action = route.action
    if not isinstance(action, RouteAction):
        return type(action).__name__
    if action.weighted_clusters:
        wcs = action.weighted_clusters
        total = sum(w.weight for w in wcs)
        dest = ", ".join(f"{w.name} {100 * w.weight / total:.0f}%" for w in wcs)
    else:
        dest = str(action.cluster)
    extras = []
    if action.timeout:
        extras.append(f"timeout {action.timeout:g}s")
    if action.retry_policy is not None:
        rp = action.retry_policy
        extras.append(f"retries {rp.num_retries} on {','.join(sorted(rp.retry_on))}")
    return dest + (f"  ({'; '.join(extras)})" if extras else "")


def describe(snapshot: TargetSnapshot) -> dict[str, Any]:
    """A JSON-able summary of a snapshot (what ``--json`` prints)."""
    clusters: dict[str, Any] = {}
    for name, config in sorted(snapshot.clusters.items()):
        if not isinstance(config, ClusterConfig):
            clusters[name] = {"error": str(config)}
            continue
        endpoints = []
        if config.endpoints is not None:
            for loc in config.endpoints.localities:
                for ep in loc.endpoints:
                    endpoints.append(
                        {
                            "address": str(ep.address),
                            "locality": str(loc.locality),
                            "priority": loc.priority,
                            "weight": ep.load_balancing_weight,
                            "health": ep.health_status.name,
                        }
                    )
        clusters[name] = {
            "lb_policy": type(config.cluster.lb_policy).__name__,
            "endpoints": endpoints,
        }
    return {
        "target": snapshot.target,
        "listener": snapshot.listener_name,
        "route_config": snapshot.route_config.name,
        "virtual_host": snapshot.virtual_host.name,
        "routes": [
            {"match": _match_summary(r), "action": _action_summary(r)}
            for r in snapshot.virtual_host.routes
        ],
        "clusters": clusters,
    }


def _match_summary(route: Route) -> str:
    m = route.match
    parts = [f"{m.path_kind.name.lower()} {m.path or (m.regex.pattern if m.regex else '')}"]
    for h in m.headers:
        pattern = h.string_match.pattern if h.string_match else "present"
        parts.append(f"header {h.name}={pattern}")
    return " & ".join(parts)


def render(snapshot: TargetSnapshot) -> str:
    d = describe(snapshot)
    lines = [
        f"target         {d['target']}",
        f"listener       {d['listener']}",
        f"route config   {d['route_config']}  (virtual host {d['virtual_host']})",
        "routes:",
    ]
    for i, r in enumerate(d["routes"]):
        lines.append(f"  [{i}] {r['match']:<40} -> {r['action']}")
    lines.append("clusters:")
    for name, c in d["clusters"].items():
        if "error" in c:
            lines.append(f"  {name}: {c['error']}")
            continue
        lines.append(f"  {name}  [{c['lb_policy']}]")
        for ep in c["endpoints"]:
            lines.append(
                f"      {ep['address']:<18} {ep['locality']:<16} weight {ep['weight']}"
                f"  {ep['health']}"
            )
    return "\n".join(lines)
