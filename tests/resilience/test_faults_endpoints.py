"""Endpoint faults under load: killed mid-traffic, hanging, 503 half the time; all gone.

Three backend processes (two healthy, one bad) behind the embedded control plane, Istio's
default retry policy (2 retries of connect-failure, refused-stream, unavailable, cancelled,
retriable 503, another host each time) and a DestinationRule ``outlierDetection`` with
``consecutive5xxErrors: 5`` and ``maxEjectionPercent: 50`` (Istio's default 10 % would
forbid ejecting one host of three, in Envoy as in pymesh). 10,000 requests from 4 threads
sharing one ``pymesh.httpx.Client``: fewer than 0.1 % may fail, and the bad endpoint must be ejected
having seen no more than the configured consecutive errors (plus what was in flight).
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import pymesh.httpx
from pymesh.core.runtime import MeshRuntime
from tests.integration.httpx.conftest import HOST, PORT, Mesh, service_yaml
from tests.resilience._procs import BackendProc

URL = f"http://{HOST}:{PORT}/"
REQUESTS = 10_000
THREADS = 4
CONSECUTIVE = 5
OUTLIER = f"""\
trafficPolicy:
  outlierDetection:
    consecutive5xxErrors: {CONSECUTIVE}
    interval: 1s
    baseEjectionTime: 300s
    maxEjectionPercent: 50
"""
# A hanging endpoint needs a per-try timeout (Istio sets none by default: behind a sidecar a
# hanging endpoint hangs the caller too); the rest is Istio's default policy.
RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
HANG_VS = f"""\
http:
- route:
  - destination: {{host: {HOST}}}
  retries:
    attempts: 2
    perTryTimeout: 0.25s
    retryOn: {RETRY_ON},gateway-error
"""


@pytest.fixture
def procs() -> Iterator[list[BackendProc]]:
    started: list[BackendProc] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.stop()


def _load(
    client: httpx.Client, total: int, on_progress: Callable[[int], None] | None = None
) -> tuple[collections.Counter[Any], list[str]]:
    """``total`` requests from THREADS threads; outcome counts and error descriptions."""
    counts: collections.Counter[Any] = collections.Counter()
    errors: list[str] = []
    lock = threading.Lock()
    done = [0]

    def worker(n: int) -> None:
        for _ in range(n):
            try:
                r = client.get(URL, timeout=30)
                key: Any = (r.status_code, r.headers.get("x-backend"))
                if r.status_code != 200:
                    with lock:
                        errors.append(f"{r.status_code} {r.text[:80]}")
            except httpx.HTTPError as exc:
                key = type(exc).__name__
                with lock:
                    errors.append(repr(exc))
            with lock:
                counts[key] += 1
                done[0] += 1
                i = done[0]
            if on_progress is not None:
                on_progress(i)

    threads = [threading.Thread(target=worker, args=(total // THREADS,)) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return counts, errors


def _bad_host_ejected(mesh: Mesh, port: int) -> bool:
    assert mesh.client is not None
    runtime = MeshRuntime.for_client(mesh.client)
    now = time.monotonic()
    for cluster in runtime.clusters().values():
        for key, host in cluster.hosts.items():
            if key.endswith(f":{port}") and host.is_ejected(now):
                return True
    return False


def _setup(mesh: Mesh, procs: list[BackendProc], bad_mode: str, vs: str = "") -> BackendProc:
    good = [BackendProc(f"good{i}", "ok") for i in (1, 2)]
    bad = BackendProc("bad", bad_mode)
    procs.extend([*good, bad])
    ports = {"v1": good[0].port, "v2": good[1].port, "v3": bad.port}
    mesh.write(service_yaml(ports, destination_rule=OUTLIER, virtual_service=vs))
    mesh.start()
    return bad


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("bad_mode", ["killed", "hang", "flaky"])
def test_bad_endpoint_under_load(
    bad_mode: str, mesh: Mesh, procs: list[BackendProc], record: Any
) -> None:
    process_mode = {"killed": "ok", "hang": "hang", "flaky": "flaky"}[bad_mode]
    bad = _setup(mesh, procs, process_mode, HANG_VS if bad_mode == "hang" else "")
    killed_at: list[int] = []

    def progress(i: int) -> None:
        if bad_mode == "killed" and i >= 2_000 and not killed_at:
            killed_at.append(i)
            bad.kill()  # process gone, port closed, open connections reset

    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        start = time.monotonic()
        counts, errors = _load(client, REQUESTS, progress)
        took = time.monotonic() - start
        ejected = _bad_host_ejected(mesh, bad.port)
    failed = len(errors)
    sent = sum(counts.values())
    bad_served = None if bad_mode == "killed" else bad.count()
    note = f"{took:.0f} s; bad endpoint ejected: {ejected}"
    if bad_served is not None:
        note += f"; it saw {bad_served} requests in all"
    if errors:
        kinds = collections.Counter(e.split(" ")[0].split("(")[0] for e in errors)
        note += "; errors: " + ", ".join(f"{n} x {k}" for k, n in kinds.most_common(3))
    record(
        {
            "killed": "endpoint killed mid-traffic",
            "hang": "endpoint hanging (accepts, never answers)",
            "flaky": "endpoint answering 503 half the time",
        }[bad_mode],
        cases=1,
        requests=sent,
        failed=failed,
        lost=sent - counts[(200, "good1")] - counts[(200, "good2")] - counts[(200, "bad")] - failed,
        note=note,
    )
    assert sent == REQUESTS
    assert failed < REQUESTS * 0.001, errors[:10]
    assert ejected, "the bad endpoint was never ejected"
    if bad_mode == "killed":
        assert killed_at
        assert counts[(200, "bad")] > 0  # it did serve before it died
    elif bad_mode == "hang":
        # every attempt to it times out: ejected after CONSECUTIVE (+ those in flight)
        assert bad_served is not None and CONSECUTIVE <= bad_served <= CONSECUTIVE + THREADS
    else:
        # the backend's seeded sequence says when its first run of CONSECUTIVE 503s ends
        k = _first_run_end(CONSECUTIVE)
        assert bad_served is not None and k <= bad_served <= k + THREADS, (k, bad_served)


def _first_run_end(n: int) -> int:
    """The request count at which the flaky backend's first run of ``n`` 503s ends."""
    rng = random.Random(1)  # as in _backend.py
    run = 0
    for i in range(1, 100_000):
        run = run + 1 if rng.random() < 0.5 else 0
        if run == n:
            return i
    raise AssertionError("no run")


