"""The README's first command: ``pymesh demo`` resolves the demo mesh end to end."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_resolves_listener_routes_clusters_and_endpoints() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pymesh", "demo", "--json", "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    host = "reviews.default.svc.cluster.local"
    assert got["listener"] == f"{host}:9080"
    assert got["route_config"] == f"outbound|9080||{host}"
    # Routes in VirtualService order: the jason header route first, then the 80/20 split.
    assert "header end-user=jason" in got["routes"][0]["match"]
    assert f"outbound|9080|v1|{host} 80%" in got["routes"][1]["action"]
    assert f"outbound|9080|v3|{host} 20%" in got["routes"][1]["action"]
    assert "timeout 3s" in got["routes"][1]["action"]
    v3 = got["clusters"][f"outbound|9080|v3|{host}"]
    assert v3["lb_policy"] == "LeastRequest"
    assert v3["endpoints"] == [
        {
            "address": "127.0.0.3:9080",
            "locality": "us-east/zone-b",
            "priority": 0,
            "weight": 1,
            "health": "HEALTHY",
        }
    ]
