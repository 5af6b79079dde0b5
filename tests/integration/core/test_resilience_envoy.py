"""Retry, timeout and fault decisions against a real Envoy (compare against a real peer).

ONE ``RouteConfiguration`` (a proto, serialized once) goes to both sides: Envoy runs it in a
static bootstrap in front of a scripted upstream; pymesh decodes the same bytes and feeds the
resolved retry policy, timeouts and fault config to ``RetryState``, ``call_deadlines`` and
``decide_fault``. The upstream answers each attempt of a request from a script carried in a
request header (a status, a reset, a slow answer, response headers) and counts attempts; for
every case the number of attempts Envoy made and the status the client got must be what the
pymesh policies predict.
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
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from google.protobuf import json_format

from pymesh.core.deadline import CONSUMED_REQUEST_HEADERS as TIMEOUT_HEADERS
from pymesh.core.deadline import call_deadlines
from pymesh.core.fault import decide_fault
from pymesh.core.limits import ClusterLimits
from pymesh.core.retry import CONSUMED_REQUEST_HEADERS as RETRY_HEADERS
from pymesh.core.retry import Retry, RetryState, strip_consumed
from pymesh.core.types import Headers, Outcome, RequestInfo, ResetKind
from pymesh.model.cluster import CircuitBreakers, RetryBudget
from pymesh.model.http_filters import FaultConfig
from pymesh.model.route import RetryPolicy, RouteAction, RouteConfiguration
from pymesh.xds.codec import decode_resource
from pymesh.xds.resource_types import ResourceType
from tests.envoy_process import EnvoyProcess as EnvoyHandle
from tests.envoy_process import run_envoy

pytestmark = pytest.mark.envoy

_REGISTERED = (router_pb2, http_connection_manager_pb2, fault_pb2)

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
FAULT_FILTER = "envoy.filters.http.fault"
FAST_BACKOFF = {"base_interval": "0.001s", "max_interval": "0.002s"}
DELAYED = 0.45
"""A fault route's answer this slow (s) was delayed: the delays are 0.6 s, and an undelayed
answer stays far below even on a loaded machine."""

# --------------------------------------------------------------------------- route table


def _retry_route(name: str, **policy: Any) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster": "up", "timeout": "10s"}
    if policy:
        action["retry_policy"] = {"retry_back_off": FAST_BACKOFF, **policy}
    return {"name": name, "match": {"prefix": f"/{name}/"}, "route": action}


def _fault_route(name: str, **fault: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"prefix": f"/{name}/"},
        "route": {"cluster": "up", "timeout": "10s"},
        "typed_per_filter_config": {FAULT_FILTER: {"@type": FAULT, **fault}},
    }


def _pct(n: int) -> dict[str, Any]:
    return {"numerator": n, "denominator": "HUNDRED"}


ROUTES: list[dict[str, Any]] = [
    _retry_route("none"),
    _retry_route("r5xx", retry_on="5xx", num_retries=2),
    _retry_route("gw", retry_on="gateway-error", num_retries=3),
    _retry_route("reset", retry_on="reset", num_retries=2),
    _retry_route("cf", retry_on="connect-failure", num_retries=2),
    _retry_route("r4xx", retry_on="retriable-4xx", num_retries=2),
    _retry_route("codes", retry_on="retriable-status-codes", retriable_status_codes=[418]),
    _retry_route(
        "hdrs",
        retry_on="retriable-headers",
        num_retries=2,
        retriable_headers=[{"name": "x-upstream-retry", "string_match": {"exact": "yes"}}],
    ),
    _retry_route("grpc", retry_on="unavailable,cancelled", num_retries=2),
    _retry_route(
        "reqhdr",
        retry_on="5xx",
        num_retries=2,
        retriable_request_headers=[{"name": "x-retry-me", "present_match": True}],
    ),
    _retry_route(
        "istio",
        retry_on="connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        num_retries=2,
        retriable_status_codes=[503],
    ),
    _retry_route("rl", retry_on="envoy-ratelimited,5xx", num_retries=2),
    _retry_route("pertry", retry_on="5xx", num_retries=2, per_try_timeout="0.15s"),
    {
        "name": "gmax",  # Istio's sidecar routes: no timeout, gRPC timeout header uncapped
        "match": {"prefix": "/gmax/"},
        "route": {"cluster": "up", "timeout": "0s", "max_grpc_timeout": "0s"},
    },
    {
        "name": "gcap",
        "match": {"prefix": "/gcap/"},
        "route": {"cluster": "up", "timeout": "5s", "max_grpc_timeout": "0.15s"},
    },
    {
        "name": "msd",
        "match": {"prefix": "/msd/"},
        "route": {
            "cluster": "up",
            "timeout": "5s",
            "max_stream_duration": {"max_stream_duration": "0.15s"},
        },
    },
    {
        "name": "gmsd",
        "match": {"prefix": "/gmsd/"},
        "route": {
            "cluster": "up",
            "timeout": "0.1s",
            "max_stream_duration": {"grpc_timeout_header_max": "0.15s"},
        },
    },
    {
        "name": "short",
        "match": {"prefix": "/short/"},
        "route": {"cluster": "up", "timeout": "0.2s"},
    },
    _fault_route(
        "fhdr",
        abort={"header_abort": {}, "percentage": _pct(100)},
        delay={"header_delay": {}, "percentage": _pct(100)},
    ),
    _fault_route("ffixed", abort={"http_status": 418, "percentage": _pct(100)}),
    _fault_route("fgrpc", abort={"grpc_status": 14, "percentage": _pct(100)}),
    _fault_route("fzero", abort={"header_abort": {}, "percentage": _pct(0)}),
    _fault_route(
        "fmatch",
        abort={"http_status": 500, "percentage": _pct(100)},
        headers=[{"name": "x-user", "string_match": {"exact": "jason"}}],
    ),
    _fault_route("fdelay", delay={"fixed_delay": "0.6s", "percentage": _pct(100)}),
    _fault_route("fmax", delay={"fixed_delay": "1s", "percentage": _pct(100)}, max_active_faults=2),
]


BUDGET_CLUSTERS = {
    # 100 % of the active requests, no floor: is the retrying request itself still active?
    "budget_all": {"budget_percent": {"value": 100.0}, "min_retry_concurrency": 0},
    "budget_none": {"budget_percent": {"value": 0.0}, "min_retry_concurrency": 0},
}
for _name in BUDGET_CLUSTERS:
    ROUTES.append(
        {
            "name": _name,
            "match": {"prefix": f"/{_name}/"},
            "route": {
                "cluster": _name,
                "timeout": "10s",
                "retry_policy": {
                    "retry_on": "5xx",
                    "num_retries": 3,
                    "retry_back_off": FAST_BACKOFF,
                },
            },
        }
    )


def route_configuration() -> route_pb2.RouteConfiguration:
    rc = {
        "name": "resilience",
        "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": ROUTES}],
    }
    return json_format.ParseDict(rc, route_pb2.RouteConfiguration())


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    route: str
    script: tuple[str, ...]
    """One action per attempt (the last repeats): ``503`` a status, ``reset`` close without
    answering, ``g14`` 200 with ``grpc-status: 14``, ``rl503`` 503 with
    ``x-envoy-ratelimited``, ``h200`` 200 with ``x-upstream-retry: yes``, ``s400`` answer 200
    after 400 ms."""
    headers: tuple[tuple[str, str], ...] = ()
    grpc: bool = False


def _cases() -> list[Case]:
    c: list[Case] = []
    add = c.append
    statuses = ("503", "500", "502", "504", "409", "418", "404", "200")
    for route in ("none", "r5xx", "gw", "r4xx", "codes", "istio", "rl", "reset"):
        for s in statuses:
            add(Case(route, (s,)))
            add(Case(route, (s, "200")))
    for route in ("none", "r5xx", "gw", "reset", "cf", "istio"):
        add(Case(route, ("reset",)))
        add(Case(route, ("reset", "200")))
    for route in ("grpc", "istio", "r5xx"):
        for g in ("g14", "g1", "g13", "g4"):
            add(Case(route, (g,)))
            add(Case(route, (g, "200")))
    add(Case("hdrs", ("h200",)))
    add(Case("hdrs", ("h200", "200")))
    add(Case("hdrs", ("503",)))
    add(Case("rl", ("rl503",)))
    add(Case("r5xx", ("rl503",)))
    add(Case("reqhdr", ("503",)))
    add(Case("reqhdr", ("503",), (("x-retry-me", "1"),)))
    # Request headers: enable, extend, count.
    add(Case("none", ("503",), (("x-envoy-retry-on", "5xx"),)))
    add(Case("none", ("503",), (("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "3"))))
    add(Case("none", ("503",), (("x-envoy-max-retries", "3"),)))
    add(Case("none", ("503", "503", "200"), (("x-envoy-retry-on", "gateway-error,bogus"),)))
    add(Case("none", ("g14",), (("x-envoy-retry-grpc-on", "unavailable"),)))
    add(Case("none", ("409",), (("x-envoy-retry-on", "retriable-4xx"),)))
    add(Case("r5xx", ("503",), (("x-envoy-max-retries", "0"),)))
    add(Case("r5xx", ("503",), (("x-envoy-max-retries", "5"),)))
    add(Case("r5xx", ("503",), (("x-envoy-max-retries", "x"),)))
    add(Case("r4xx", ("503",), (("x-envoy-retry-on", "5xx"),)))
    add(Case("codes", ("419",), (("x-envoy-retriable-status-codes", "419,420"),)))
    add(Case("r5xx", ("419",), (("x-envoy-retriable-status-codes", "419"),)))
    add(
        Case(
            "none",
            ("419",),
            (
                ("x-envoy-retry-on", "retriable-status-codes"),
                ("x-envoy-retriable-status-codes", "419"),
            ),
        )
    )
    add(
        Case(
            "none",
            ("h200",),
            (
                ("x-envoy-retry-on", "retriable-headers"),
                ("x-envoy-retriable-header-names", "x-upstream-retry"),
            ),
        )
    )
    # Timeouts: per-try timeout retried under 5xx; the route timeout ends the call with 504.
    add(Case("pertry", ("s400", "s400", "200")))
    add(Case("pertry", ("s400",)))
    add(Case("r5xx", ("s400", "200"), (("x-envoy-upstream-rq-per-try-timeout-ms", "150"),)))
    add(Case("none", ("s400",), (("x-envoy-upstream-rq-timeout-ms", "150"),)))
    add(Case("short", ("s400",)))
    add(Case("short", ("s400",), (("x-envoy-upstream-rq-timeout-ms", "2000"),)))
    # gRPC timeouts: the router's (UNAVAILABLE) and the stream duration (DEADLINE_EXCEEDED).
    add(Case("gmax", ("s400",), (("grpc-timeout", "150m"),), grpc=True))
    add(Case("gmax", ("s400",), (("grpc-timeout", "2S"),), grpc=True))
    add(Case("gmax", ("s400",), grpc=True))
    add(Case("gcap", ("s400",), grpc=True))
    add(Case("gcap", ("s400",), (("grpc-timeout", "5S"),), grpc=True))
    add(Case("gcap", ("s400",)))  # not gRPC: the route's 5 s
    add(Case("msd", ("s400",)))
    add(Case("msd", ("s400",), grpc=True))
    add(Case("gmsd", ("s400",), (("grpc-timeout", "2S"),), grpc=True))
    add(Case("gmsd", ("s400",), grpc=True))  # no header: no limit, and no route timeout
    add(Case("gmsd", ("s400",)))
    # The timeout headers the upstream sees (x-envoy-expected-rq-timeout-ms, grpc-timeout).
    add(Case("pertry", ("200",)))
    add(Case("r5xx", ("200",), (("x-envoy-upstream-rq-per-try-timeout-ms", "150"),)))
    add(Case("none", ("200",), (("x-envoy-upstream-rq-timeout-ms", "3000"),)))
    add(Case("none", ("200",), (("x-envoy-upstream-rq-timeout-ms", "0"),)))
    add(Case("gcap", ("200",), grpc=True))
    add(Case("gcap", ("200",), (("grpc-timeout", "100m"),), grpc=True))
    add(Case("gcap", ("200",)))
    add(Case("msd", ("200",)))
    add(Case("short", ("200",)))
    # An upstream Envoy's overload answer.
    add(Case("r5xx", ("ov503", "200")))
    # Faults.
    add(Case("fhdr", ("200",)))
    for code in ("503", "429", "200", "199", "600", "abc"):
        add(Case("fhdr", ("200",), (("x-envoy-fault-abort-request", code),)))
    add(
        Case(
            "fhdr",
            ("200",),
            (
                ("x-envoy-fault-abort-request", "503"),
                ("x-envoy-fault-abort-request-percentage", "0"),
            ),
        )
    )
    add(
        Case(
            "fhdr",
            ("200",),
            (
                ("x-envoy-fault-abort-request", "503"),
                ("x-envoy-fault-abort-request-percentage", "100"),
            ),
        )
    )
    add(
        Case(
            "fhdr",
            ("200",),
            (
                ("x-envoy-fault-abort-request", "503"),
                ("x-envoy-fault-abort-request-percentage", "junk"),
            ),
        )
    )
    add(Case("fhdr", ("200",), (("x-envoy-fault-abort-grpc-request", "14"),), grpc=True))
    add(
        Case(
            "fhdr",
            ("200",),
            (("x-envoy-fault-abort-request", "503"), ("x-envoy-fault-abort-grpc-request", "14")),
            grpc=True,
        )
    )
    add(Case("fhdr", ("200",), (("x-envoy-fault-delay-request", "600"),)))
    add(Case("fhdr", ("200",), (("x-envoy-fault-delay-request", "abc"),)))
    add(
        Case(
            "fhdr",
            ("200",),
            (
                ("x-envoy-fault-delay-request", "600"),
                ("x-envoy-fault-delay-request-percentage", "0"),
            ),
        )
    )
    add(Case("ffixed", ("200",)))
    add(Case("fgrpc", ("200",), grpc=True))
    add(Case("fzero", ("200",), (("x-envoy-fault-abort-request", "503"),)))
    add(Case("fmatch", ("200",)))
    add(Case("fmatch", ("200",), (("x-user", "jason"),)))
    add(Case("fdelay", ("200",)))
    return c


CASES = _cases()

# --------------------------------------------------------------------------- upstream


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}

    def next(self, test_id: str) -> int:
        with self.lock:
            n = self.attempts.get(test_id, 0)
            self.attempts[test_id] = n + 1
            return n


COUNTS = _Counts()
CONTROL_HEADERS = frozenset(RETRY_HEADERS + TIMEOUT_HEADERS) | {
    "x-envoy-fault-abort-request",
    "x-envoy-fault-delay-request",
}
"""Request headers whose forwarding upstream is compared (Envoy consumes the first group)."""


class _Scripted(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        test_id = self.headers.get("x-test-id") or ""
        script = (self.headers.get("x-test-script") or "200").split(",")
        n = COUNTS.next(test_id)
        action = script[min(n, len(script) - 1)]
        extra: list[tuple[str, str]] = []
        if action == "reset":
            # Abortive close (RST), no response.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if action.startswith("s"):
            time.sleep(int(action[1:]) / 1000)
            status = 200
        elif action.startswith("g"):
            status = 200
            extra = [("grpc-status", action[1:]), ("content-type", "application/grpc")]
        elif action.startswith("ov"):
            status = int(action[2:])
            extra = [("x-envoy-overloaded", "true")]
        elif action.startswith("rl"):
            status = int(action[2:])
            extra = [("x-envoy-ratelimited", "true")]
        elif action.startswith("h"):
            status = int(action[1:])
            extra = [("x-upstream-retry", "yes")]
        else:
            status = int(action)
        try:
            self.send_response(status)
            for k, v in extra:
                self.send_header(k, v)
            self.send_header("x-attempt", str(n))
            for name in ("x-envoy-expected-rq-timeout-ms", "grpc-timeout"):
                value = self.headers.get(name)
                if value is not None:
                    self.send_header(f"x-seen-{name}", value)
            control = sorted(k.lower() for k in self.headers if k.lower() in CONTROL_HEADERS)
            self.send_header("x-seen-control", ",".join(control))
            self.send_header("content-length", "0")
            self.end_headers()
        except OSError:
            self.close_connection = True

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _bootstrap(rc: route_pb2.RouteConfiguration, port: int) -> str:
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "resilience",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "resilience",
                                        # The app is in-process: its requests are internal, so
                                        # Envoy keeps the x-envoy-* control headers (an external
                                        # request would have them stripped).
                                        "use_remote_address": True,
                                        "internal_address_config": {
                                            "cidr_ranges": [
                                                {"address_prefix": "127.0.0.0", "prefix_len": 8}
                                            ]
                                        },
                                        "route_config": json.loads(json_format.MessageToJson(rc)),
                                        "http_filters": [
                                            {
                                                "name": FAULT_FILTER,
                                                "typed_config": {"@type": FAULT},
                                            },
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "up",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    # Outlier detection and breakers stay out of the way of the retry count.
                    "circuit_breakers": {"thresholds": [{"max_retries": 1000}]},
                    "load_assignment": {
                        "cluster_name": "up",
                        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                    },
                },
                *(
                    {
                        "name": name,
                        "type": "STATIC",
                        "connect_timeout": "1s",
                        "circuit_breakers": {"thresholds": [{"retry_budget": budget}]},
                        "load_assignment": {
                            "cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                        },
                    }
                    for name, budget in BUDGET_CLUSTERS.items()
                ),
            ],
        },
    }
    json_format.ParseDict(boot, bootstrap_pb2.Bootstrap())
    return json.dumps(boot)


@pytest.fixture(scope="module")
def envoy(
    tmp_path_factory: pytest.TempPathFactory, envoy_bin: Path, upstream_port: int
) -> Iterator[tuple[EnvoyHandle, bytes]]:
    # One Envoy for the module (cases are told apart by their test id).
    tmp_path = tmp_path_factory.mktemp("resilience-envoy")
    data = route_configuration().SerializeToString()
    same = route_pb2.RouteConfiguration.FromString(data)
    with run_envoy(envoy_bin, _bootstrap(same, upstream_port), tmp_path) as running:
        yield running, data


# --------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class Seen:
    attempts: int
    status: int
    grpc_status: str | None = None
    body: str = ""
    delayed: bool = False
    timeout_headers: tuple[tuple[str, str], ...] | None = None
    """The timeout headers the (last) upstream attempt carried; ``None`` = not compared."""
    forwarded_control: str | None = None
    """Which of ``CONTROL_HEADERS`` reached the upstream; ``None`` = not compared."""


def _request(case: Case) -> RequestInfo:
    headers = list(case.headers)
    if case.grpc:
        headers.append(("content-type", "application/grpc"))
    return RequestInfo(
        "POST" if case.grpc else "GET", "svc", f"/{case.route}/x", Headers(headers), grpc=case.grpc
    )


def _envoy(port: int, case: Case, test_id: str) -> Seen:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        start = time.monotonic()
        method = "POST" if case.grpc else "GET"
        conn.putrequest(method, f"/{case.route}/x", skip_accept_encoding=True)
        for k, v in case.headers:
            conn.putheader(k, v)
        if case.grpc:
            conn.putheader("content-type", "application/grpc")
            conn.putheader("te", "trailers")
        conn.putheader("x-test-id", test_id)
        conn.putheader("x-test-script", ",".join(case.script))
        conn.putheader("content-length", "0")
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        elapsed = time.monotonic() - start
    finally:
        conn.close()
    with COUNTS.lock:
        attempts = COUNTS.attempts.get(test_id, 0)
    # Only fault routes are checked for delays (retried timeouts are slow too).
    delayed = case.route.startswith("f") and elapsed >= DELAYED
    seen = tuple(
        (name, v)
        for name in ("x-envoy-expected-rq-timeout-ms", "grpc-timeout")
        if (v := resp.getheader(f"x-seen-{name}")) is not None
    )
    return Seen(
        attempts,
        resp.status,
        resp.getheader("grpc-status"),
        body,
        delayed,
        seen,
        resp.getheader("x-seen-control"),
    )


_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def _outcome(action: str, per_try: float | None) -> Outcome | None:
    """The outcome of one scripted attempt as pymesh's adapter reports it (``None``: the
    overall deadline passes during this attempt)."""
    if action == "reset":
        return Outcome(reset=ResetKind.RESET)
    if action.startswith("s"):
        if per_try is not None and per_try < int(action[1:]) / 1000:
            return Outcome(reset=ResetKind.PER_TRY_TIMEOUT)
        return Outcome(status=200)
    if action.startswith("g"):
        return Outcome(
            status=200, grpc_status=int(action[1:]), headers=Headers([("grpc-status", action[1:])])
        )
    if action.startswith("rl"):
        return Outcome(status=int(action[2:]), headers=Headers([("x-envoy-ratelimited", "true")]))
    if action.startswith("ov"):
        return Outcome(status=int(action[2:]), headers=Headers([("x-envoy-overloaded", "true")]))
    if action.startswith("h"):
        return Outcome(status=int(action[1:]), headers=Headers([("x-upstream-retry", "yes")]))
    return Outcome(status=int(action))


def _pymesh(config: RouteConfiguration, case: Case) -> Seen:
    rng = random.Random(0)
    request = _request(case)
    vhost = config.virtual_hosts[0]
    route = next(r for r in vhost.routes if r.name == case.route)
    action = route.action
    assert isinstance(action, RouteAction)
    # Faults first (per-route override of the fault filter).
    override = route.typed_per_filter_config.get(FAULT_FILTER)
    if override is not None:
        assert isinstance(override.config, FaultConfig)
        fault = decide_fault(override.config, request, rng=rng, active_faults=0, cluster="up")
        delayed = fault.delay is not None
        if fault.abort_status is not None:
            if case.grpc:
                # A gRPC local reply: HTTP 200, the gRPC status (or the HTTP status mapped).
                grpc = fault.abort_grpc_status
                if grpc is None:
                    grpc = _HTTP_TO_GRPC.get(fault.abort_status, 2)
                return Seen(0, 200, str(grpc), "", delayed)
            return Seen(0, fault.abort_status, None, "fault filter abort", delayed)
    else:
        delayed = False
    deadlines = call_deadlines(
        action, action.retry_policy, request, now=0.0, max_stream_duration=None
    )
    state = RetryState(action.retry_policy, request, rng=rng)
    overall = deadlines.overall
    attempts = 0
    for i in range(50):
        attempts += 1
        act = case.script[min(i, len(case.script) - 1)]
        if (
            act.startswith("s")
            and overall is not None
            and overall < int(act[1:]) / 1000
            and (deadlines.per_try is None or deadlines.per_try >= overall)
        ):
            if case.grpc:
                # A gRPC local reply: the router's 504 maps to UNAVAILABLE; the stream
                # duration limit answers DEADLINE_EXCEEDED.
                return Seen(attempts, 200, str(deadlines.timeout_grpc_status), "", delayed)
            return Seen(attempts, 504, None, deadlines.timeout_body, delayed)
        outcome = _outcome(act, deadlines.per_try)
        assert outcome is not None
        if not isinstance(state.should_retry(outcome, budget_ok=True), Retry):
            break
    if outcome.reset is ResetKind.PER_TRY_TIMEOUT:
        return Seen(attempts, 504, None, "upstream request timeout", delayed)
    if outcome.reset is not None:
        return Seen(attempts, 503, None, "", delayed)
    grpc = outcome.headers.get("grpc-status")
    # Envoy's timeout headers on the first attempt (later ones depend on elapsed time).
    headers = deadlines.attempt_headers(0.0) if attempts == 1 else None
    forwarded = strip_consumed(request.headers, RETRY_HEADERS + TIMEOUT_HEADERS)
    control = ",".join(sorted(k for k, _ in forwarded if k in CONTROL_HEADERS))
    return Seen(attempts, outcome.status or 0, grpc, "", delayed, headers, control)


def test_case_count() -> None:
    assert len(CASES) >= 150


def test_pymesh_policies_decide_what_envoy_does(envoy: tuple[EnvoyHandle, bytes]) -> None:
    handle, data = envoy
    config = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, data).value
    assert isinstance(config, RouteConfiguration)
    mismatches = []
    for i, case in enumerate(CASES):
        got = _envoy(handle.port, case, f"case-{i}-{random.random()}")
        want = _pymesh(config, case)
        same = (got.attempts, got.status, got.grpc_status, got.delayed) == (
            want.attempts,
            want.status,
            want.grpc_status,
            want.delayed,
        )
        if want.body and want.body not in got.body:
            same = False
        if want.timeout_headers is not None and want.timeout_headers != got.timeout_headers:
            same = False
        if want.forwarded_control is not None and want.forwarded_control != got.forwarded_control:
            same = False
        if not same:
            mismatches.append(f"{case}: envoy {got} pymesh {want}")
    assert not mismatches, "\n".join(mismatches[:40])


def test_max_active_faults_as_envoy(envoy: tuple[EnvoyHandle, bytes]) -> None:
    """Four requests at once on a route delaying every request 1 s with at most 2 active
    faults: Envoy delays two, and decide_fault (with the in-flight count) agrees."""
    handle, data = envoy
    config = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, data).value
    route = next(r for r in config.virtual_hosts[0].routes if r.name == "fmax")
    fault = route.typed_per_filter_config[FAULT_FILTER].config
    assert isinstance(fault, FaultConfig)
    rng = random.Random(0)
    active = 0
    predicted = []
    for _ in range(4):
        d = decide_fault(
            fault, _request(Case("fmax", ("200",))), rng=rng, active_faults=active, cluster="up"
        )
        active += d.active
        predicted.append(d.delay is not None)

    results: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def one(i: int) -> None:
        barrier.wait()
        start = time.monotonic()
        _envoy(handle.port, Case("fmax", ("200",)), f"fmax-{i}-{random.random()}")
        with lock:
            results.append(time.monotonic() - start)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4
    delayed = sum(r >= 0.9 for r in results)
    assert delayed == sum(predicted) == 2
    assert sum(r < 0.6 for r in results) == 2


def test_retry_budget_counts_the_retrying_request(envoy: tuple[EnvoyHandle, bytes]) -> None:
    """A retry budget of 100 % of the active requests with no floor: Envoy's retry decision
    still counts the failed attempt's own request as active, so a lone request may retry;
    with 0 % it may not. ClusterLimits gives the same answers when asked before the failed
    attempt's request slot is released (the order the attempt loop must keep)."""
    handle, _ = envoy
    for name, budget in BUDGET_CLUSTERS.items():
        got = _envoy(handle.port, Case(name, ("503",)), f"{name}-{random.random()}")
        limits = ClusterLimits(
            CircuitBreakers(
                retry_budget=RetryBudget(
                    budget["budget_percent"]["value"], budget["min_retry_concurrency"]
                )
            )
        )
        state = RetryState(
            RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3),
            _request(Case(name, ())),
            rng=random.Random(0),
        )
        attempts = 0
        retry_slot = False
        for _ in range(10):
            attempts += 1
            assert limits.try_start_request()
            if retry_slot:
                limits.end_retry()  # Envoy frees the slot at the next decision
                retry_slot = False
            decision = state.should_retry(Outcome(status=503), budget_ok=limits.try_start_retry)
            limits.end_request()
            if not isinstance(decision, Retry):
                break
            retry_slot = True
        assert (got.attempts, got.status) == (attempts, 503), name


