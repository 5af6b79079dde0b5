"""Push debouncing on a fake clock."""

from __future__ import annotations

import pytest

from pymesh.controlplane.server._debounce import Debouncer


def test_quiet_period_then_fire() -> None:
    d = Debouncer(quiet=0.1, max_delay=1.0)
    assert d.deadline() is None and not d.due(5.0)
    d.event(10.0)
    assert not d.due(10.05)
    d.event(10.08)  # extends the quiet window
    assert d.deadline() == pytest.approx(10.18)
    assert not d.due(10.15)
    assert d.due(10.18)
    assert d.fire() == 2
    assert not d.pending and d.deadline() is None


def test_max_delay_caps_a_continuous_burst() -> None:
    d = Debouncer(quiet=0.1, max_delay=1.0)
    t = 0.0
    fired_at = None
    for _ in range(100):
        d.event(t)
        t += 0.05  # never quiet for 100 ms
        if d.due(t):
            fired_at = t
            break
    assert fired_at == pytest.approx(1.0, abs=0.051)


def test_invalid() -> None:
    with pytest.raises(ValueError):
        Debouncer(quiet=2.0, max_delay=1.0)
