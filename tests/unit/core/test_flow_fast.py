"""The gRPC fast path's core: :func:`fast_plan` (which calls may skip the flow's per-call
decisions) and :func:`resume_flow` (the flow continued where a fast path stopped), on a
fake clock with seeded randomness: a call started by hand as the aio adapter starts it
and resumed must make the same decisions as :func:`call_flow` made whole."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from types import MappingProxyType

from pymesh.core.flow import (
    OVERFLOWED,
    AttemptResult,
    CallResult,
    FastPlan,
    Send,
    Sleep,
    call_flow,
    fast_plan,
    resume_flow,
)
from pymesh.core.runtime import MeshRuntime
from pymesh.core.types import Outcome, PickContext
from pymesh.model.cluster import CircuitBreakers, Random
from pymesh.model.http_filters import FaultConfig, FaultDelay
from pymesh.model.route import (
    FilterConfigOverride,
    FractionalPercent,
    HeaderHash,
    PathMatchKind,
    RequestMirrorPolicy,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    WeightedCluster,
)
from pymesh.model.snapshot import ClusterConfig, TargetSnapshot
from tests.unit.core.test_flow import (
    FAULT,
    PREVIOUS_HOSTS,
    FakeClock,
    cluster,
    grpc_request,
    idle,
    request,
    route,
    snapshot,
)

POLICY = RetryPolicy(
    retry_on=frozenset({"unavailable"}),
    num_retries=3,
    retry_host_predicates=(PREVIOUS_HOSTS,),
    host_selection_retry_max_attempts=5,
)


def plain_snapshot(breakers: CircuitBreakers | None = None) -> TargetSnapshot:
    action = RouteAction(cluster="a", retry_policy=POLICY, timeout=5.0)
    a = cluster("a", [1, 2, 3], breakers=breakers)
    # Random picks: every pick draws, so the hosts follow the order of every draw.
    a = ClusterConfig(dataclasses.replace(a.cluster, lb_policy=Random()), a.endpoints)
    return snapshot([route(action)], [a])


def test_fast_plan_only_for_calls_without_per_call_decisions() -> None:
    rt = MeshRuntime(None, rng=random.Random(1), clock=FakeClock())
    plan = fast_plan(rt, plain_snapshot(), grpc_request())
    assert isinstance(plan, FastPlan) and plan.cluster_name == "a"
    assert plan.deadlines.overall == 5.0  # relative to the call's start
    # Not for: HTTP, metadata, weighted clusters, hash policies, mirrors, faults, a route
    # whose match draws (runtime_fraction), no route.
    assert fast_plan(rt, plain_snapshot(), request()) is None
    assert fast_plan(rt, plain_snapshot(), grpc_request([("x-user", "1")])) is None
    weighted = RouteAction(weighted_clusters=(WeightedCluster("a", 1), WeightedCluster("b", 1)))
    hashed = RouteAction(cluster="a", hash_policies=(HeaderHash("x-user"),))
    mirrored = RouteAction(cluster="a", request_mirror_policies=(RequestMirrorPolicy("a"),))
    ab = [cluster("a", [1]), cluster("b", [2])]
    for action in (weighted, hashed, mirrored):
        assert fast_plan(rt, snapshot([route(action)], ab), grpc_request()) is None
    fault = FaultConfig(delay=FaultDelay(FractionalPercent(100), fixed_delay=0.1))
    faulted = route(
        RouteAction(cluster="a"),
        typed_per_filter_config=MappingProxyType({FAULT: FilterConfigOverride(fault)}),
    )
    assert fast_plan(rt, snapshot([faulted], ab), grpc_request()) is None
    fraction = Route(
        RouteMatch(PathMatchKind.PREFIX, "/", runtime_fraction=FractionalPercent(50)),
        RouteAction(cluster="b"),
    )
    assert (
        fast_plan(rt, snapshot([fraction, route(RouteAction(cluster="a"))], ab), grpc_request())
        is None
    )
    assert (
        fast_plan(rt, snapshot([route(RouteAction(cluster="a"), "/other")], ab), grpc_request())
        is None
    )


Script = Callable[[int], int]  # attempt number -> grpc status


def _answer(status: int) -> AttemptResult:
    return AttemptResult(Outcome(status=200, grpc_status=status), ("resp", status))


def _drive(
    flow: object, clock: FakeClock, script: Script, first: int, log: list[str]
) -> CallResult:
    """Run ``flow`` to its end (attempt ``first`` onwards answered by ``script``)."""
    attempt = first
    reply: AttemptResult | None = None
    try:
        action = next(flow)  # type: ignore[call-overload]
        while True:
            reply = None
            if isinstance(action, Send):
                attempt += 1
                log.append(action.host.key)
                clock.now += 0.001
                reply = _answer(script(attempt))
            elif isinstance(action, Sleep):
                clock.now += action.seconds
            action = flow.send(reply)  # type: ignore[attr-defined]
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _whole(
    snap: TargetSnapshot, script: Script, seed: int
) -> tuple[list[str], CallResult, MeshRuntime]:
    clock = FakeClock()
    rt = MeshRuntime(None, rng=random.Random(seed), clock=clock)
    log: list[str] = []
    result = _drive(call_flow(rt, snap, grpc_request(), clock=clock), clock, script, 0, log)
    return log, result, rt


def _fast(
    snap: TargetSnapshot, script: Script, seed: int
) -> tuple[list[str], CallResult | None, MeshRuntime]:
    """The aio adapter's fast path, step by step, then the flow resumed."""
    clock = FakeClock()
    rt = MeshRuntime(None, rng=random.Random(seed), clock=clock)
    plan = fast_plan(rt, snap, grpc_request())
    assert plan is not None
    now = clock()
    bits = rt.rng.getrandbits(128)
    deadlines = plan.deadlines.starting_at(now)
    crt = rt.leaf_for(snap, plan.entry, now)
    assert crt is not None
    host = crt.pick(PickContext(now))
    assert host is not None
    log: list[str] = []
    if not crt.limits.try_start_request():
        resumed = (now, crt, host, OVERFLOWED)
    else:
        host.active_requests += 1
        log.append(host.key)
        clock.now += 0.001
        status = script(1)
        if status == 0:  # the fast path's own end
            host.active_requests -= 1
            crt.limits.end_request()
            return log, None, rt
        resumed = (now, crt, host, _answer(status))
    flow = resume_flow(rt, snap, plan, bits=bits, deadlines=deadlines, resumed=resumed, clock=clock)
    return log, _drive(flow, clock, script, 1, log), rt


