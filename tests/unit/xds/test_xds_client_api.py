"""The xDS client's public surface (pinned) and its work serializer on a fake clock."""

from __future__ import annotations

import threading

import pytest

import pymesh.xds.ads
import pymesh.xds.client
import pymesh.xds.clock
import pymesh.xds.transport
from pymesh.errors import XdsError
from pymesh.xds._serializer import Serializer
from pymesh.xds.clock import FakeClock


def test_public_names_are_pinned() -> None:
    assert sorted(pymesh.xds.client.__all__) == [
        "ConnectionState",
        "ResourceStatus",
        "ResourceWatcher",
        "XdsClient",
        "get_client",
    ]
    assert sorted(pymesh.xds.clock.__all__) == ["Clock", "FakeClock", "SystemClock"]
    assert set(pymesh.xds.transport.__all__) == {
        "DELTA_METHOD",
        "SOTW_METHOD",
        "AdsStream",
        "ChannelProbe",
        "create_channel",
    }
    assert "AdsState" in pymesh.xds.ads.__all__
    for name in ("watch", "run_in_serializer", "resource_statuses", "connection_state", "close"):
        assert callable(getattr(pymesh.xds.client.XdsClient, name))


def test_fake_clock_fires_due_timers_in_order_before_advance_returns() -> None:
    clock = FakeClock(start=0.0)
    serializer = Serializer(clock, name="pymesh-xds-test")
    fired: list[str] = []
    try:
        serializer.call_at(5.0, lambda: fired.append("b"))
        serializer.call_at(2.0, lambda: fired.append("a"))
        late = serializer.call_at(9.0, lambda: fired.append("never"))
        clock.advance(1.0)
        assert fired == []
        clock.advance(4.0)
        assert fired == ["a", "b"]
        late.cancel()
        clock.advance(10.0)
        assert fired == ["a", "b"]
        with pytest.raises(ValueError):
            clock.advance(-1)
    finally:
        serializer.close()


def test_tasks_run_in_order_on_one_thread_and_failures_are_isolated() -> None:
    serializer = Serializer(FakeClock(), name="pymesh-xds-test")
    seen: list[tuple[int, str]] = []
    try:
        for i in range(20):
            serializer.post(lambda i=i: seen.append((i, threading.current_thread().name)))
        serializer.post(lambda: 1 / 0)  # type: ignore[func-returns-value]
        assert serializer.run_sync(lambda: 42) == 42
        assert [i for i, _ in seen] == list(range(20))
        assert {name for _, name in seen} == {"pymesh-xds-test"}
        with pytest.raises(ZeroDivisionError):
            serializer.run_sync(lambda: 1 // 0)
    finally:
        serializer.close()
    with pytest.raises(XdsError):
        serializer.run_sync(lambda: None)
    serializer.post(lambda: None)  # dropped silently once closed


def test_after_task_hook_runs_after_every_task_and_timer() -> None:
    clock = FakeClock(start=0.0)
    calls: list[str] = []
    serializer = Serializer(clock, after_task=lambda: calls.append("flush"))
    try:
        serializer.run_sync(lambda: calls.append("task"))
        serializer.call_at(1.0, lambda: calls.append("timer"))
        clock.advance(1.0)
        assert calls[:2] == ["task", "flush"]
        assert calls[2:4] == ["timer", "flush"]
    finally:
        serializer.close()
