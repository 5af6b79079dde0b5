# ruff: noqa: RUF001
"""The suite's report logic on made-up figures (no processes): targets met / missed from the
ratios of the same run, the tables, and the per-process CPU reading from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from bench.suite import procs, report

HTTP_SHAPES = (
    "sync sequential",
    "async 16 in flight",
    "async 64 in flight",
    "async 16 conns at 1000 rps",
)
GRPC_SHAPES = ("sync sequential", "aio 16 in flight", "aio 16 conns at 1000 rps")


def _cell(
    kind: str, shape: str, variant: str, rps: float, cpu: dict[str, float], *, p99: float = 1.0
) -> dict[str, Any]:
    return {
        "kind": kind,
        "shape": shape,
        "variant": variant,
        "rounds": 3,
        "rps": rps,
        "p50_ms": p99 / 2,
        "p90_ms": p99 * 0.8,
        "p99_ms": p99,
        "cpu_us": cpu,
        "cpu_us_total": sum(cpu.values()),
        "rss_mb": {"client": 40.0},
        "error": None,
    }


def _results(pymesh_http_rps: float, pymesh_grpc_rps: float) -> dict[str, Any]:
    cells = []
    for shape in HTTP_SHAPES:
        cells += [
            _cell("http", shape, "httpx", 1000, {"client": 500, "upstream": 150}),
            _cell(
                "http", shape, "pymesh", pymesh_http_rps, {"client": 300, "upstream": 150}, p99=1.1
            ),
            _cell("http", shape, "pymesh mTLS", 800, {"client": 450, "upstream": 400}),
            _cell("http", shape, "1 Envoy", 700, {"client": 500, "envoy": 250, "upstream": 150}),
            _cell(
                "http",
                shape,
                "2 Envoys mTLS",
                500,
                {"client": 500, "envoy client": 300, "envoy server": 300, "upstream": 150},
            ),
        ]
    cells.append(
        {
            "kind": "http",
            "shape": "sync sequential",
            "variant": "broken",
            "rounds": 0,
            "error": "Traceback ...\nRuntimeError: boom",
        }
    )
    for shape in GRPC_SHAPES:
        cells += [
            _cell("grpc", shape, "grpcio", 2000, {"client": 200, "upstream": 300}),
            _cell("grpc", shape, "grpcio xds:///", 2000, {"client": 200, "upstream": 300}),
            _cell("grpc", shape, "pymesh", pymesh_grpc_rps, {"client": 250, "upstream": 300}),
            _cell("grpc", shape, "1 Envoy", 1100, {"client": 200, "envoy": 250, "upstream": 300}),
            _cell(
                "grpc",
                shape,
                "2 Envoys mTLS",
                800,
                {"client": 200, "envoy client": 250, "envoy server": 250, "upstream": 300},
            ),
        ]
    cp = {
        "clients": 1000,
        "services": 1000,
        "change": "all",
        "change_to_ack_p50_seconds": 0.5,
        "change_to_ack_p99_seconds": 0.9,
        "change_to_last_ack_max_seconds": 0.95,
        "cpu_seconds_per_full_push": 1.0,
        "phase_reload_seconds_mean": 0.1,
        "phase_build_seconds_mean": 0.1,
        "phase_push_seconds_mean": 0.3,
        "rss_mb": 150.0,
    }
    return {
        "date": "2026-01-01 00:00 UTC",
        "command": "python bench/suite.py",
        "duration_s": 60.0,
        "machine": {
            "nproc": 2,
            "cpu_model": "x",
            "kernel": "6",
            "python": "3.11",
            "loadavg": [1.0, 1.0, 1.0],
            "versions": {"httpx": "0.28"},
        },
        "loadavg_end": [1.0, 1.0, 1.0],
        "args": {"quick": False, "rounds": 3, "requests": 100},
        "dataplane": cells,
        "scale": {
            "cp_1000_all": cp,
            "cp_1000_one": {**cp, "change_to_ack_p99_seconds": 1.5},
            "apply": {"error": "boom"},
        },
    }


def test_targets_follow_the_ratios_of_the_run() -> None:
    status = {
        t["target"]: (t["status"], t["measured"]) for t in report.targets(_results(1200, 1900))
    }
    assert status["HTTP sync sequential: pymesh throughput ≥ 1.0× plain httpx"] == ("met", "1.2×")
    assert status["HTTP sync sequential: pymesh throughput ≥ 1.5× one Envoy"] == ("met", "1.71×")
    # whole path: pymesh 450 µs vs two Envoys 1250 µs
    key = "HTTP async 16 in flight: whole-path CPU per request, pymesh ≤ 0.6× two Envoys"
    assert status[key] == ("met", "0.36×")
    assert status["HTTP async 16 in flight (stretch): pymesh ≥ 2× plain httpx"][0] == "missed"
    assert status["gRPC aio 16 in flight: pymesh ≥ 0.85× plain grpcio"] == ("met", "0.95×")
    key = "HTTP async 16 conns at 1000 rps: added p99 < 0.30 ms (Istio's sidecar pair)"
    assert status[key] == ("met", "+0.10 ms")
    target = next(t for t in report.targets(_results(1200, 1900)) if t["target"] == key)
    assert "saturated (async 16 in flight): +0.10 ms" in target["note"]
    assert (
        status["Config change to ACK, 1000 clients, every service changed: p99 < 1 s"][0] == "met"
    )
    assert (
        status["Config change to ACK, 1000 clients, one service changed: p99 < 1 s"][0] == "missed"
    )
    assert status["10,000-endpoint EDS update applied < 100 ms"][0] == "not measured"

    slower = {t["target"]: t["status"] for t in report.targets(_results(900, 1600))}
    assert slower["HTTP sync sequential: pymesh throughput ≥ 1.0× plain httpx"] == "missed"
    assert slower["gRPC sync sequential: pymesh ≥ 0.85× plain grpcio"] == "missed"


def test_page_has_a_row_per_variant_and_shows_failures() -> None:
    res = _results(1200, 1900)
    page = report.page(res, report.targets(res), [])
    assert page.count("| pymesh | 1200 | 1.20 |") == len(HTTP_SHAPES)
    assert "| broken | failed: RuntimeError: boom |" in page
    assert "**missed**" in page and "| 1000 | 1000 | all | 0.50 | 0.90 |" in page
    assert "Client apply benchmark failed" in page


def test_cpu_seconds_reads_a_busy_child() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\nimport sys; sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        start = procs.cpu_seconds(child.pid)
        deadline = time.monotonic() + 30
        while procs.cpu_seconds(child.pid) - start < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs.cpu_seconds(child.pid) - start >= 0.2
        assert procs.rss_mb(child.pid) > 1
        assert procs.cpu_seconds(os.getpid()) > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
