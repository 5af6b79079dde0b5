"""The per-endpoint subchannel pool on a fake clock: lazy creation, one channel per endpoint,
removal retires a channel at once and closes it after the grace period, close() closes all."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pymesh.grpc._subchannels import SubchannelPool


class FakeChannel:
    def __init__(self, key: str) -> None:
        self.key = key
        self.closed = False


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


TIMERS: list[tuple[float, Callable[[], None]]] = []


def make() -> tuple[SubchannelPool[FakeChannel], list[FakeChannel], Clock]:
    opened: list[FakeChannel] = []
    clock = Clock()
    TIMERS.clear()

    def open_channel(key: str) -> FakeChannel:
        ch = FakeChannel(key)
        opened.append(ch)
        return ch

    def close_channel(ch: FakeChannel) -> None:
        ch.closed = True

    pool = SubchannelPool(
        open_channel,
        close_channel,
        grace=30.0,
        clock=clock,
        schedule=lambda delay, fn: TIMERS.append((delay, fn)) or (lambda: None),
    )
    return pool, opened, clock


def test_lazy_and_shared() -> None:
    pool, opened, _ = make()
    assert opened == []
    a = pool.get("10.0.0.1:80")
    assert pool.get("10.0.0.1:80") is a and len(opened) == 1
    made = []
    mc1 = a.multicallable("spec", lambda ch: made.append(ch) or object())
    mc2 = a.multicallable("spec", lambda ch: made.append(ch) or object())
    assert mc1 is mc2 and made == [a.channel]  # multicallables cached per spec
    pool.get("10.0.0.2:80")
    assert sorted(pool.endpoint_keys()) == ["10.0.0.1:80", "10.0.0.2:80"]


def test_removed_endpoint_closed_after_grace() -> None:
    pool, opened, clock = make()
    old = pool.get("10.0.0.1:80")
    pool.get("10.0.0.2:80")
    pool.hosts_removed(frozenset({"10.0.0.1:80", "10.9.9.9:80"}))
    assert pool.endpoint_keys() == ("10.0.0.2:80",)  # no new call uses it
    assert not old.channel.closed  # calls already on it may finish
    assert [d for d, _ in TIMERS] == [30.0]  # a sweep is scheduled after the grace
    clock.now += 29.0
    pool.get("10.0.0.3:80")  # creating a subchannel also sweeps: too early
    assert not old.channel.closed
    clock.now += 2.0
    TIMERS[0][1]()  # the timer fires
    assert old.channel.closed
    again = pool.get("10.0.0.1:80")  # back in EDS later: a fresh channel
    assert again is not old and not again.channel.closed
    assert len(opened) == 4


def test_close_closes_everything() -> None:
    pool, opened, _ = make()
    pool.get("a:1")
    pool.get("b:1")
    pool.hosts_removed(frozenset({"a:1"}))
    closed = pool.close()
    assert {c.key for c in closed} == {"a:1", "b:1"}
    assert all(c.closed for c in opened)
    with pytest.raises(RuntimeError):
        pool.get("c:1")


class State:
    """Stands for a ``grpc.ChannelConnectivity`` (the pool compares states by name)."""

    def __init__(self, name: str) -> None:
        self.name = name


IDLE, READY, FAILURE, SHUTDOWN = (
    State(n) for n in ("IDLE", "READY", "TRANSIENT_FAILURE", "SHUTDOWN")
)


def test_connectivity_reaches_the_runtime() -> None:
    import random

    from pymesh.core.runtime import MeshRuntime
    from pymesh.grpc._subchannels import Reachability

    runtime = MeshRuntime(None, rng=random.Random(1), clock=Clock())
    reach = Reachability.of(runtime)
    assert Reachability.of(runtime) is reach  # one per runtime, shared by its channels
    reports: dict[str, Callable[[object], None]] = {}
    cancelled: list[str] = []

    def watch(key: str, channel: object, report: Callable[[object], None]) -> Callable[[], None]:
        reports[f"{key}#{len(reports)}"] = report
        return lambda: cancelled.append(key)

    def pool() -> SubchannelPool[FakeChannel]:
        return SubchannelPool(FakeChannel, lambda c: None, watch=watch, reachability=reach)

    one, two = pool(), pool()  # two mesh channels of the same runtime
    one.get("a:1")
    one.get("b:1")
    two.get("a:1")
    a1, b1, a2 = reports["a:1#0"], reports["b:1#1"], reports["a:1#2"]
    a1(IDLE)
    b1(READY)
    assert runtime.unreachable == frozenset()
    a1(FAILURE)
    assert runtime.unreachable == {"a:1"}
    a2(READY)  # another channel reaches it: usable
    assert runtime.unreachable == frozenset()
    a2(FAILURE)
    b1(FAILURE)
    assert runtime.unreachable == {"a:1", "b:1"}
    a1(READY)
    assert runtime.unreachable == {"b:1"}
    one.hosts_removed(frozenset({"b:1"}))  # dropped: it reports no more
    assert cancelled == ["b:1"] and runtime.unreachable == frozenset()
    b1(FAILURE)  # a late report of the cancelled watch changes nothing
    assert runtime.unreachable == frozenset()
    a1(SHUTDOWN)
    assert runtime.unreachable == {"a:1"}  # the other channel still says TRANSIENT_FAILURE
    two.close()
    assert runtime.unreachable == frozenset()
    one.close()
