"""Outlier detection decisions against a real Envoy (compare against a real peer).

Each scenario is a cluster of its own in one Envoy (``ORIGINAL_DST`` with the target taken
from the ``x-envoy-original-dst-host`` header, so the test chooses the endpoint of every
request), with its own ``outlier_detection``. The test sends a scripted sequence of
(endpoint, answer) events through Envoy and feeds the same sequence to pymesh's
``OutlierDetector``; Envoy's ``outlier_detection.*`` statistics (detections, enforced
ejections, overflows, active ejections) must equal pymesh's.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from google.protobuf import json_format

from pymesh.core.outlier import EjectionType, OutlierDetector
from pymesh.core.types import Host, Outcome, ResetKind
from pymesh.model.cluster import OutlierDetection
from pymesh.model.common import SocketAddress
from tests.envoy_process import EnvoyProcess as EnvoyHandle
from tests.envoy_process import admin_get as _get
from tests.envoy_process import run_envoy
from tests.envoy_process import wait_until as _wait

pytestmark = pytest.mark.envoy

_REGISTERED = (router_pb2, http_connection_manager_pb2)

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
N_HOSTS = 20

# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    config: dict[str, Any]
    """``outlier_detection`` as Envoy JSON (durations as strings)."""
    events: tuple[tuple[int, str], ...]
    """(endpoint index, answer): a status, ``reset`` (RST after the request), ``g14`` (200
    with ``grpc-status: 14``, asked as a gRPC request), ``refused`` (index -1: the endpoint
    where nothing listens, a connect failure). Each endpoint first answers one 200 (so Envoy
    knows it before the scenario starts; the detector sees that answer too)."""
    hosts: int = 1
    refused: bool = False
    """A ``STATIC`` cluster whose one endpoint refuses connections (instead of
    ``ORIGINAL_DST``)."""


def _rounds(n_hosts: int, rounds: int, answer: str) -> tuple[tuple[int, str], ...]:
    return tuple((h, answer) for _ in range(rounds) for h in range(n_hosts))


SCENARIOS = [
    Scenario("cap9", {}, _rounds(9, 5, "503"), 9),
    Scenario("cap10", {}, _rounds(10, 5, "503"), 10),
    Scenario("cap20", {}, _rounds(20, 6, "503"), 20),
    Scenario("always9", {"always_eject_one_host": True}, _rounds(9, 5, "503"), 9),
    Scenario(
        "half4",
        {"max_ejection_percent": 50},
        _rounds(4, 5, "500"),
        4,
    ),
    Scenario(
        "gw",
        {
            "max_ejection_percent": 100,
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            "consecutive_5xx": 100,
        },
        tuple((0, s) for s in ("502", "502", "500", "502", "502", "504")),
    ),
    Scenario(
        "gw_not_enforced",
        {"max_ejection_percent": 100, "consecutive_5xx": 100},
        tuple((0, s) for s in ("503",) * 11),
    ),
    Scenario(
        "default_5xx_and_gw",
        {"max_ejection_percent": 100},
        tuple((0, s) for s in ("503",) * 5),
    ),
    Scenario(
        "5xx_run",
        {"max_ejection_percent": 100, "consecutive_5xx": 3},
        tuple((0, s) for s in ("500", "500", "200", "500", "404", "500", "500", "500")),
    ),
    Scenario(
        "resets_no_split",
        {"max_ejection_percent": 100, "consecutive_5xx": 3},
        ((0, "reset"), (0, "reset"), (0, "reset")),
    ),
    Scenario(
        "refused_no_split",
        {"max_ejection_percent": 100, "consecutive_5xx": 3},
        ((-1, "refused"), (-1, "refused"), (-1, "refused")),
        refused=True,
    ),
    Scenario(
        "resets_split",
        {
            "max_ejection_percent": 100,
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "consecutive_5xx": 2,
        },
        ((0, "reset"), (0, "reset"), (0, "reset"), (0, "503"), (0, "reset")),
    ),
    Scenario(
        "refused_split",
        {
            "max_ejection_percent": 100,
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 3,
        },
        ((-1, "refused"), (-1, "refused"), (-1, "refused")),
        refused=True,
    ),
    Scenario(
        "split_5xx_ignores_resets",
        {
            "max_ejection_percent": 100,
            "split_external_local_origin_errors": True,
            "consecutive_5xx": 3,
        },
        tuple((0, a) for a in ("503", "reset", "503", "reset", "503")),
    ),
    Scenario(
        "grpc_status",
        {"max_ejection_percent": 100, "consecutive_5xx": 3},
        tuple((0, a) for a in ("g14", "g14", "g14")),
    ),
    Scenario(
        "enforcing_zero",
        {"max_ejection_percent": 100, "consecutive_5xx": 2, "enforcing_consecutive_5xx": 0},
        tuple((0, "500") for _ in range(6)),
    ),
]


@dataclass(frozen=True)
class IntervalScenario:
    """The interval algorithms (success rate, failure percentage): five endpoints answer
    their own pattern (cycled) for a few 1 s intervals."""

    name: str
    config: dict[str, Any]
    patterns: tuple[tuple[str, ...], ...]


_INTERVAL = {
    "interval": "1s",
    "base_ejection_time": "300s",
    "max_ejection_percent": 100,
    # Only the interval algorithms may act (500 is no gateway error).
    "consecutive_5xx": 100000,
    "success_rate_minimum_hosts": 5,
    # Low volumes: a loaded machine may send only a few rounds per 1 s window.
    "success_rate_request_volume": 5,
    "failure_percentage_minimum_hosts": 5,
    "failure_percentage_request_volume": 5,
}
_OK = ("200",)
INTERVAL_SCENARIOS = [
    # Rates {25, 100, 100, 100, 100}: threshold 85 - 1.9 * 30 = 28 -> the 25 % host is ejected.
    IntervalScenario("sr_one", _INTERVAL, (("500", "500", "500", "200"), _OK, _OK, _OK, _OK)),
    # Rates {0, 50, 100, 100, 100}: threshold 70 - 1.9 * 40 < 0 -> nobody.
    IntervalScenario("sr_two", _INTERVAL, (("500",), ("500", "200"), _OK, _OK, _OK)),
    # Failures {90 %, 75 %}: only the first passes the 85 % threshold.
    IntervalScenario(
        "fp",
        {**_INTERVAL, "enforcing_success_rate": 0, "enforcing_failure_percentage": 100},
        (("500",) * 9 + ("200",), ("500", "500", "500", "200"), _OK, _OK, _OK),
    ),
    # Split local-origin failure percentage. Refused connections are 100 % local failures;
    # a reset after connecting counts a local success first, so an endpoint that always
    # resets sits at 50 %: only the refused endpoint passes the 85 % threshold.
    IntervalScenario(
        "fp_local",
        {
            **_INTERVAL,
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 100000,
            "enforcing_success_rate": 0,
            "enforcing_local_origin_success_rate": 0,
            "enforcing_failure_percentage_local_origin": 100,
        },
        (("refused",), ("reset",), _OK, _OK, _OK),
    ),
]


# Ejection and return times on Envoy's real 1 s interval timer.
TIMING = IntervalScenario(
    "timing",
    {
        "interval": "1s",
        "base_ejection_time": "1s",
        "max_ejection_time": "10s",
        "max_ejection_percent": 100,
        "consecutive_5xx": 3,
    },
    (),
)


def _model_config(config: dict[str, Any]) -> OutlierDetection:
    kw = dict(config)
    for key in ("interval", "base_ejection_time", "max_ejection_time"):
        if key in kw:
            kw[key] = float(kw[key].rstrip("s"))
    return OutlierDetection(**kw)


def _envoy_config(config: dict[str, Any]) -> dict[str, Any]:
    # Long interval: these scenarios are about the per-request detections only.
    return {"interval": "300s", "base_ejection_time": "300s", **config}


# --------------------------------------------------------------------------- upstreams


class _Scripted(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        action = self.headers.get("x-test-action") or "200"
        if action == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if action.startswith("g"):
            self.send_response(200)
            self.send_header("content-type", "application/grpc")
            self.send_header("grpc-status", action[1:])
        else:
            self.send_response(int(action))
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[str]]:
    """``N_HOSTS`` HTTP servers on 127.0.0.2, 127.0.0.3, ...; returns their ``ip:port``."""
    servers = []
    threads = []
    try:
        for i in range(N_HOSTS):
            server = ThreadingHTTPServer((f"127.0.0.{i + 2}", 0), _Scripted)
            server.daemon_threads = True
            t = threading.Thread(target=server.serve_forever, daemon=True)
            t.start()
            servers.append(server)
            threads.append(t)
        yield [f"{s.server_address[0]}:{s.server_address[1]}" for s in servers]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(5)


@pytest.fixture(scope="module")
def refused_address() -> str:
    """An address where nothing listens (connect fails at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def _bootstrap(refused: str) -> str:
    clusters: list[dict[str, Any]] = []
    routes = []
    ip, port = refused.split(":")
    for sc in [*SCENARIOS, *INTERVAL_SCENARIOS, TIMING]:
        refused_cluster = isinstance(sc, Scenario) and sc.refused
        cluster: dict[str, Any] = {
            "name": sc.name,
            "connect_timeout": "1s",
            "outlier_detection": _envoy_config(sc.config),
        }
        if refused_cluster:
            endpoint = {"address": {"socket_address": {"address": ip, "port_value": int(port)}}}
            cluster["type"] = "STATIC"
            cluster["load_assignment"] = {
                "cluster_name": sc.name,
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            }
        else:
            cluster["type"] = "ORIGINAL_DST"
            cluster["lb_policy"] = "CLUSTER_PROVIDED"
            cluster["cleanup_interval"] = "600s"
            cluster["original_dst_lb_config"] = {"use_http_header": True}
        clusters.append(cluster)
        routes.append(
            {
                "match": {"prefix": f"/{sc.name}/"},
                "route": {"cluster": sc.name, "timeout": "5s"},
            }
        )
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "outlier",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "outlier",
                                        "use_remote_address": True,
                                        "internal_address_config": {
                                            "cidr_ranges": [
                                                {"address_prefix": "127.0.0.0", "prefix_len": 8}
                                            ]
                                        },
                                        "route_config": {
                                            "name": "r",
                                            "virtual_hosts": [
                                                {"name": "v", "domains": ["*"], "routes": routes}
                                            ],
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
    json_format.ParseDict(boot, bootstrap_pb2.Bootstrap())
    return json.dumps(boot)


@pytest.fixture(scope="module")
def envoy(
    tmp_path_factory: pytest.TempPathFactory, envoy_bin: Path, refused_address: str
) -> Iterator[EnvoyHandle]:
    # One Envoy for the module: every scenario has a cluster of its own.
    tmp_path = tmp_path_factory.mktemp("outlier-envoy")
    with run_envoy(envoy_bin, _bootstrap(refused_address), tmp_path) as running:
        yield running


# --------------------------------------------------------------------------- comparing

_STATS = {
    "ejections_active": None,
    "ejections_overflow": None,
    "ejections_enforced_total": None,
    **{f"ejections_detected_{t.value}": t for t in EjectionType},
    **{f"ejections_enforced_{t.value}": t for t in EjectionType},
}


def _envoy_stats(admin: tuple[str, int], cluster: str) -> dict[str, int]:
    body = _get(admin, f"/stats?filter=^cluster\\.{cluster}\\.outlier_detection\\.")
    out = {}
    prefix = f"cluster.{cluster}.outlier_detection."
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        name = name.removeprefix(prefix)
        if name in _STATS:
            out[name] = int(value)
    return out


def _pymesh_stats(d: OutlierDetector) -> dict[str, int]:
    s = d.stats()
    out = {
        "ejections_active": s.ejections_active,
        "ejections_overflow": s.ejections_overflow,
        "ejections_enforced_total": s.ejections_enforced_total,
    }
    for t in EjectionType:
        out[f"ejections_detected_{t.value}"] = s.detected[t]
        out[f"ejections_enforced_{t.value}"] = s.enforced[t]
    return out


def _send(port: int, scenario: str, target: str, action: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"x-envoy-original-dst-host": target, "x-test-action": action}
    if action.startswith("g"):
        headers["content-type"] = "application/grpc"
    try:
        conn.request("POST" if action.startswith("g") else "GET", f"/{scenario}/x", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _outcome(action: str) -> Outcome:
    if action == "reset":
        return Outcome(reset=ResetKind.RESET)
    if action == "refused":
        return Outcome(reset=ResetKind.CONNECT_FAILURE)
    if action.startswith("g"):
        return Outcome(status=200, grpc_status=int(action[1:]))
    return Outcome(status=int(action))


def test_detector_counts_what_envoy_counts(
    envoy: EnvoyHandle, upstreams: list[str], refused_address: str
) -> None:
    mismatches = []
    for sc in SCENARIOS:
        targets = upstreams[: sc.hosts]
        addresses = {refused_address: -1} | {t: i for i, t in enumerate(targets)}
        hosts = {
            i: Host(SocketAddress(a.split(":")[0], int(a.split(":")[1])))
            for a, i in addresses.items()
        }
        used = sorted({i for i, _ in sc.events})
        # Every answer is known: enforcement percentages are 0 or 100, the RNG never decides.
        detector = OutlierDetector(
            _model_config(sc.config), rng=random.Random(0), hosts=[hosts[i] for i in used], now=0.0
        )
        warm = [i for i in used if i >= 0]
        for i in warm:
            _send(envoy.port, sc.name, targets[i], "200")
            detector.record(hosts[i], Outcome(status=200), 1.0)
        if warm:
            time.sleep(0.3)  # ORIGINAL_DST adds new endpoints on Envoy's main thread
        for index, action in sc.events:
            target = refused_address if index < 0 else targets[index]
            _send(envoy.port, sc.name, target, action)
            detector.record(hosts[index], _outcome(action), 1.0)
        want = _pymesh_stats(detector)

        def settled(name: str = sc.name, want: dict[str, int] = want) -> bool:
            return _envoy_stats(envoy.admin, name) == want

        try:
            _wait(settled, 2.0, sc.name)
        except AssertionError:
            got = _envoy_stats(envoy.admin, sc.name)
            diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
            mismatches.append(f"{sc.name}: (envoy, pymesh) {diff}")
    assert not mismatches, "\n".join(mismatches)


def test_interval_algorithms_match_envoy(
    envoy: EnvoyHandle, upstreams: list[str], refused_address: str
) -> None:
    def targets(sc: IntervalScenario) -> list[str]:
        return [
            refused_address if pattern == ("refused",) else upstreams[i]
            for i, pattern in enumerate(sc.patterns)
        ]

    for sc in INTERVAL_SCENARIOS:
        for t, pattern in zip(targets(sc), sc.patterns, strict=True):
            _send(envoy.port, sc.name, t, pattern[0] if pattern == ("refused",) else "200")
    time.sleep(0.3)
    # Traffic for several of Envoy's 1 s ticks; every window holds whole pattern cycles'
    # worth of rates, far from any threshold, whatever the alignment.
    start = time.monotonic()
    rounds = 0
    while rounds < 2000 and (
        time.monotonic() - start < 2.8 or (rounds < 30 and time.monotonic() - start < 15)
    ):
        for sc in INTERVAL_SCENARIOS:
            for t, pattern in zip(targets(sc), sc.patterns, strict=True):
                _send(envoy.port, sc.name, t, pattern[rounds % len(pattern)])
        rounds += 1
    assert rounds >= 30, f"too little traffic for the volume thresholds ({rounds} rounds)"
    mismatches = []
    for sc in INTERVAL_SCENARIOS:
        hosts = [Host(SocketAddress(t.split(":")[0], int(t.split(":")[1]))) for t in targets(sc)]
        detector = OutlierDetector(
            _model_config(sc.config), rng=random.Random(0), hosts=hosts, now=0.0
        )
        for tick in (1.0, 2.0, 3.0):
            for r in range(40):
                for h, pattern in zip(hosts, sc.patterns, strict=True):
                    detector.record(h, _outcome(pattern[r % len(pattern)]), tick - 0.5)
            detector.sweep(hosts, tick)
        want = _pymesh_stats(detector)
        # The scenarios mean what their comments say.
        expected = {
            "sr_one": "success_rate",
            "sr_two": None,
            "fp": "failure_percentage",
            "fp_local": "local_origin_failure_percentage",
        }[sc.name]
        assert want["ejections_active"] == (expected is not None)
        if expected is not None:
            assert want[f"ejections_enforced_{expected}"] == 1

        def settled(name: str = sc.name, want: dict[str, int] = want) -> bool:
            return _envoy_stats(envoy.admin, name) == want

        try:
            _wait(settled, 2.5, sc.name)
        except AssertionError:
            got = _envoy_stats(envoy.admin, sc.name)
            diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
            mismatches.append(f"{sc.name}: (envoy, pymesh) {diff}")
    assert not mismatches, "\n".join(mismatches)


def _ejected(admin: tuple[str, int], cluster: str) -> bool:
    body = json.loads(_get(admin, "/clusters?format=json"))
    for status in body.get("cluster_statuses", []):
        if status["name"] == cluster:
            return any(
                h.get("health_status", {}).get("failed_outlier_check")
                for h in status.get("host_statuses", [])
            )
    return False


def test_ejection_times_as_envoy(envoy: EnvoyHandle, upstreams: list[str]) -> None:
    """Ejected for base x backoff, back at the first interval tick after that: Envoy's
    observed ejection lengths fall in the windows pymesh's detector computes on a fake
    clock (same tick phase), and the backoff grows then decays the same way."""
    target = upstreams[0]
    _send(envoy.port, TIMING.name, target, "200")
    time.sleep(0.3)
    host = Host(SocketAddress(*target.split(":")[:1], int(target.split(":")[1])))
    model = OutlierDetector(
        _model_config(TIMING.config), rng=random.Random(0), hosts=[host], now=0.0
    )

    def eject_and_time() -> float:
        for _ in range(3):
            _send(envoy.port, TIMING.name, target, "503")
        start = time.monotonic()
        _wait(lambda: _ejected(envoy.admin, TIMING.name), 2.0, "ejection")
        _wait(lambda: not _ejected(envoy.admin, TIMING.name), 15.0, "return")
        return time.monotonic() - start

    def model_length(now: float) -> tuple[float, float]:
        for _ in range(3):
            model.record(host, Outcome(status=503), now)
        length = model.ejection_length(host)
        assert host.ejected_until is not None and length is not None
        return host.ejected_until - now, length

    # 1st ejection: 1 s (back at the next tick after 1 s: between 1 and 2 s).
    observed = eject_and_time()
    _, duration = model_length(0.5)
    assert duration == 1.0 and 0.9 <= observed <= duration + 1.0 + 0.3, observed
    model.sweep([host], 1.0)
    model.sweep([host], 2.0)  # back
    # Again at once: the backoff doubles it.
    observed = eject_and_time()
    _, duration = model_length(2.2)
    assert duration == 2.0 and 1.9 <= observed <= duration + 1.0 + 0.3, observed
    for tick in (3.0, 4.0, 5.0, 6.0, 7.0):
        model.sweep([host], tick)
    # Three healthy ticks bring the backoff from 2 down to 0: base time again.
    time.sleep(3.2)
    observed = eject_and_time()
    _, duration = model_length(7.5)
    assert duration == 1.0 and 0.9 <= observed <= duration + 1.0 + 0.3, observed
