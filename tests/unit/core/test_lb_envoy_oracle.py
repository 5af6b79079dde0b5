"""Ring hash and Maglev against real Envoy: the same request goes to the same endpoint.

One Envoy (static config) fronts nine loopback HTTP servers that answer their own port.
Four clusters (ring hash and Maglev, each flat and locality-weighted) share endpoints with
mixed weights, health statuses (UNHEALTHY, DEGRADED, DRAINING) and two priorities, so the
comparison covers: xxHash64 of the request (header incl. repeated values, cookie, query
parameter, terminal policies, Envoy's combination), priority choice by ``hash % 100`` with the
overprovisioning factor, health classes, weight normalisation (with locality shares), the ring
layout and lookup, and the Maglev permutation fill. pymesh computes the expected endpoint from
the same endpoint list; every case must match Envoy exactly.

Five more clusters compare distributions instead (Envoy draws priorities and random picks
at random): the share each endpoint gets through Envoy must fit pymesh's shares
(chi-square, p = 0.001, 2,000 requests), covering degraded load, partial panic, locality
weights scaled by locality health (round robin), weighted least request, and random
ignoring endpoint weights.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pymesh.core.hashing import request_hash
from pymesh.core.lb import build_hosts, build_load_balancer
from pymesh.core.types import Headers, PickContext, RequestInfo
from pymesh.model.cluster import (
    Cluster,
    ClusterKind,
    CommonLbConfig,
    LbPolicy,
    LeastRequest,
    Maglev,
    Random,
    RingHash,
    RoundRobin,
)
from pymesh.model.common import Locality, SocketAddress
from pymesh.model.endpoint import (
    ClusterLoadAssignment,
    HealthStatus,
    LbEndpoint,
    LocalityLbEndpoints,
)
from pymesh.model.matcher import StringMatcher
from pymesh.model.route import (
    ConnectionSourceIpHash,
    CookieHash,
    HashPolicy,
    HeaderHash,
    QueryParameterHash,
    RegexRewrite,
)
from tests.envoy_process import run_envoy

pytestmark = pytest.mark.envoy

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
UPSTREAMS = 9
PREVIOUS_HOSTS = (
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
)
RETRY_HOST_ATTEMPTS = 3

# (upstream index, weight, health, priority, zone) per endpoint; zones matter when
# locality-weighted (zone weights below). P0: 6 hosts, 3 healthy + 1 degraded -> health
# 140*3//6 = 70: hashes with h % 100 < 70 stay in P0, the rest go to P1.
LAYOUT: list[tuple[int, int, HealthStatus, int, str]] = [
    (0, 1, HealthStatus.HEALTHY, 0, "a"),
    (1, 2, HealthStatus.UNKNOWN, 0, "a"),
    (2, 1, HealthStatus.UNHEALTHY, 0, "a"),
    (3, 3, HealthStatus.HEALTHY, 0, "b"),
    (4, 1, HealthStatus.UNHEALTHY, 0, "b"),
    (5, 1, HealthStatus.DEGRADED, 0, "b"),
    (6, 1, HealthStatus.HEALTHY, 1, "a"),
    (7, 2, HealthStatus.HEALTHY, 1, "a"),
    # DRAINING is excluded from the counts (Envoy 1.40 default): counted, P0 would get 60%.
    (8, 1, HealthStatus.DRAINING, 0, "b"),
]
ZONE_WEIGHTS = {"a": 1, "b": 3}

CLUSTERS: dict[str, tuple[LbPolicy, bool]] = {
    "ring": (RingHash(min_ring_size=1024, max_ring_size=8 * 1024 * 1024), False),
    "ring_small": (RingHash(min_ring_size=64, max_ring_size=200), True),
    "maglev": (Maglev(), False),
    "maglev_small": (Maglev(table_size=251), True),
    "maglev_ovp": (Maglev(table_size=251), False),
    "ring_ovp": (RingHash(min_ring_size=64), False),
    "ring_degraded": (RingHash(min_ring_size=64), False),
    "maglev_degraded": (Maglev(table_size=251), False),
}
# P0 holds only a DEGRADED host: 54% of hashes go to P0's degraded share, where a hashing
# balancer (Envoy and pymesh alike) has no host: 503 "no healthy upstream"
DEGRADED_LAYOUT: Layout = [
    (0, 1, HealthStatus.DEGRADED, 0, "a"),
    (1, 1, HealthStatus.UNHEALTHY, 0, "a"),
    (2, 1, HealthStatus.HEALTHY, 1, "a"),
    (3, 1, HealthStatus.UNHEALTHY, 1, "a"),
    (4, 1, HealthStatus.UNHEALTHY, 1, "a"),
]
LAYOUTS = {"ring_degraded": DEGRADED_LAYOUT, "maglev_degraded": DEGRADED_LAYOUT}
# overprovisioning factor per cluster (default 140): 100 -> P0 gets 50%, 200 -> P0 gets 100%
FACTORS = {"maglev_ovp": 100, "ring_ovp": 200}

# Round robin through Envoy vs pymesh: distributions (Envoy draws the priority at random).
RR_ZONE_WEIGHTS = {"a": 1, "b": 3, "c": 2}
RR_CLUSTERS: dict[str, tuple[Layout, bool] | tuple[Layout, bool, LbPolicy]] = {
    # P0 health 35 + degraded 35, P1 health 46: 35% P0 healthy, 46% P1, 19% P0 degraded;
    # P1 (33% usable) is not in panic because availability reaches 100
    "rr_degraded": (
        [
            (0, 1, HealthStatus.HEALTHY, 0, "a"),
            (1, 1, HealthStatus.UNHEALTHY, 0, "a"),
            (2, 1, HealthStatus.UNHEALTHY, 0, "a"),
            (3, 1, HealthStatus.DEGRADED, 0, "a"),
            (4, 1, HealthStatus.HEALTHY, 1, "a"),
            (5, 1, HealthStatus.UNHEALTHY, 1, "a"),
            (6, 1, HealthStatus.UNHEALTHY, 1, "a"),
        ],
        False,
    ),
    # P0 20% healthy (health 28, in panic: all five hosts), P1 health 70: availability 98
    "rr_panic": (
        [
            (0, 1, HealthStatus.HEALTHY, 0, "a"),
            (1, 1, HealthStatus.UNHEALTHY, 0, "a"),
            (2, 1, HealthStatus.UNHEALTHY, 0, "a"),
            (3, 1, HealthStatus.UNHEALTHY, 0, "a"),
            (4, 1, HealthStatus.UNHEALTHY, 0, "a"),
            (5, 1, HealthStatus.HEALTHY, 1, "a"),
            (6, 1, HealthStatus.UNHEALTHY, 1, "a"),
        ],
        False,
    ),
    # locality-weighted: a (w1, all healthy) vs b (w3, half healthy -> 2.1) for healthy load,
    # c (w2) only for the degraded share; host weights inside a locality
    "rr_locality": (
        [
            (0, 1, HealthStatus.HEALTHY, 0, "a"),
            (1, 3, HealthStatus.HEALTHY, 0, "a"),
            (2, 1, HealthStatus.HEALTHY, 0, "b"),
            (3, 1, HealthStatus.UNHEALTHY, 0, "b"),
            (4, 1, HealthStatus.UNHEALTHY, 0, "c"),
            (5, 1, HealthStatus.DEGRADED, 0, "c"),
        ],
        True,
    ),
    # DRAINING: not counted for health or panic, yet a level in panic picks it, and total
    # panic splits by host count including it (checked against Envoy 1.40)
    "rr_panic_draining": (
        [
            (0, 1, HealthStatus.HEALTHY, 0, "a"),
            (1, 1, HealthStatus.UNHEALTHY, 0, "a"),
            (2, 1, HealthStatus.UNHEALTHY, 0, "a"),
            (3, 1, HealthStatus.DRAINING, 0, "a"),
        ],
        False,
    ),
    "rr_total_panic_draining": (
        [
            (0, 1, HealthStatus.UNHEALTHY, 0, "a"),
            (1, 1, HealthStatus.DRAINING, 0, "a"),
            (2, 1, HealthStatus.UNHEALTHY, 1, "a"),
            (3, 1, HealthStatus.UNHEALTHY, 1, "a"),
            (4, 1, HealthStatus.UNHEALTHY, 1, "a"),
        ],
        False,
    ),
    # locality-weighted, a locality without a weight gets no traffic at all
    "rr_locality_unweighted": (
        [
            (0, 1, HealthStatus.HEALTHY, 0, "a"),
            (1, 1, HealthStatus.HEALTHY, 0, "d"),
        ],
        True,
    ),
    # least request with unequal weights and one request at a time: EDF by weight
    "lr_weighted": (
        [
            (0, 1, HealthStatus.HEALTHY, 0, "a"),
            (1, 4, HealthStatus.HEALTHY, 0, "a"),
            (2, 2, HealthStatus.HEALTHY, 0, "a"),
        ],
        False,
        LeastRequest(),
    ),
    # random ignores endpoint weights in Envoy: uniform despite 1:5
    "random_weighted": (
        [
            (0, 1, HealthStatus.HEALTHY, 0, "a"),
            (1, 5, HealthStatus.HEALTHY, 0, "a"),
        ],
        False,
        Random(),
    ),
}


def _rr(name: str) -> tuple[Layout, bool, LbPolicy]:
    entry = RR_CLUSTERS[name]
    return (entry[0], entry[1], entry[2]) if len(entry) == 3 else (entry[0], entry[1], RoundRobin())


POLICIES: dict[str, tuple[HashPolicy, ...]] = {
    "all": (HeaderHash("x-key"), CookieHash("sess"), QueryParameterHash("q")),
    "terminal": (HeaderHash("x-key", terminal=True), QueryParameterHash("q")),
    "sticky": (CookieHash("sess", ttl=60.0, path="/"),),
    "ip": (HeaderHash("x-key", terminal=True), ConnectionSourceIpHash()),
    "rewrite": (
        HeaderHash("x-key", regex_rewrite=RegexRewrite(StringMatcher.regex("[0-9]+"), "N")),
        HeaderHash(
            "x-key", regex_rewrite=RegexRewrite(StringMatcher.regex("([a-z])[a-z]*"), r"<\1>")
        ),
    ),
}


def _envoy_hash_policy(policy: HashPolicy) -> dict[str, Any]:
    if isinstance(policy, HeaderHash):
        header: dict[str, Any] = {"header_name": policy.header_name}
        if policy.regex_rewrite is not None:
            header["regex_rewrite"] = {
                "pattern": {"regex": policy.regex_rewrite.pattern.pattern},
                "substitution": policy.regex_rewrite.substitution,
            }
        return {"header": header, "terminal": policy.terminal}
    if isinstance(policy, CookieHash):
        cookie: dict[str, Any] = {"name": policy.name}
        if policy.ttl is not None:
            cookie["ttl"] = f"{policy.ttl:g}s"
        if policy.path:
            cookie["path"] = policy.path
        return {"cookie": cookie, "terminal": policy.terminal}
    if isinstance(policy, ConnectionSourceIpHash):
        return {"connection_properties": {"source_ip": True}, "terminal": policy.terminal}
    assert isinstance(policy, QueryParameterHash)
    return {"query_parameter": {"name": policy.name}, "terminal": policy.terminal}


Layout = list[tuple[int, int, HealthStatus, int, str]]


def _assignment(
    name: str,
    ports: list[int],
    locality_weighted: bool,
    layout: Layout = LAYOUT,
    zone_weights: dict[str, int] = ZONE_WEIGHTS,
) -> ClusterLoadAssignment:
    factor = FACTORS.get(name, 140)
    groups: dict[tuple[int, str], list[LbEndpoint]] = {}
    for index, weight, health, priority, zone in layout:
        groups.setdefault((priority, zone), []).append(
            LbEndpoint(
                SocketAddress("127.0.0.1", ports[index]),
                health_status=health,
                load_balancing_weight=weight,
            )
        )
    localities = [
        LocalityLbEndpoints(
            Locality("r", zone),
            priority=priority,
            load_balancing_weight=zone_weights.get(zone) if locality_weighted else None,
            endpoints=tuple(eps),
        )
        for (priority, zone), eps in sorted(groups.items())
    ]
    return ClusterLoadAssignment(name, tuple(localities), overprovisioning_factor=factor)


def _envoy_cluster(
    name: str, a: ClusterLoadAssignment, policy: LbPolicy, lw: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "policy": {"overprovisioning_factor": a.overprovisioning_factor},
            "endpoints": [
                {
                    "locality": {"region": loc.locality.region, "zone": loc.locality.zone},
                    "priority": loc.priority,
                    **(
                        {"load_balancing_weight": loc.load_balancing_weight}
                        if loc.load_balancing_weight is not None
                        else {}
                    ),
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": e.address.host,
                                        "port_value": e.address.port,
                                    }
                                }
                            },
                            "health_status": e.health_status.name,
                            "load_balancing_weight": e.load_balancing_weight,
                        }
                        for e in loc.endpoints
                    ],
                }
                for loc in a.localities
            ],
        },
    }
    if isinstance(policy, RoundRobin):
        out["lb_policy"] = "ROUND_ROBIN"
    elif isinstance(policy, LeastRequest):
        out["lb_policy"] = "LEAST_REQUEST"
    elif isinstance(policy, Random):
        out["lb_policy"] = "RANDOM"
    elif isinstance(policy, RingHash):
        out["lb_policy"] = "RING_HASH"
        out["ring_hash_lb_config"] = {
            "minimum_ring_size": policy.min_ring_size,
            "maximum_ring_size": policy.max_ring_size,
        }
    else:
        assert isinstance(policy, Maglev), policy
        out["lb_policy"] = "MAGLEV"
        out["maglev_lb_config"] = {"table_size": policy.table_size}
    if lw:
        out["common_lb_config"] = {"locality_weighted_lb_config": {}}
    return out


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        port = str(self.server.server_address[1])
        body = port.encode()
        # the retry test makes one chosen endpoint fail
        self.send_response(503 if self.headers.get("x-fail-port") == port else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream_ports() -> Iterator[list[int]]:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Answer) for _ in range(UPSTREAMS)]
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        for s in servers
    ]
    for t in threads:
        t.start()
    try:
        yield [s.server_address[1] for s in servers]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(5)


@pytest.fixture(scope="module")
def front_port(
    tmp_path_factory: pytest.TempPathFactory, envoy_bin: Path, upstream_ports: list[int]
) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("lb_oracle")
    routes = []
    clusters = []
    for name in RR_CLUSTERS:
        layout, lw, rr_policy = _rr(name)
        a = _assignment(name, upstream_ports, lw, layout, RR_ZONE_WEIGHTS)
        clusters.append(_envoy_cluster(name, a, rr_policy, lw))
        routes.append({"match": {"prefix": f"/{name}/"}, "route": {"cluster": name}})
    for name, (policy, lw) in CLUSTERS.items():
        a = _assignment(name, upstream_ports, lw, LAYOUTS.get(name, LAYOUT))
        clusters.append(_envoy_cluster(name, a, policy, lw))
        for pname, policies in POLICIES.items():
            routes.append(
                {
                    "match": {"prefix": f"/{name}/{pname}/"},
                    "route": {
                        "cluster": name,
                        "hash_policy": [_envoy_hash_policy(p) for p in policies],
                    },
                }
            )
        routes.append(
            {
                "match": {"prefix": f"/{name}/retry/"},
                "route": {
                    "cluster": name,
                    "hash_policy": [_envoy_hash_policy(HeaderHash("x-key"))],
                    "retry_policy": {
                        "retry_on": "5xx",
                        "num_retries": 1,
                        "retry_host_predicate": [
                            {
                                "name": "envoy.retry_host_predicates.previous_hosts",
                                "typed_config": {"@type": PREVIOUS_HOSTS},
                            }
                        ],
                        "host_selection_retry_max_attempts": RETRY_HOST_ATTEMPTS,
                    },
                },
            }
        )
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "front",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "front",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {"name": "all", "domains": ["*"], "routes": routes}
                                            ]
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
    with run_envoy(envoy_bin, json.dumps(boot), tmp) as envoy:
        yield envoy.port


def _cases(rng: random.Random, n: int) -> list[tuple[list[tuple[str, str]], str]]:
    """(headers, query) pairs; every case sets at least one hashed input."""
    out: list[tuple[list[tuple[str, str]], str]] = []
    words = ["alice", "bob", "carol", "dave", "eve", "x", "", "user-17", "Z z", "ü"]
    while len(out) < n:
        headers: list[tuple[str, str]] = []
        query = ""
        kind = rng.randrange(6)
        if kind in (0, 3, 4):
            headers.append(("x-key", f"{rng.choice(words)}{rng.randrange(10_000)}"))
        if kind == 4:
            headers.append(("x-key", f"second{rng.randrange(100)}"))
        if kind in (1, 3, 5):
            headers.append(("cookie", f"a=1; sess={rng.randrange(10**6)}; b=2"))
        if kind in (2, 3, 5):
            query = f"?q={rng.randrange(10**6)}&r=1"
        out.append((headers, query))
    return out


def test_same_endpoint_as_envoy(front_port: int, upstream_ports: list[int]) -> None:
    rng = random.Random(2024)
    conn = http.client.HTTPConnection("127.0.0.1", front_port, timeout=10)
    mismatches: list[str] = []
    compared = 0
    p1_seen = 0
    no_host = 0
    try:
        for name, (policy, lw) in CLUSTERS.items():
            a = _assignment(name, upstream_ports, lw, LAYOUTS.get(name, LAYOUT))
            c = Cluster(
                name,
                ClusterKind.STATIC,
                lb_policy=policy,
                common_lb_config=CommonLbConfig(locality_weighted=lw),
            )
            hosts = build_hosts(a, {})
            lb = build_load_balancer(c, list(hosts.values()), a, now=0.0, rng=random.Random(0))
            for pname, policies in POLICIES.items():
                for headers, query in _cases(rng, 60):
                    path = f"/{name}/{pname}/x{query}"
                    request = RequestInfo(
                        "GET", "lb", path, Headers(headers), source_ip="127.0.0.1"
                    )
                    h = request_hash(policies, request)
                    if h is None:
                        continue
                    expected = lb.pick(PickContext(now=0.0, hash_key=h))
                    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
                    conn.putheader("Host", "lb")
                    for k, v in headers:
                        conn.putheader(k, v.encode().decode("latin-1"))
                    conn.endheaders()
                    resp = conn.getresponse()
                    body = resp.read().decode()
                    compared += 1
                    if expected is None:
                        no_host += 1
                        if resp.status != 503:
                            mismatches.append(f"{path} {headers}: envoy {body}, pymesh no host")
                        continue
                    assert resp.status in (200, 503), (resp.status, body)
                    if expected.priority == 1:
                        p1_seen += 1
                    if body != str(expected.address.port):
                        mismatches.append(
                            f"{path} {headers}: envoy {body!r}, pymesh {expected.address.port}"
                        )
    finally:
        conn.close()
    assert compared >= 250
    assert p1_seen > 20  # the priority split by hash is exercised
    assert no_host > 20  # and the degraded-only levels
    assert not mismatches, f"{len(mismatches)}/{compared}:\n" + "\n".join(mismatches[:20])


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}


@pytest.mark.parametrize("name", list(RR_CLUSTERS))
def test_round_robin_distribution_as_envoy(
    name: str, front_port: int, upstream_ports: list[int]
) -> None:
    """Envoy's and pymesh's shares per endpoint agree (chi-square, p = 0.001): priority
    load, degraded share, panic, locality weights and host weights."""
    layout, lw, policy = _rr(name)
    a = _assignment(name, upstream_ports, lw, layout, RR_ZONE_WEIGHTS)
    c = Cluster(
        name,
        ClusterKind.STATIC,
        lb_policy=policy,
        common_lb_config=CommonLbConfig(locality_weighted=lw),
    )
    hosts = build_hosts(a, {})
    lb = build_load_balancer(c, list(hosts.values()), a, now=0.0, rng=random.Random(5))
    ours: dict[int, int] = {}
    for _ in range(100_000):
        h = lb.pick(PickContext(now=0.0))
        assert h is not None
        ours[h.address.port] = ours.get(h.address.port, 0) + 1
    n = 2000
    theirs: dict[int, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", front_port, timeout=10)
    try:
        for _ in range(n):
            conn.request("GET", f"/{name}/x", headers={"Host": "lb"})
            resp = conn.getresponse()
            body = resp.read().decode()
            assert resp.status == 200, (resp.status, body)
            theirs[int(body)] = theirs.get(int(body), 0) + 1
    finally:
        conn.close()
    assert set(theirs) <= set(ours), (theirs, ours)
    if len(ours) == 1:
        assert theirs == {next(iter(ours)): n}
        return
    expected = {port: n * count / 100_000 for port, count in ours.items()}
    stat = sum((theirs.get(p, 0) - e) ** 2 / e for p, e in expected.items())
    assert stat < CHI2_999[len(expected) - 1], (stat, theirs, expected)


@pytest.mark.parametrize("name", ["ring", "maglev"])
def test_generated_sticky_cookie_as_envoy(
    name: str, front_port: int, upstream_ports: list[int]
) -> None:
    """Cookie hash with a ttl and no cookie: Envoy answers with the same Set-Cookie that
    ``request_hash(..., set_cookies=...)`` produces (value seeded by the client address),
    routes by it, and the cookie then keeps the client on that endpoint."""
    policy, lw = CLUSTERS[name]
    a = _assignment(name, upstream_ports, lw, LAYOUTS.get(name, LAYOUT))
    c = Cluster(
        name,
        ClusterKind.STATIC,
        lb_policy=policy,
        common_lb_config=CommonLbConfig(locality_weighted=lw),
    )
    hosts = build_hosts(a, {})
    lb = build_load_balancer(c, list(hosts.values()), a, now=0.0, rng=random.Random(0))
    policies = POLICIES["sticky"]
    for _ in range(3):  # new connections: new client ports, new cookie values
        conn = http.client.HTTPConnection("127.0.0.1", front_port, timeout=10)
        try:
            conn.connect()
            assert conn.sock is not None
            ip, port = conn.sock.getsockname()[:2]
            path = f"/{name}/sticky/x"
            request = RequestInfo("GET", "lb", path)
            set_cookies: list[str] = []
            h = request_hash(
                policies,
                request,
                set_cookies=set_cookies,
                cookie_seed=f"{ip}:{port}127.0.0.1:{front_port}",  # Envoy: remote + local
            )
            assert h is not None and len(set_cookies) == 1
            expected = lb.pick(PickContext(now=0.0, hash_key=h))
            assert expected is not None
            conn.request("GET", path, headers={"Host": "lb"})
            resp = conn.getresponse()
            body = resp.read().decode()
            assert resp.status == 200, body
            assert resp.getheader("set-cookie") == set_cookies[0]
            assert body == str(expected.address.port)
            # the cookie pins later requests, in pymesh as in Envoy
            cookie = set_cookies[0].split(";", 1)[0]
            again = RequestInfo("GET", "lb", path, Headers([("cookie", cookie)]))
            assert request_hash(policies, again) == h
            conn.request("GET", path, headers={"Host": "lb", "Cookie": cookie})
            resp = conn.getresponse()
            assert resp.read().decode() == body and resp.getheader("set-cookie") is None
        finally:
            conn.close()


@pytest.mark.parametrize("name", ["ring", "ring_small", "maglev", "maglev_small"])
def test_retry_avoids_the_previous_host_as_envoy(
    name: str, front_port: int, upstream_ports: list[int]
) -> None:
    """The first endpoint answers 503; Envoy retries with the previous-hosts predicate and
    host_selection_retry_max_attempts = 3. The endpoint it lands on is the one pymesh picks
    with ``excluded={first}`` and ``host_selection_attempts=3`` (ring: next points;
    Maglev: the hash with its bits flipped)."""
    policy, lw = CLUSTERS[name]
    a = _assignment(name, upstream_ports, lw, LAYOUTS.get(name, LAYOUT))
    c = Cluster(
        name,
        ClusterKind.STATIC,
        lb_policy=policy,
        common_lb_config=CommonLbConfig(locality_weighted=lw),
    )
    hosts = build_hosts(a, {})
    lb = build_load_balancer(c, list(hosts.values()), a, now=0.0, rng=random.Random(0))
    policies = (HeaderHash("x-key"),)
    rng = random.Random(99)
    conn = http.client.HTTPConnection("127.0.0.1", front_port, timeout=10)
    mismatches = []
    moved = 0
    try:
        for _ in range(80):
            key = f"user{rng.randrange(10**6)}"
            path = f"/{name}/retry/x"
            h = request_hash(policies, RequestInfo("GET", "lb", path, Headers([("x-key", key)])))
            assert h is not None
            first = lb.pick(PickContext(now=0.0, hash_key=h))
            assert first is not None
            second = lb.pick(
                PickContext(
                    now=0.0,
                    hash_key=h,
                    excluded=frozenset({first.key}),
                    host_selection_attempts=RETRY_HOST_ATTEMPTS,
                )
            )
            assert second is not None
            moved += second is not first
            conn.request(
                "GET",
                path,
                headers={"Host": "lb", "x-key": key, "x-fail-port": str(first.address.port)},
            )
            resp = conn.getresponse()
            body = resp.read().decode()
            want = (503 if second is first else 200, str(second.address.port))
            if (resp.status, body) != want:
                mismatches.append(f"{key}: envoy {resp.status} {body}, pymesh {want}")
    finally:
        conn.close()
    assert not mismatches, "\n".join(mismatches)
    # Often a different endpoint (a ring's next points may share one). The ring depends on
    # the endpoints' random ports: 55-76 of 80 moved in runs here, but 19 of 40 was seen
    # once in CI, so 80 are sent and a quarter is required.
    assert moved >= 20
