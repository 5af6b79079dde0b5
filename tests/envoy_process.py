"""Run the real Envoy binary (our oracle) as a subprocess for one test or module.

``run_envoy`` starts Envoy on a static bootstrap, waits for its admin address and its first
listener, yields an :class:`EnvoyProcess`, and always stops it (terminate, then kill).
"""

from __future__ import annotations

import http.client
import json
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EnvoyProcess", "admin_get", "run_envoy", "wait_until"]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms until it is truthy; OSError counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def admin_get(admin: tuple[str, int], path: str) -> str:
    conn = http.client.HTTPConnection(admin[0], admin[1], timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@dataclass(frozen=True)
class EnvoyProcess:
    port: int
    """The port of Envoy's first listener."""
    admin: tuple[str, int]
    log: Path
    proc: subprocess.Popen[bytes] = field(repr=False)


def _listener_port(admin: tuple[str, int]) -> int | None:
    statuses = json.loads(admin_get(admin, "/listeners?format=json")).get("listener_statuses")
    for s in statuses or []:
        p = s["local_address"]["socket_address"].get("port_value")
        if p:
            return int(p)
    return None


@contextmanager
def run_envoy(envoy_bin: Path, bootstrap_json: str, workdir: Path) -> Iterator[EnvoyProcess]:
    """Envoy serving ``bootstrap_json`` (admin on port 0); always stopped on exit."""
    config = workdir / "envoy.json"
    config.write_text(bootstrap_json)
    admin_path = workdir / "admin.txt"
    log_path = workdir / "envoy.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            str(envoy_bin),
            "-c",
            str(config),
            "--base-id",
            str(random.randint(10_000, 60_000)),
            "--admin-address-path",
            str(admin_path),
            "--concurrency",
            "1",
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def alive() -> None:
            assert proc.poll() is None, log_path.read_text()[-3000:]

        def admin_ready() -> bool:
            alive()
            return admin_path.exists() and bool(admin_path.read_text().strip())

        wait_until(admin_ready, 30, "envoy admin")
        host, _, port = admin_path.read_text().strip().rpartition(":")
        admin = (host, int(port))

        def listening() -> bool:
            alive()
            return _listener_port(admin) is not None

        wait_until(listening, 30, "envoy listener")
        lp = _listener_port(admin)
        assert lp is not None
        yield EnvoyProcess(lp, admin, log_path, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