@pytest.mark.timeout(120)
def test_all_endpoints_gone_then_one_returns(
    mesh: Mesh, procs: list[BackendProc], tmp_path: Path, record: Any
) -> None:
    """EDS empties: a fast 503 ``no healthy upstream`` (no hang); one endpoint back: served."""
    a = BackendProc("a", "ok")
    procs.append(a)
    mesh.write(service_yaml({"v1": a.port}))
    mesh.start()
    sent = failed = 0
    with pymesh.httpx.Client(xds_client=mesh.client, mesh_wait=10) as client:
        assert client.get(URL).status_code == 200
        sent += 1
        # every endpoint removed (the ServiceEntry keeps no endpoints)
        mesh.write(service_yaml({}).replace("  endpoints:\n", "  endpoints: []\n"))
        deadline = time.monotonic() + 15
        while True:
            r = client.get(URL)
            sent += 1
            if r.status_code == 503:
                break
            assert time.monotonic() < deadline, "EDS removal never applied"
            time.sleep(0.05)
        slowest = 0.0
        for _ in range(200):
            t0 = time.monotonic()
            r = client.get(URL)
            slowest = max(slowest, time.monotonic() - t0)
            sent += 1
            assert r.status_code == 503
            assert r.text == "no healthy upstream"
        assert slowest < 0.1, slowest  # fast: no connect attempt, no retry backoff wait
        # one endpoint returns through EDS
        b = BackendProc("b", "ok")
        procs.append(b)
        t_push = time.monotonic()
        mesh.write(service_yaml({"v1": b.port}))
        while True:
            r = client.get(URL)
            sent += 1
            if r.status_code == 200:
                break
            assert time.monotonic() - t_push < 15, "recovery never came"
            time.sleep(0.02)
        recovered_after = time.monotonic() - t_push
        for _ in range(100):
            r = client.get(URL)
            sent += 1
            failed += r.status_code != 200
    record(
        "all endpoints gone, then one back via EDS",
        cases=1,
        requests=sent,
        failed=failed,
        note=(
            f"503 no healthy upstream in <{slowest * 1000:.1f} ms; "
            f"recovered {recovered_after:.2f} s after the push"
        ),
    )
    assert failed == 0
