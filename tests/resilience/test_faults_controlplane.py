"""Control-plane faults: killed for 30 s under load, restarted fresh with a new version history.

The control plane runs as ``pymesh control-plane`` in its own process on a fixed port, so it
can be SIGKILLed and a new one started at the same address. The clients are
``pymesh.httpx.Client`` over an explicit ``XdsClient``; the backends are uvicorn servers.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pymesh.httpx
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.xds.client import XdsClient
from tests.integration.httpx.conftest import HOST, PORT, Backend, Upstream, service_yaml
from tests.resilience._procs import ControlPlaneProc, free_port

URL = f"http://{HOST}:{PORT}/"
DOWN = 30.0  # seconds the control plane stays dead
ONLY = """\
http:
- route:
  - destination: {{host: {host}, subset: {subset}}}
"""


def only(subset: str) -> str:
    return ONLY.format(host=HOST, subset=subset)


class Plane:
    """A config dir, a control plane process on a fixed port, xDS clients of it."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "mesh"
        self.dir.mkdir()
        self.port = free_port()
        self.proc: ControlPlaneProc | None = None
        self.clients: list[XdsClient] = []

    def write(self, text: str) -> None:
        tmp = self.dir / "echo.tmp"
        tmp.write_text(text)
        tmp.replace(self.dir / "echo.yaml")

    def start(self) -> None:
        self.proc = ControlPlaneProc(self.dir, self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None

    def client(self) -> XdsClient:
        data = generate_bootstrap(xds_address=f"127.0.0.1:{self.port}", namespace="default")
        c = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.kill()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path)
    yield p
    p.close()


@pytest.fixture
def backends() -> Iterator[dict[str, tuple[Backend, Upstream]]]:
    made = {}
    for name in ("v1", "v2"):
        b = Backend(name)
        made[name] = (b, Upstream(b).start())
    yield made
    for _, up in made.values():
        up.stop()


class Load:
    """Steady requests from one thread; every outcome kept with its time."""

    def __init__(self, client: Any, interval: float = 0.01) -> None:
        self.client = client
        self.interval = interval
        self.results: list[tuple[float, int | str, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                r = self.client.get(URL, timeout=10)
                self.results.append((t, r.status_code, r.headers.get("x-backend")))
            except Exception as exc:  # counted as a failure, not raised: the test asserts
                self.results.append((t, type(exc).__name__, None))
            self._stop.wait(self.interval)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def failures(self) -> list[tuple[float, int | str, str | None]]:
        return [r for r in self.results if r[1] != 200]

    def wait_for(self, pred: Callable[[str | None], bool], count: int, timeout: float) -> float:
        """Wait until the last ``count`` answers all satisfy ``pred``; returns when."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.results[-count:]
            if len(tail) == count and all(r[1] == 200 and pred(r[2]) for r in tail):
                return tail[0][0]
            time.sleep(0.05)
        raise AssertionError(f"not reached in {timeout} s: {self.results[-count:]}")


class StreamLog(logging.Handler):
    """Counts the xDS client's "stream ended" records (one per failed connection attempt)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "stream to" in record.getMessage() and "ended" in record.getMessage():
            self.times.append(time.monotonic())


@pytest.fixture
def stream_log() -> Iterator[StreamLog]:
    handler = StreamLog()
    logger = logging.getLogger("pymesh.xds.client")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_control_plane_killed_for_30s_under_load(
    plane: Plane, backends: dict[str, tuple[Backend, Upstream]], stream_log: StreamLog, record: Any
) -> None:
    ports = {name: up.port for name, (_, up) in backends.items()}
    plane.write(service_yaml(ports, virtual_service=only("v1")))
    plane.start()
    xds = plane.client()
    with pymesh.httpx.Client(xds_client=xds, mesh_wait=10) as client, Load(client) as load:
        load.wait_for(lambda b: b == "v1", 20, 15)
        plane.kill()
        killed = time.monotonic()
        time.sleep(2)
        plane.write(service_yaml(ports, virtual_service=only("v2")))  # changed while down
        time.sleep(DOWN - 2)
        attempts_down = len(stream_log.times)
        assert xds.connection_state().connected is False
        served_down = [r for r in load.results if r[0] > killed]
        assert all(r[2] == "v1" for r in served_down if r[1] == 200)  # last good config
        plane.start()
        restarted = time.monotonic()
        switched = load.wait_for(lambda b: b == "v2", 20, 60)
        assert xds.connection_state().connected
    failures = load.failures()
    sent = len(load.results)
    record(
        "control plane killed 30 s under load, config changed while down",
        cases=1,
        requests=sent,
        failed=len(failures),
        note=(
            f"{attempts_down} reconnect attempts in {DOWN:.0f} s (backoff); change applied "
            f"{switched - restarted:.1f} s after the restart"
        ),
    )
    assert failures == []
    assert len(served_down) > 1000  # steady load went on while it was down
    # jittered exponential backoff (1 s, x1.6, 120 s cap): 5-9 attempts in 30 s, not a hot loop
    assert 4 <= attempts_down <= 10, stream_log.times
    gaps = [b - a for a, b in zip(stream_log.times, stream_log.times[1:], strict=False)]
    assert gaps and max(gaps[:attempts_down]) > 4.0, gaps  # the waits grew
    # the client reconnects at its next backoff tick (< 1.2 x 1.6^7 s after the restart)
    assert switched - restarted < 25


@pytest.mark.timeout(120)
def test_control_plane_restarted_fresh(
    plane: Plane, backends: dict[str, tuple[Backend, Upstream]], record: Any
) -> None:
    """A new process starts its versions again at "1": the clients (several) must take what
    it sends, though they hold versions and nonces of the old one, and keep following it."""
    ports = {name: up.port for name, (_, up) in backends.items()}
    plane.write(service_yaml(ports, virtual_service=only("v1")))
    plane.start()
    clients = [plane.client() for _ in range(3)]
    http = [pymesh.httpx.Client(xds_client=c, mesh_wait=10) for c in clients]
    sent = failed = 0

    def converge(subset: str, timeout: float = 20) -> None:
        nonlocal sent, failed
        deadline = time.monotonic() + timeout
        for h in http:
            while True:
                seen = collections.Counter()
                for _ in range(10):
                    r = h.get(URL)
                    sent += 1
                    failed += r.status_code != 200
                    seen[r.headers.get("x-backend")] += 1
                if seen == {subset: 10}:
                    break
                assert time.monotonic() < deadline, (subset, seen)
                time.sleep(0.05)

    try:
        converge("v1")
        for subset in ("v2", "v1", "v2"):  # the old server's history climbs
            plane.write(service_yaml(ports, virtual_service=only(subset)))
            converge(subset)
        plane.kill()
        plane.write(service_yaml(ports, virtual_service=only("v1")))
        plane.start()  # fresh: its version "1" is a number the clients held before
        converge("v1", 40)
        plane.write(service_yaml(ports, virtual_service=only("v2")))  # and it moves on
        converge("v2")
    finally:
        for h in http:
            h.close()
    record(
        "control plane restarted fresh (new version history), 3 clients",
        cases=2,
        requests=sent,
        failed=failed,
    )
    assert failed == 0