def test_resumed_flow_decides_as_the_whole_flow() -> None:
    scripts: dict[str, Script] = {
        "ok": lambda n: 0,
        "unavailable once": lambda n: 14 if n == 1 else 0,
        "unavailable always": lambda n: 14,
        "not retried": lambda n: 3,
    }
    for seed in range(5):
        snap = plain_snapshot()
        for name, script in scripts.items():
            log, whole, rt = _whole(snap, script, seed)
            fast_log, fast, fast_rt = _fast(snap, script, seed)
            assert fast_log == log, (name, seed)
            if fast is None:
                assert whole.attempts == 1 and whole.local_reply is None, name
            else:
                assert (fast.attempts, fast.flags, fast.response) == (
                    whole.attempts,
                    whole.flags,
                    whole.response,
                ), (name, seed)
                assert fast.host is not None and whole.host is not None
                assert fast.host.key == whole.host.key
                fast.release()
            whole.release()
            idle(rt)
            idle(fast_rt)


def test_resumed_overflow_is_the_flows_503_uo() -> None:
    snap = plain_snapshot(CircuitBreakers(max_requests=0))
    _, whole, rt = _whole(snap, lambda n: 0, 3)
    _, fast, fast_rt = _fast(snap, lambda n: 0, 3)
    assert fast is not None and fast.local_reply is not None and whole.local_reply is not None
    assert (fast.local_reply, fast.flags) == (whole.local_reply, whole.flags)
    assert fast.flags == ("UO",)
    idle(rt)
    idle(fast_rt)
