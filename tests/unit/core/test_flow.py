"""The attempt loop, driven by hand on a fake clock with seeded randomness.

No sockets: each test scripts what every ``Send`` answers, and the fake clock advances only
when the flow sleeps or an attempt "takes" time. Counters (active requests, limits) must be
back to zero at the end of every call.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Sequence
from types import MappingProxyType

import pytest

from pymesh.core.flow import (
    AttemptResult,
    CallResult,
    Discard,
    Mirror,
    ReplyKind,
    Send,
    Sleep,
    WaitConnection,
    call_flow,
)
from pymesh.core.runtime import MeshRuntime
from pymesh.core.types import Headers, Outcome, RequestInfo, ResetKind
from pymesh.model.cluster import CircuitBreakers, Cluster, ClusterKind, OutlierDetection
from pymesh.model.common import Locality, SocketAddress
from pymesh.model.endpoint import ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints
from pymesh.model.http_filters import FaultAbort, FaultConfig, FaultDelay, HttpFilter
from pymesh.model.listener import HttpConnectionManager, Listener
from pymesh.model.route import (
    DirectResponseAction,
    FilterConfigOverride,
    FractionalPercent,
    PathMatchKind,
    RedirectAction,
    RequestMirrorPolicy,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from pymesh.model.snapshot import ClusterConfig, ClusterError, ErrorKind, TargetSnapshot

FAULT = "envoy.filters.http.fault"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def assignment(name: str, ports: Sequence[int]) -> ClusterLoadAssignment:
    eps = tuple(LbEndpoint(SocketAddress("127.0.0.1", p)) for p in ports)
    return ClusterLoadAssignment(name, (LocalityLbEndpoints(Locality(), 0, None, eps),))


def cluster(
    name: str,
    ports: Sequence[int],
    *,
    breakers: CircuitBreakers | None = None,
    outlier: OutlierDetection | None = None,
) -> ClusterConfig:
    c = Cluster(
        name,
        ClusterKind.EDS,
        circuit_breakers=breakers or CircuitBreakers(),
        outlier_detection=outlier,
    )
    return ClusterConfig(c, assignment(name, ports))


def route(action: object, prefix: str = "/", **kw: object) -> Route:
    return Route(RouteMatch(PathMatchKind.PREFIX, prefix), action, **kw)  # type: ignore[arg-type]


def snapshot(
    routes: Sequence[Route],
    clusters: Sequence[ClusterConfig | ClusterError],
    *,
    version: int = 1,
) -> TargetSnapshot:
    vhost = VirtualHost("vh", ("*",), tuple(routes))
    rc = RouteConfiguration("rc", (vhost,))
    hcm = HttpConnectionManager(
        http_filters=(HttpFilter(FAULT, "fault", FaultConfig()),), route_config=rc
    )
    entries = {(c.name if isinstance(c, ClusterConfig) else c.cluster_name): c for c in clusters}
    return TargetSnapshot(
        "svc:80",
        "",
        "svc:80",
        Listener("svc:80", api_listener=hcm),
        rc,
        vhost,
        MappingProxyType(entries),
        version,
    )


def request(path: str = "/", headers: Sequence[tuple[str, str]] = ()) -> RequestInfo:
    return RequestInfo("GET", "svc:80", path, Headers(headers))


Responder = Callable[[Send], tuple[Outcome, float]]


class Driver:
    """Runs a flow to the end; records every action; answers Sends with ``respond``."""

    def __init__(self, rt: MeshRuntime, clock: FakeClock) -> None:
        self.rt = rt
        self.clock = clock
        self.actions: list[object] = []

    def run(self, snap: TargetSnapshot, req: RequestInfo, respond: Responder) -> CallResult:
        flow = call_flow(self.rt, snap, req, clock=self.clock)
        reply: AttemptResult | None = None
        try:
            action = next(flow)
            while True:
                self.actions.append(action)
                reply = None
                if isinstance(action, Send):
                    outcome, took = respond(action)
                    self.clock.now += took
                    reply = AttemptResult(outcome, response=("resp", action.host.key))
                    if outcome.reset is not None:
                        reply = AttemptResult(outcome)
                elif isinstance(action, Sleep):
                    self.clock.now += action.seconds
                action = flow.send(reply)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def sends(self) -> list[Send]:
        return [a for a in self.actions if isinstance(a, Send)]


def ok(send: Send) -> tuple[Outcome, float]:
    return Outcome(status=200), 0.001


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rt(clock: FakeClock) -> MeshRuntime:
    return MeshRuntime(None, rng=random.Random(7), clock=clock)


def idle(rt: MeshRuntime) -> None:
    """Every counter is back to zero."""
    for c in rt.clusters().values():
        assert c.limits.requests == 0, c
        assert c.limits.connections == c.limits.pending == c.limits.retries == 0, c
        for h in c.hosts.values():
            assert h.active_requests == 0, h


# --------------------------------------------------------------------------- routing


def test_no_route_is_404_nr(rt: MeshRuntime, clock: FakeClock) -> None:
    snap = snapshot([route(RouteAction(cluster="a"), prefix="/api")], [cluster("a", [1])])
    result = Driver(rt, clock).run(snap, request("/other"), ok)
    assert result.local_reply is not None
    assert result.local_reply.status == 404
    assert result.local_reply.body == b""
    assert result.flags == ("NR",)


def test_direct_response_and_redirect(rt: MeshRuntime, clock: FakeClock) -> None:
    snap = snapshot(
        [
            route(DirectResponseAction(418, b"teapot"), prefix="/tea"),
            route(RedirectAction(host_redirect="new.example", response_code=302), prefix="/"),
        ],
        [],
    )
    d = Driver(rt, clock)
    tea = d.run(snap, request("/tea"), ok)
    assert tea.local_reply is not None
    assert (tea.local_reply.status, tea.local_reply.body) == (418, b"teapot")
    assert tea.local_reply.kind == ReplyKind.DIRECT_RESPONSE
    moved = d.run(snap, request("/x?y=1"), ok)
    assert moved.local_reply is not None
    assert moved.local_reply.status == 302
    location = dict(moved.local_reply.headers)["location"]
    assert location.startswith("http://new.example")
    assert d.sends() == []


def test_missing_cluster_is_nc_and_broken_cluster_is_uh(rt: MeshRuntime, clock: FakeClock) -> None:
    snap = snapshot(
        [
            route(RouteAction(cluster="gone"), prefix="/gone"),
            route(RouteAction(cluster="bad"), prefix="/"),
        ],
        [ClusterError("bad", ErrorKind.DOES_NOT_EXIST, "no such cluster")],
    )
    d = Driver(rt, clock)
    gone = d.run(snap, request("/gone"), ok)
    assert gone.local_reply is not None
    assert gone.local_reply.status == 503 and gone.flags == ("NC",)
    bad = d.run(snap, request("/"), ok)
    assert bad.local_reply is not None
    assert (bad.local_reply.status, bad.local_reply.body) == (503, b"no healthy upstream")
    assert bad.flags == ("UH",)


def test_no_endpoints_is_no_healthy_upstream(rt: MeshRuntime, clock: FakeClock) -> None:
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [])])
    result = Driver(rt, clock).run(snap, request(), ok)
    assert result.local_reply is not None
    assert result.local_reply.body == b"no healthy upstream"
    assert result.local_reply.kind == ReplyKind.NO_HEALTHY_UPSTREAM


# --------------------------------------------------------------------------- attempts


def test_success_holds_counters_until_release(rt: MeshRuntime, clock: FakeClock) -> None:
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1])])
    d = Driver(rt, clock)
    result = d.run(snap, request(), ok)
    assert result.local_reply is None
    assert result.response == ("resp", "127.0.0.1:1")
    assert result.attempts == 1 and result.flags == ()
    (send,) = d.sends()
    assert send.request.headers.get("x-request-id")
    c = rt.clusters()["a"]
    assert c.limits.requests == 1  # the body is still being read
    result.release()
    result.release()  # idempotent
    idle(rt)


def test_weighted_split_is_per_request(rt: MeshRuntime, clock: FakeClock) -> None:
    action = RouteAction(weighted_clusters=(WeightedCluster("a", 80), WeightedCluster("b", 20)))
    snap = snapshot([route(action)], [cluster("a", [1]), cluster("b", [2])])
    d = Driver(rt, clock)
    seen = {"a": 0, "b": 0}
    for _ in range(2000):
        r = d.run(snap, request(), ok)
        assert r.cluster is not None
        seen[r.cluster] += 1
        r.release()
    assert abs(seen["a"] / 2000 - 0.8) < 0.03, seen
    idle(rt)


def test_retry_goes_to_another_host(rt: MeshRuntime, clock: FakeClock) -> None:
    policy = RetryPolicy(
        retry_on=frozenset({"5xx"}),
        num_retries=2,
        retry_host_predicates=(PREVIOUS_HOSTS,),
        host_selection_retry_max_attempts=5,
    )
    snap = snapshot([route(RouteAction(cluster="a", retry_policy=policy))], [cluster("a", [1, 2])])
    d = Driver(rt, clock)

    def first_fails(send: Send) -> tuple[Outcome, float]:
        return (Outcome(status=503) if send.attempt == 1 else Outcome(status=200)), 0.001

    result = d.run(snap, request(), first_fails)
    assert result.local_reply is None
    assert result.attempts == 2
    first, second = d.sends()
    assert first.host.key != second.host.key
    assert any(isinstance(a, Discard) for a in d.actions)
    sleeps = [a.seconds for a in d.actions if isinstance(a, Sleep)]
    assert len(sleeps) <= 1 and all(0 <= s < 0.025 for s in sleeps)
    result.release()
    idle(rt)
    assert rt.clusters()["a"].limits.try_start_retry(0)  # the retry slot was given back


def test_retries_exhausted_return_the_last_response(rt: MeshRuntime, clock: FakeClock) -> None:
    policy = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=2)
    snap = snapshot([route(RouteAction(cluster="a", retry_policy=policy))], [cluster("a", [1])])
    d = Driver(rt, clock)
    result = d.run(snap, request(), lambda s: (Outcome(status=503), 0.001))
    assert result.local_reply is None
    assert result.attempts == 3
    assert "URX" in result.flags
    result.release()
    idle(rt)


def test_connect_failure_without_retry_is_envoys_503(rt: MeshRuntime, clock: FakeClock) -> None:
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1])])
    d = Driver(rt, clock)
    result = d.run(snap, request(), lambda s: (Outcome(reset=ResetKind.CONNECT_FAILURE), 0.0))
    assert result.local_reply is not None
    assert result.local_reply.status == 503
    assert result.local_reply.body == (
        b"upstream connect error or disconnect/reset before headers. "
        b"reset reason: remote connection failure"
    )
    assert result.flags == ("UF",)
    idle(rt)


def test_route_timeout_spans_retries(rt: MeshRuntime, clock: FakeClock) -> None:
    policy = RetryPolicy(
        retry_on=frozenset({"5xx"}), num_retries=10, per_try_timeout=0.4, base_interval=0.001
    )
    action = RouteAction(cluster="a", retry_policy=policy, timeout=1.0)
    snap = snapshot([route(action)], [cluster("a", [1])])
    d = Driver(rt, clock)
    start = clock.now

    def hang(send: Send) -> tuple[Outcome, float]:
        assert send.timeout is not None
        return Outcome(reset=ResetKind.PER_TRY_TIMEOUT), send.timeout

    result = d.run(snap, request(), hang)
    assert result.local_reply is not None
    assert (result.local_reply.status, result.local_reply.body) == (
        504,
        b"upstream request timeout",
    )
    assert "UT" in result.flags
    assert clock.now - start == pytest.approx(1.0, abs=1e-6)
    timeouts = [s.timeout for s in d.sends()]
    assert timeouts[0] == pytest.approx(0.4)
    assert len(timeouts) == 3  # 0.4 + 0.4 + the last 0.2
    idle(rt)


def test_header_timeout_overrides_route(rt: MeshRuntime, clock: FakeClock) -> None:
    snap = snapshot([route(RouteAction(cluster="a", timeout=0.0))], [cluster("a", [1])])
    d = Driver(rt, clock)
    req = request(headers=[("x-envoy-upstream-rq-timeout-ms", "250")])
    result = d.run(
        snap, req, lambda s: (Outcome(reset=ResetKind.PER_TRY_TIMEOUT), s.timeout or 0.0)
    )
    assert d.sends()[0].timeout == pytest.approx(0.25)
    assert result.local_reply is not None and result.local_reply.status == 504


def test_overflow_is_503_overloaded_and_not_retried(rt: MeshRuntime, clock: FakeClock) -> None:
    policy = RetryPolicy(retry_on=frozenset({"5xx", "reset"}), num_retries=3)
    breakers = CircuitBreakers(max_requests=1)
    snap = snapshot(
        [route(RouteAction(cluster="a", retry_policy=policy))],
        [cluster("a", [1], breakers=breakers)],
    )
    held = call_flow(rt, snap, request(), clock=clock)
    first = next(held)
    assert isinstance(first, Send)  # the first call holds the only request slot
    d = Driver(rt, clock)
    result = d.run(snap, request(), ok)
    assert result.local_reply is not None
    assert result.local_reply.status == 503
    assert ("x-envoy-overloaded", "true") in result.local_reply.headers
    assert result.flags == ("UO",)
    assert d.sends() == []
    held.close()  # cancelled mid-attempt: gives its slot back
    idle(rt)
    again = d.run(snap, request(), ok)
    assert again.local_reply is None
    again.release()


def test_http1_pending_limit(rt: MeshRuntime, clock: FakeClock) -> None:
    breakers = CircuitBreakers(max_connections=1, max_pending_requests=1)
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1], breakers=breakers)])
    one = call_flow(rt, snap, request(), clock=clock)
    two = call_flow(rt, snap, request(), clock=clock)
    assert isinstance(next(one), Send)  # holds the connection
    assert isinstance(next(two), WaitConnection)  # pending: waits for the connection
    result = Driver(rt, clock).run(snap, request(), ok)
    assert result.local_reply is not None and result.flags == ("UO",)
    one.close()
    two.close()
    idle(rt)


def test_grpc_requests_hold_no_http1_connection(rt: MeshRuntime, clock: FakeClock) -> None:
    # A proxyless gRPC cluster has no protocol options (HTTP/1.1 in the model), but gRPC is
    # HTTP/2: max_connections / pending do not limit its requests, max_requests does.
    breakers = CircuitBreakers(max_connections=1, max_pending_requests=1, max_requests=3)
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1], breakers=breakers)])
    grpc_req = RequestInfo("POST", "svc:80", "/pkg.Svc/M", Headers(), "http", None, True)
    held = [call_flow(rt, snap, grpc_req, clock=clock) for _ in range(3)]
    assert all(isinstance(next(f), Send) for f in held)
    limits = rt.clusters()["a"].limits
    assert limits.connections == limits.pending == 0 and limits.requests == 3
    result = Driver(rt, clock).run(snap, grpc_req, ok)
    assert result.local_reply is not None and result.flags == ("UO",)  # max_requests
    for f in held:
        f.close()
    idle(rt)


def test_outlier_ejects_and_returns(rt: MeshRuntime, clock: FakeClock) -> None:
    od = OutlierDetection(consecutive_5xx=3, base_ejection_time=30.0, max_ejection_percent=50)
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1, 2], outlier=od)])
    d = Driver(rt, clock)

    def port1_fails(send: Send) -> tuple[Outcome, float]:
        return (Outcome(status=503) if send.host.address.port == 1 else Outcome(status=200)), 0

    for _ in range(10):
        d.run(snap, request(), port1_fails).release()
    d.actions.clear()
    for _ in range(10):
        d.run(snap, request(), port1_fails).release()
    assert {s.host.address.port for s in d.sends()} == {2}  # port 1 is ejected
    clock.now += 31.0
    d.actions.clear()
    for _ in range(10):
        d.run(snap, request(), ok).release()
    assert {s.host.address.port for s in d.sends()} == {1, 2}  # back after the ejection
    idle(rt)


# --------------------------------------------------------------------------- faults, mirrors


def fault_route(fault: FaultConfig) -> Route:
    return route(
        RouteAction(cluster="a"),
        typed_per_filter_config=MappingProxyType({FAULT: FilterConfigOverride(fault)}),
    )


def test_fault_delay_then_abort(rt: MeshRuntime, clock: FakeClock) -> None:
    fault = FaultConfig(
        delay=FaultDelay(FractionalPercent(100), fixed_delay=2.0),
        abort=FaultAbort(FractionalPercent(100), http_status=418),
    )
    snap = snapshot([fault_route(fault)], [cluster("a", [1])])
    d = Driver(rt, clock)
    start = clock.now
    result = d.run(snap, request(), ok)
    assert isinstance(d.actions[0], Sleep) and d.actions[0].seconds == 2.0
    assert clock.now - start == 2.0
    assert result.local_reply is not None
    assert (result.local_reply.status, result.local_reply.body) == (418, b"fault filter abort")
    assert result.flags == ("DI", "FI")
    assert d.sends() == []
    assert rt.active_faults.count == 0


def test_fault_delay_is_not_counted_in_the_route_timeout(rt: MeshRuntime, clock: FakeClock) -> None:
    fault = FaultConfig(delay=FaultDelay(FractionalPercent(100), fixed_delay=5.0))
    r = route(
        RouteAction(cluster="a", timeout=1.0),
        typed_per_filter_config=MappingProxyType({FAULT: FilterConfigOverride(fault)}),
    )
    snap = snapshot([r], [cluster("a", [1])])
    d = Driver(rt, clock)
    result = d.run(snap, request(), ok)
    assert result.local_reply is None
    assert result.flags == ("DI",)
    assert d.sends()[0].timeout == pytest.approx(1.0)
    result.release()


def test_mirror_is_fire_and_forget_with_shadow_host(rt: MeshRuntime, clock: FakeClock) -> None:
    action = RouteAction(cluster="a", request_mirror_policies=(RequestMirrorPolicy("m"),))
    snap = snapshot([route(action)], [cluster("a", [1]), cluster("m", [9])])
    d = Driver(rt, clock)
    result = d.run(snap, request(), ok)
    mirrors = [a for a in d.actions if isinstance(a, Mirror)]
    assert len(mirrors) == 1
    assert mirrors[0].request.authority == "svc-shadow:80"
    assert mirrors[0].host.address.port == 9
    assert d.sends()[0].request.authority == "svc:80"
    result.release()


def test_flow_yields_only_known_actions(rt: MeshRuntime, clock: FakeClock) -> None:
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1])])
    flow: Generator[object, object, CallResult] = call_flow(rt, snap, request(), clock=clock)
    action = next(flow)
    assert isinstance(action, Send)
    with pytest.raises(TypeError):
        flow.send("not an AttemptResult")
    idle(rt)


def test_lazy_response_headers_behave_as_headers() -> None:
    from pymesh.httpx._transport import _RawHeaders

    raw = [(b"Content-Type", b"text/plain"), (b"X-A", b"1"), (b"x-a", b"2")]
    lazy = _RawHeaders(raw)
    eager = Headers([("content-type", "text/plain"), ("x-a", "1"), ("x-a", "2")])
    assert lazy.get("x-a") == "1,2"
    assert lazy.get_all("X-A") == ["1", "2"]
    assert "content-type" in lazy and "nope" not in lazy
    assert lazy == eager and list(lazy) == list(eager) and len(lazy) == 3
    assert lazy.with_set("x-a", "3").get("x-a") == "3"


# --------------------------------------------------------------------------- runners


def test_async_runner_drives_the_same_flow(rt: MeshRuntime, clock: FakeClock) -> None:
    import asyncio

    from pymesh.core.flow import drive_async, drive_sync

    policy = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=2, base_interval=0.001)
    snap = snapshot([route(RouteAction(cluster="a", retry_policy=policy))], [cluster("a", [1])])
    log: list[str] = []

    def answer(action: Send) -> AttemptResult:
        log.append(f"send{action.attempt}")
        return AttemptResult(Outcome(status=503 if action.attempt == 1 else 200), "body")

    async def asend(action: Send) -> AttemptResult:
        return answer(action)

    async def asleep(seconds: float) -> None:
        log.append("sleep")

    async def adiscard(response: object) -> None:
        log.append("discard")

    sync_log_start = len(log)
    r1 = drive_sync(
        call_flow(rt, snap, request(), clock=clock),
        send=answer,
        sleep=lambda s: log.append("sleep"),
        mirror=lambda m: None,
        discard=lambda r: log.append("discard"),
    )
    sync_log = log[sync_log_start:]
    log.clear()
    r2 = asyncio.run(
        drive_async(
            call_flow(rt, snap, request(), clock=clock),
            send=asend,
            sleep=asleep,
            mirror=lambda m: None,
            discard=adiscard,
        )
    )
    assert log == sync_log
    assert sync_log[:2] == ["send1", "discard"] and sync_log[-1] == "send2"
    assert (r1.attempts, r2.attempts) == (2, 2)
    r1.release()
    r2.release()
    idle(rt)


def test_a_runner_error_closes_the_flow_and_gives_back_its_slots(
    rt: MeshRuntime, clock: FakeClock
) -> None:
    from pymesh.core.flow import drive_sync

    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1])])

    def boom(action: Send) -> AttemptResult:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        drive_sync(
            call_flow(rt, snap, request(), clock=clock),
            send=boom,
            sleep=lambda s: None,
            mirror=lambda m: None,
            discard=lambda r: None,
        )
    idle(rt)
    assert rt.clusters()["a"].limits.try_start_request()


# --------------------------------------------------------------------------- runtime


def test_runtime_keeps_hosts_and_counts_across_updates(rt: MeshRuntime, clock: FakeClock) -> None:
    first = cluster("a", [1, 2], breakers=CircuitBreakers(max_requests=5))
    c = rt.cluster_for(first, clock.now)
    host1 = c.hosts["127.0.0.1:1"]
    assert c.limits.try_start_request()
    host1.active_requests = 3
    # EDS: port 2 leaves, port 3 arrives; CDS: new thresholds.
    second = ClusterConfig(
        Cluster("a", ClusterKind.EDS, circuit_breakers=CircuitBreakers(max_requests=1)),
        assignment("a", [1, 3]),
    )
    removed: list[frozenset[str]] = []
    rt.add_hosts_removed_listener(removed.append)
    assert rt.cluster_for(second, clock.now) is c
    assert c.hosts["127.0.0.1:1"] is host1 and host1.active_requests == 3
    assert set(c.hosts) == {"127.0.0.1:1", "127.0.0.1:3"}
    assert removed == [frozenset({"127.0.0.1:2"})]
    assert not c.limits.try_start_request()  # the held request counts against the new limit
    c.limits.end_request()
    assert c.limits.try_start_request()
    c.limits.end_request()
    host1.active_requests = 0


def test_hosts_shared_by_subsets_are_reported_only_when_gone_from_all(
    rt: MeshRuntime, clock: FakeClock
) -> None:
    removed: list[frozenset[str]] = []
    rt.add_hosts_removed_listener(removed.append)
    rt.cluster_for(cluster("all", [1, 2]), clock.now)
    rt.cluster_for(cluster("v1", [1]), clock.now)
    rt.cluster_for(cluster("all", [2]), clock.now)  # port 1 left "all" but "v1" has it
    assert removed == []
    rt.cluster_for(cluster("v1", [2]), clock.now)
    assert removed == [frozenset({"127.0.0.1:1"})]


def test_clusters_no_target_uses_are_released(rt: MeshRuntime, clock: FakeClock) -> None:
    removed: list[frozenset[str]] = []
    rt.add_hosts_removed_listener(removed.append)
    one = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1]), cluster("b", [2])])
    rt.on_target_state("svc:80", one)
    assert set(rt.clusters()) == {"a", "b"}
    two = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1])], version=2)
    rt.on_target_state("svc:80", two)
    assert set(rt.clusters()) == {"a"}
    assert removed == [frozenset({"127.0.0.1:2"})]


def test_ejection_end_rebuilds_the_balancer_at_pick_time(rt: MeshRuntime, clock: FakeClock) -> None:
    od = OutlierDetection(consecutive_5xx=1, base_ejection_time=10.0, max_ejection_percent=100)
    c = rt.cluster_for(cluster("a", [1], outlier=od), clock.now)
    host = c.hosts["127.0.0.1:1"]
    from pymesh.core.types import PickContext

    assert c.outlier is not None and c.outlier.record(host, Outcome(status=500), clock.now)
    c.ejections_changed(clock.now)
    # A single ejected host: Envoy's panic mode may still route to it, so check the state.
    assert host.is_ejected(clock.now)
    assert c.usable_hosts == 0
    clock.now += 11.0
    assert c.pick(PickContext(clock.now)) is host
    assert c.usable_hosts == 1


def test_aggregate_cluster_uses_the_first_leaf_with_hosts(
    rt: MeshRuntime, clock: FakeClock
) -> None:
    agg = ClusterConfig(
        Cluster("agg", ClusterKind.AGGREGATE, aggregate_clusters=("p", "s")),
        leaf_clusters=("p", "s"),
    )
    snap = snapshot([route(RouteAction(cluster="agg"))], [agg, cluster("p", []), cluster("s", [7])])
    d = Driver(rt, clock)
    result = d.run(snap, request(), ok)
    assert result.local_reply is None
    assert d.sends()[0].host.address.port == 7
    result.release()


def test_one_retry_slot_is_enough_for_sequential_retries(rt: MeshRuntime, clock: FakeClock) -> None:
    # Envoy gives the previous retry's slot back at the next decision (resetRetry), so
    # max_retries=1 still allows every retry of one call, one at a time.
    policy = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3, base_interval=0.001)
    snap = snapshot(
        [route(RouteAction(cluster="a", retry_policy=policy))],
        [cluster("a", [1], breakers=CircuitBreakers(max_retries=1))],
    )
    result = Driver(rt, clock).run(snap, request(), lambda s: (Outcome(status=503), 0.001))
    assert result.attempts == 4
    assert "UO" not in result.flags and "URX" in result.flags
    result.release()
    idle(rt)


def test_a_second_call_cannot_retry_while_one_holds_the_only_retry_slot(
    rt: MeshRuntime, clock: FakeClock
) -> None:
    policy = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3, base_interval=0.001)
    snap = snapshot(
        [route(RouteAction(cluster="a", retry_policy=policy))],
        [cluster("a", [1], breakers=CircuitBreakers(max_retries=1))],
    )
    holder = call_flow(rt, snap, request(), clock=clock)
    assert isinstance(next(holder), Send)
    action = holder.send(AttemptResult(Outcome(status=503), "r1"))
    assert isinstance(action, Discard)  # it decided to retry: it holds the retry slot
    other = Driver(rt, clock).run(snap, request(), lambda s: (Outcome(status=503), 0.001))
    assert other.attempts == 1 and "UO" in other.flags  # its retry overflowed
    other.release()
    holder.close()
    idle(rt)


def test_stream_idle_timeout_is_504_stream_timeout_not_retried(
    rt: MeshRuntime, clock: FakeClock
) -> None:
    policy = RetryPolicy(retry_on=frozenset({"5xx", "reset"}), num_retries=3)
    action = RouteAction(cluster="a", retry_policy=policy, idle_timeout=2.0)
    snap = snapshot([route(action)], [cluster("a", [1])])
    flow = call_flow(rt, snap, request(), clock=clock)
    send = next(flow)
    assert isinstance(send, Send) and send.idle == 2.0
    clock.now += 2.0
    with pytest.raises(StopIteration) as stop:
        flow.send(AttemptResult(Outcome(reset=ResetKind.PER_TRY_TIMEOUT), stream_idle=True))
    result: CallResult = stop.value.value
    assert result.local_reply is not None
    assert (result.local_reply.status, result.local_reply.body) == (504, b"stream timeout")
    assert result.flags == ("SI",)
    idle(rt)


def test_default_stream_idle_timeout_is_envoys_five_minutes(
    rt: MeshRuntime, clock: FakeClock
) -> None:
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1])])
    flow = call_flow(rt, snap, request(), clock=clock)
    send = next(flow)
    assert isinstance(send, Send) and send.idle == 300.0
    flow.close()
    off = snapshot([route(RouteAction(cluster="a", idle_timeout=0.0))], [cluster("a", [1])])
    flow = call_flow(rt, off, request(), clock=clock)
    send = next(flow)
    assert isinstance(send, Send) and send.idle is None
    flow.close()
    idle(rt)


def test_unreachable_hosts_are_left_out_until_reachable(rt: MeshRuntime, clock: FakeClock) -> None:
    # An adapter reports endpoints it cannot connect to (gRPC: TRANSIENT_FAILURE).
    snap = snapshot([route(RouteAction(cluster="c"))], [cluster("c", [1, 2])])
    runner = Driver(rt, clock)

    def hosts_picked(n: int) -> set[str]:
        seen: set[str] = set()
        for _ in range(n):
            result = runner.run(snap, request(), ok)
            assert result.host is not None
            seen.add(result.host.key)
            result.release()
        return seen

    assert hosts_picked(10) == {"127.0.0.1:1", "127.0.0.1:2"}
    rt.set_unreachable(frozenset({"127.0.0.1:1"}))
    assert rt.unreachable == frozenset({"127.0.0.1:1"})
    assert hosts_picked(10) == {"127.0.0.1:2"}
    rt.set_unreachable(frozenset({"127.0.0.1:1", "127.0.0.1:2"}))
    result = runner.run(snap, request(), ok)
    assert result.local_reply is not None and result.flags == ("UH",)
    rt.set_unreachable(frozenset())
    assert hosts_picked(10) == {"127.0.0.1:1", "127.0.0.1:2"}


# --------------------------------------------------------------------------- hot-path shortcuts


def grpc_request(headers: Sequence[tuple[str, str]] = ()) -> RequestInfo:
    return RequestInfo("POST", "svc:80", "/pkg.Svc/Method", Headers(headers), grpc=True)


def test_grpc_ok_ends_the_call_and_a_retriable_status_is_retried(
    rt: MeshRuntime, clock: FakeClock
) -> None:
    # The retry state is made only once an outcome may need it: never for a gRPC OK, after
    # the first attempt otherwise (which must still count that attempt's host).
    policy = RetryPolicy(
        retry_on=frozenset({"unavailable"}),
        num_retries=2,
        retry_host_predicates=(PREVIOUS_HOSTS,),
        host_selection_retry_max_attempts=5,
    )
    snap = snapshot([route(RouteAction(cluster="a", retry_policy=policy))], [cluster("a", [1, 2])])
    d = Driver(rt, clock)
    done = d.run(snap, grpc_request(), lambda s: (Outcome(status=200, grpc_status=0), 0.001))
    assert done.local_reply is None and done.attempts == 1 and done.flags == ()
    done.release()

    def unavailable_once(send: Send) -> tuple[Outcome, float]:
        status = 14 if send.attempt == 1 else 0
        return Outcome(status=200, grpc_status=status), 0.001

    d = Driver(rt, clock)
    retried = d.run(snap, grpc_request(), unavailable_once)
    assert retried.attempts == 2
    assert [s.attempt for s in d.sends()] == [1, 2]
    retried.release()
    # A non-retriable status ends at once, with the state made but not used.
    d = Driver(rt, clock)
    failed = d.run(snap, grpc_request(), lambda s: (Outcome(status=200, grpc_status=3), 0.001))
    assert failed.attempts == 1 and failed.flags == ()
    failed.release()
    idle(rt)


def test_request_id_is_a_uuid4_formatted_only_when_read(clock: FakeClock) -> None:
    import re
    import uuid

    from pymesh.core.flow import RequestIdHeaders

    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1])])
    ids = []
    for _ in range(2):  # the same seed draws the same id (the RNG order is the flow's)
        rt = MeshRuntime(None, rng=random.Random(11), clock=clock)
        d = Driver(rt, clock)
        result = d.run(snap, grpc_request([("x-user", "u1")]), ok)
        (send,) = d.sends()
        headers = send.request.headers
        assert type(headers) is RequestIdHeaders
        assert headers.base == (("x-user", "u1"),)  # what a gRPC adapter reads
        rid = headers.get("x-request-id")
        assert rid is not None and re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", rid)
        parsed = uuid.UUID(rid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert list(headers) == [("x-user", "u1"), ("x-request-id", rid)]
        assert headers == Headers(list(headers)) and len(headers) == 2
        assert "X-Request-Id" in headers
        ids.append(rid)
        result.release()
        idle(rt)
    assert ids[0] == ids[1]
    # A caller's own id is kept, and no other is added.
    rt = MeshRuntime(None, rng=random.Random(11), clock=clock)
    d = Driver(rt, clock)
    d.run(snap, request(headers=[("x-request-id", "mine")]), ok).release()
    (send,) = d.sends()
    assert send.request.headers.get_all("x-request-id") == ["mine"]
