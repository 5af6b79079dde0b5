"""pymesh.xds.pacing: a paced thread sleeps once per slice of work; others never do."""

from __future__ import annotations

import itertools
import threading

import pytest

from pymesh.xds import pacing


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def perf(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(pacing, "_perf", fake.perf)
    monkeypatch.setattr(pacing, "_sleep", fake.sleep)
    return fake


def test_an_unpaced_thread_never_sleeps(clock: FakeTime) -> None:
    for _ in range(10):
        clock.now += 1.0
        pacing.checkpoint()
    pacing.restart()
    assert clock.sleeps == []


def work(clock: FakeTime, seconds: float, step: float = 0.0001) -> list[float]:
    """Run ``seconds`` of work in steps with a checkpoint after each: the slices (time
    between pauses) seen."""
    marks = [clock.now]
    paused = len(clock.sleeps)
    for _ in range(round(seconds / step)):
        clock.now += step
        pacing.checkpoint()
        if len(clock.sleeps) > paused:
            paused = len(clock.sleeps)
            marks.append(clock.now)
    return [round(b - a - 0.00002, 6) for a, b in itertools.pairwise(marks)]


def test_a_paced_thread_pauses_after_each_slice_of_work(clock: FakeTime) -> None:
    with pacing.paced(slice_=0.0002, pause=0.00002):
        assert work(clock, 0.0021) == [0.0002] * 10
        assert set(clock.sleeps) == {0.00002}
        clock.now += 5.0  # idle, waiting for work: the next task starts a fresh slice
        pacing.restart()
        assert work(clock, 0.0003) == [0.0002]
    clock.now += 1.0
    count = len(clock.sleeps)
    pacing.checkpoint()  # the block ended: unpaced again
    assert len(clock.sleeps) == count


def test_pacing_is_per_thread_and_nests(clock: FakeTime) -> None:
    other: list[int] = []

    def elsewhere() -> None:
        clock.now += 1.0
        pacing.checkpoint()
        other.append(len(clock.sleeps))

    with pacing.paced(slice_=0.001, pause=0.0001):
        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        assert other == [0]  # the other thread is not paced
        with pacing.paced(slice_=10.0, pause=0.5):
            clock.now += 1.0
            pacing.checkpoint()
            assert clock.sleeps == []
        clock.now += 1.0
        pacing.checkpoint()  # the outer pacing is back
        assert clock.sleeps == [0.0001]


def test_the_xds_work_serializer_is_paced(clock: FakeTime) -> None:
    from pymesh.xds._serializer import Serializer
    from pymesh.xds.clock import SystemClock

    s = Serializer(SystemClock())
    try:

        def work() -> int:
            clock.now += 1.0
            pacing.checkpoint()
            return len(clock.sleeps)

        assert s.run_sync(work) == 1
    finally:
        s.close()