# --------------------------------------------------------------------------- end to end

MESH_HOST = "svc.default.svc.cluster.local:80"
KNOWN_BODIES = (
    "upstream request timeout",
    "downstream duration timeout",
    "fault filter abort",
)


def _mesh_resources(
    rc: route_pb2.RouteConfiguration, upstream_port: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same route table and clusters as Envoy's bootstrap, as LDS and CDS resources."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.listener.v3 import listener_pb2

    boot = json.loads(_bootstrap(rc, upstream_port))
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    listener = {
        "name": MESH_HOST,
        "api_listener": {"api_listener": hcm},
    }
    lds = {MESH_HOST: json_format.ParseDict(listener, listener_pb2.Listener())}
    cds = {
        c["name"]: json_format.ParseDict(c, cluster_pb2.Cluster())
        for c in boot["static_resources"]["clusters"]
    }
    return lds, cds


def test_pymesh_httpx_answers_like_envoy(
    envoy: tuple[EnvoyHandle, bytes], upstream_port: int
) -> None:
    """The whole data plane, end to end: every non-gRPC case goes through Envoy and through
    ``pymesh.httpx.Client`` (same route table and clusters over ADS, same upstream); the
    attempts the upstream saw, the status, the body of local replies and the injected delay
    must agree."""
    import pymesh.httpx
    from pymesh.xds.client import XdsClient
    from tests.xdsserver import CDS, LDS, XdsTestServer

    handle, data = envoy
    lds, cds = _mesh_resources(route_pb2.RouteConfiguration.FromString(data), upstream_port)
    mismatches = []
    retried = aborted = compared = 0
    with XdsTestServer() as server:
        server.set_resources(LDS, lds)
        server.set_resources(CDS, cds)
        with (
            XdsClient(server.bootstrap()) as xds,
            pymesh.httpx.Client(xds_client=xds, timeout=20) as client,
        ):
            for i, case in enumerate(CASES):
                if case.grpc:
                    continue  # gRPC goes through the gRPC adapter, not httpx
                got = _envoy(handle.port, case, f"e2e-envoy-{i}-{random.random()}")
                test_id = f"e2e-mesh-{i}-{random.random()}"
                start = time.monotonic()
                resp = client.get(
                    f"http://svc/{case.route}/x",
                    headers=[
                        *case.headers,
                        ("x-test-id", test_id),
                        ("x-test-script", ",".join(case.script)),
                    ],
                )
                elapsed = time.monotonic() - start
                with COUNTS.lock:
                    attempts = COUNTS.attempts.get(test_id, 0)
                delayed = case.route.startswith("f") and elapsed >= DELAYED
                compared += 1
                retried += attempts > 1
                aborted += "fault filter abort" in resp.text
                ours = (attempts, resp.status_code, delayed)
                theirs = (got.attempts, got.status, got.delayed)
                body_ok = all((b in resp.text) == (b in got.body) for b in KNOWN_BODIES)
                if ours != theirs or not body_ok:
                    mismatches.append(
                        f"{case}: envoy {theirs} {got.body[:40]!r} pymesh {ours} {resp.text[:40]!r}"
                    )
    assert not mismatches, "\n".join(mismatches[:40])
    # The mesh really handled them (retries, fault aborts), not a pass-through.
    assert compared >= 180 and retried >= 30 and aborted >= 5, (compared, retried, aborted)
