"""Push debouncing on a fake clock."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

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


def test_a_file_truncated_by_a_stalled_writer_is_not_applied_empty(tmp_path: Path) -> None:
    """Writing in place truncates first: the empty file is held back for ``max_debounce``.

    The hub's rounds run on a fake clock; the writer "stalls" between truncating and writing
    for 0.5 s (the quiet time is 0.1 s), then writes a changed config, which is what the
    next push carries. A file left empty is applied once the hold runs out.
    """
    from pymesh.controlplane.server._backend import IstioBackend

    now = [100.0]
    hub, config = _fake_clock_hub(tmp_path, IstioBackend(), now)
    hosts = lambda: _hosts(hub)  # noqa: E731

    async def rounds_until(t: float) -> None:
        loop = asyncio.get_running_loop()
        hub._wake = asyncio.Event()
        next_poll = now[0]
        while now[0] < t:
            hub._wake.set()  # the round's wait returns at once; time moves by the fake clock
            next_poll = await hub._step(loop, next_poll)
            now[0] = round(now[0] + 0.05, 3)

    assert hosts() == ["web.default.svc.cluster.local"]
    version = hub.version
    config.write_text("")  # truncated; the writer stalls
    asyncio.run(rounds_until(100.5))
    assert hub.version == version and hosts() == ["web.default.svc.cluster.local"]
    config.write_text(_service_entry("web2"))
    os.utime(config, ns=(1, 2))  # a distinct mtime even on a coarse clock
    asyncio.run(rounds_until(101.0))
    assert hub.version == version + 1 and hosts() == ["web2.default.svc.cluster.local"]
    config.write_text("")  # emptied on purpose: applied after the hold
    asyncio.run(rounds_until(101.9))
    assert hosts() == ["web2.default.svc.cluster.local"]
    asyncio.run(rounds_until(102.3))
    assert hub.version == version + 2 and hosts() == []


def _fake_clock_hub(tmp_path: Path, backend: Any, now: list[float]) -> tuple[Any, Path]:
    """A hub over one config file (service ``web``), on the clock ``now[0]``, loaded."""
    from pymesh.controlplane.server._hub import Hub

    config = tmp_path / "web.yaml"
    config.write_text(_service_entry("web"))
    hub = Hub(backend, [config], debounce=0.1, max_debounce=1.0, clock=lambda: now[0])
    hub.use_inotify = False
    hub.initial_load()
    return hub, config


def _hosts(hub: Any) -> list[str]:
    return sorted(s.hostname for s in hub.base_config.services)


def _service_entry(name: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        f"metadata: {{name: {name}, namespace: default}}\n"
        f"spec: {{hosts: [{name}.default.svc.cluster.local], location: MESH_INTERNAL,"
        " resolution: STATIC, ports: [{number: 80, name: http, protocol: HTTP}],"
        " endpoints: [{address: 127.0.0.1}]}\n"
    )


def test_a_changed_file_is_loaded_while_the_debounce_waits(tmp_path: Path) -> None:
    """The files are read and validated at the event (a preload); the push still waits for
    the debounce and uses that load. A preload of files that changed since is not used."""
    from pymesh.controlplane.server._backend import IstioBackend, LoadResult

    loads: list[float] = []

    class Counting(IstioBackend):
        def load(self, paths: object) -> LoadResult:
            loads.append(now[0])
            return super().load(paths)  # type: ignore[arg-type]

    now = [100.0]
    hub, config = _fake_clock_hub(tmp_path, Counting(), now)
    hosts = lambda: _hosts(hub)  # noqa: E731
    version = hub.version

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        hub._wake = asyncio.Event()

        async def step(poll: bool) -> None:
            hub._wake.set()  # type: ignore[union-attr]
            await hub._step(loop, now[0] if poll else now[0] + 60)

        async def preloaded() -> None:
            assert hub._preload is not None
            await hub._preload[1]

        # A change: loaded at once (t=100), pushed after the quiet time only.
        config.write_text(_service_entry("web2"))
        os.utime(config, ns=(1, 2))
        await step(poll=True)
        await preloaded()
        assert loads == [100.0, 100.0] and hub.version == version
        now[0] = 100.05
        await step(poll=True)
        assert len(loads) == 2 and hub.version == version
        now[0] = 100.2
        await step(poll=True)
        assert len(loads) == 2 and hub.version == version + 1
        assert hosts() == ["web2.default.svc.cluster.local"]
        # Preloaded, then written again before the push (not seen by a poll): the push
        # checks the files and loads what they hold now.
        config.write_text(_service_entry("web3"))
        os.utime(config, ns=(3, 4))
        await step(poll=True)
        await preloaded()
        assert len(loads) == 3
        config.write_text(_service_entry("web4"))
        os.utime(config, ns=(5, 6))
        now[0] = 100.4
        await step(poll=False)
        assert len(loads) == 4 and hub.version == version + 2
        assert hosts() == ["web4.default.svc.cluster.local"]

    from pymesh.xds import _memory

    trims = _memory.trims
    asyncio.run(scenario())
    assert _memory.trims == trims + 2  # the C heap handed back after each of the two pushes
