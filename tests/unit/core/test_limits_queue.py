"""The HTTP/1.1 pending queue: Envoy's connection-pool semantics, on a fake clock.

A request past ``max_connections`` waits (FIFO) for the next connection given back, bounded
by ``max_pending_requests`` and by the call's overall deadline. No sockets, no sleeps: the
flows are driven by hand and the clock only moves when a test moves it.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from pymesh.core.flow import (
    AttemptResult,
    CallResult,
    Send,
    WaitConnection,
    call_flow,
    wait_connection_async,
    wait_connection_sync,
)
from pymesh.core.limits import ClusterLimits
from pymesh.core.runtime import MeshRuntime
from pymesh.core.types import Outcome
from pymesh.model.cluster import CircuitBreakers
from pymesh.model.route import RouteAction
from tests.unit.core.test_flow import FakeClock, cluster, request, route, snapshot

# -- ClusterLimits alone ------------------------------------------------------------------


def test_queue_is_bounded_and_fifo() -> None:
    limits = ClusterLimits(CircuitBreakers(max_connections=1, max_pending_requests=2))
    assert limits.try_open_connection()
    assert not limits.try_open_connection()
    first, second = limits.queue_pending(), limits.queue_pending()
    assert first is not None and second is not None
    assert limits.queue_pending() is None  # the queue is full: overflow
    s = limits.stats()
    assert (s.connections, s.pending, s.pending_overflow, s.cx_overflow) == (1, 2, 1, 1)
    woken: list[str] = []
    assert not limits.arm(first, lambda: woken.append("first"))
    assert not limits.arm(second, lambda: woken.append("second"))
    limits.close_connection()  # handed to the oldest waiter, the count stays
    assert woken == ["first"] and first.granted and not second.granted
    assert (limits.connections, limits.pending) == (1, 1)
    assert limits.leave_queue(first)  # granted: it holds the connection now
    limits.close_connection()
    assert woken == ["first", "second"]
    assert limits.leave_queue(second)
    limits.close_connection()  # nobody waits: the connection count drops
    assert (limits.connections, limits.pending, limits.queued()) == (0, 0, 0)


def test_leaving_the_queue_gives_the_place_up() -> None:
    limits = ClusterLimits(CircuitBreakers(max_connections=1, max_pending_requests=2))
    assert limits.try_open_connection()
    gone, stays = limits.queue_pending(), limits.queue_pending()
    assert gone is not None and stays is not None
    assert not limits.leave_queue(gone)  # its deadline passed before any grant
    assert limits.pending == 1 and limits.queued() == 1
    limits.close_connection()
    assert stays.granted and not gone.granted
    assert limits.arm(stays, lambda: None)  # already granted: the runner need not wait


def test_raised_threshold_lets_waiters_go_and_lowered_one_holds_them() -> None:
    limits = ClusterLimits(CircuitBreakers(max_connections=1, max_pending_requests=5))
    assert limits.try_open_connection()
    tickets = [limits.queue_pending() for _ in range(3)]
    limits.update(CircuitBreakers(max_connections=3, max_pending_requests=5))
    assert [t is not None and t.granted for t in tickets] == [True, True, False]
    assert (limits.connections, limits.pending) == (3, 1)
    limits.update(CircuitBreakers(max_connections=1, max_pending_requests=5))
    limits.close_connection()  # 3 in use > 1: this one closes, the waiter keeps waiting
    limits.close_connection()
    assert tickets[2] is not None and not tickets[2].granted
    limits.close_connection()  # now at the threshold: handed over
    assert tickets[2].granted and (limits.connections, limits.pending) == (1, 0)


def test_sync_wait_wakes_from_another_thread_and_times_out() -> None:
    limits = ClusterLimits(CircuitBreakers(max_connections=1, max_pending_requests=1))
    assert limits.try_open_connection()
    ticket = limits.queue_pending()
    assert ticket is not None
    releaser = threading.Thread(target=limits.close_connection)
    releaser.start()
    wait_connection_sync(WaitConnection(limits, ticket, 30.0))  # returns once granted
    releaser.join()
    assert ticket.granted
    other = limits.queue_pending()
    assert other is not None
    wait_connection_sync(WaitConnection(limits, other, 0.0))  # nothing given back
    assert not limits.leave_queue(other) and limits.pending == 0


def test_async_wait_wakes_and_times_out() -> None:
    limits = ClusterLimits(CircuitBreakers(max_connections=1, max_pending_requests=2))
    assert limits.try_open_connection()

    async def main() -> tuple[bool, bool]:
        ticket = limits.queue_pending()
        assert ticket is not None
        loop = asyncio.get_running_loop()
        loop.call_soon(limits.close_connection)
        await wait_connection_async(WaitConnection(limits, ticket, None))
        late = limits.queue_pending()
        assert late is not None
        await wait_connection_async(WaitConnection(limits, late, 0.0))
        return ticket.granted, limits.leave_queue(late)

    assert asyncio.run(main()) == (True, False)


# -- the flow ------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rt(clock: FakeClock) -> MeshRuntime:
    return MeshRuntime(None, rng=random.Random(7), clock=clock)


def _finish(flow: object, outcome: Outcome) -> CallResult:
    try:
        flow.send(AttemptResult(outcome, response="resp"))  # type: ignore[attr-defined]
    except StopIteration as stop:
        result: CallResult = stop.value
        return result
    raise AssertionError("the flow went on after its only attempt")


BREAKERS = CircuitBreakers(max_connections=1, max_pending_requests=1)


def test_waiting_request_gets_the_connection_when_the_first_ends(
    rt: MeshRuntime, clock: FakeClock
) -> None:
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1], breakers=BREAKERS)])
    one = call_flow(rt, snap, request(), clock=clock)
    two = call_flow(rt, snap, request(), clock=clock)
    three = call_flow(rt, snap, request(), clock=clock)
    assert isinstance(next(one), Send)
    wait = next(two)
    assert isinstance(wait, WaitConnection)
    assert wait.timeout == pytest.approx(15.0)  # Envoy's default route timeout
    try:
        next(three)
        raise AssertionError("a third request must overflow")
    except StopIteration as stop:
        assert stop.value.flags == ("UO",)
        assert stop.value.local_reply.status == 503
    limits = rt.clusters()["a"].limits
    assert limits.pending_overflow == 1 and limits.pending == 1
    clock.now += 1.0
    first = _finish(one, Outcome(status=200))
    assert not wait.ticket.granted  # still busy until the response is finished
    first.release()  # the body is read: the connection goes to the waiter
    assert wait.ticket.granted and (limits.connections, limits.pending) == (1, 0)
    send = two.send(None)
    assert isinstance(send, Send)
    second = _finish(two, Outcome(status=200))
    assert second.local_reply is None and second.flags == ()
    second.release()
    assert (limits.connections, limits.pending, limits.requests) == (0, 0, 0)


def test_waiting_is_bounded_by_the_route_timeout(rt: MeshRuntime, clock: FakeClock) -> None:
    action = RouteAction(cluster="a", timeout=2.0)
    snap = snapshot([route(action)], [cluster("a", [1], breakers=BREAKERS)])
    one = call_flow(rt, snap, request(), clock=clock)
    two = call_flow(rt, snap, request(), clock=clock)
    assert isinstance(next(one), Send)
    clock.now += 0.5
    wait = next(two)
    assert isinstance(wait, WaitConnection) and wait.timeout == pytest.approx(2.0)
    clock.now += 2.0  # the runner's wait timed out: nothing was given back
    try:
        two.send(None)
        raise AssertionError("the waiter must time out")
    except StopIteration as stop:
        result: CallResult = stop.value
    assert result.local_reply is not None and result.local_reply.status == 504
    assert "UT" in result.flags
    limits = rt.clusters()["a"].limits
    assert (limits.pending, limits.queued(), limits.requests) == (0, 0, 1)
    _finish(one, Outcome(status=200)).release()
    assert (limits.connections, limits.requests) == (0, 0)


def test_cancelled_waiter_leaves_the_queue(rt: MeshRuntime, clock: FakeClock) -> None:
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1], breakers=BREAKERS)])
    one = call_flow(rt, snap, request(), clock=clock)
    two = call_flow(rt, snap, request(), clock=clock)
    assert isinstance(next(one), Send)
    assert isinstance(next(two), WaitConnection)
    two.close()  # the caller gave up (task cancelled)
    limits = rt.clusters()["a"].limits
    assert (limits.pending, limits.queued(), limits.requests) == (0, 0, 1)
    _finish(one, Outcome(status=200)).release()
    assert (limits.connections, limits.requests) == (0, 0)


def test_granted_then_cancelled_hands_the_connection_on(rt: MeshRuntime, clock: FakeClock) -> None:
    breakers = CircuitBreakers(max_connections=1, max_pending_requests=2)
    snap = snapshot([route(RouteAction(cluster="a"))], [cluster("a", [1], breakers=breakers)])
    one, two, three = (call_flow(rt, snap, request(), clock=clock) for _ in range(3))
    assert isinstance(next(one), Send)
    w2, w3 = next(two), next(three)
    assert isinstance(w2, WaitConnection) and isinstance(w3, WaitConnection)
    _finish(one, Outcome(status=200)).release()
    assert w2.ticket.granted and not w3.ticket.granted
    two.close()  # granted but cancelled before it sent: the connection goes on (FIFO)
    assert w3.ticket.granted
    assert isinstance(three.send(None), Send)
    _finish(three, Outcome(status=200)).release()
    limits = rt.clusters()["a"].limits
    assert (limits.connections, limits.pending, limits.requests) == (0, 0, 0)
