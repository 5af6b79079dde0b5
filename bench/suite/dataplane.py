"""The data-plane comparison: every variant's client in its own process, interleaved rounds.

Per round, for each shape (sync sequential; async with C in flight; async over 16
connections at a fixed 1,000 requests/s, Istio's latency setup), every variant runs the
same number of requests, in an order rotated each round so that no variant always follows
the same one. Around each batch the suite reads utime+stime from /proc/<pid>/stat of every
process on that variant's path (its client, its upstream, each Envoy): CPU per request per
process is the delta over the batch divided by the requests. Throughput is requests over the
batch's wall time as the client measured it; latency percentiles are per batch. The report
takes medians over rounds; ratios compare medians of the same run.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from bench.suite.procs import CpuSnapshot, median, pct, rss_mb
from bench.suite.topology import REPO, Path_
from bench.suite.worker import RATE_QPS

HTTP_SHAPES = (("sync", 1), ("async", 16), ("async", 64), ("rate", 16))
GRPC_SHAPES = (("sync", 1), ("async", 16), ("rate", 16))
PROFILED = ("pymesh", "pymesh mTLS")
"""Variants whose client gets one extra, profiled batch per shape after the rounds."""


def shape_name(kind: str, shape: tuple[str, int]) -> str:
    if shape[0] == "sync":
        return "sync sequential"
    if shape[0] == "rate":
        return f"{'aio' if kind == 'grpc' else 'async'} {shape[1]} conns at {RATE_QPS} rps"
    return f"{'aio' if kind == 'grpc' else 'async'} {shape[1]} in flight"


class Worker:
    """One variant's client process (``bench/suite/worker.py``)."""

    def __init__(self, variant: Path_) -> None:
        env = {k: v for k, v in os.environ.items() if k != "GRPC_XDS_BOOTSTRAP"}
        env.update(variant.spec.get("env", {}))
        env["PYTHONPATH"] = str(REPO)
        self.variant = variant
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.suite.worker", json.dumps(variant.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO),
        )

    def wait_ready(self) -> None:
        """The worker's first request succeeded (or RuntimeError with its error)."""
        first = self._read()
        if not first.get("ready"):
            self.close()
            raise RuntimeError(f"{self.variant.kind} {self.variant.name}: {first.get('error')}")
        if self.variant.spec.get("metrics") and not first.get("metric_series"):
            self.close()
            raise RuntimeError(f"{self.variant.name}: metrics on, but no request was recorded")

    def _send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise RuntimeError(f"{self.variant.kind} {self.variant.name}: {exc!r}") from exc

    def _read(self, timeout: float = 120.0) -> dict[str, Any]:
        """The worker's next reply; a worker silent for ``timeout`` s is killed (a hung
        variant must not hang the suite)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(
                f"{self.variant.kind} {self.variant.name}: no reply within {timeout:.0f} s"
            )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.variant.kind} {self.variant.name}: worker exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def run(self, shape: tuple[str, int], n: int) -> tuple[float, list[float]]:
        assert self.proc.stdin is not None
        cmd = {"shape": shape[0], "concurrency": shape[1], "n": n}
        self._send(cmd)
        reply = self._read(60 + n * 0.1)
        if "error" in reply:
            raise RuntimeError(f"{self.variant.kind} {self.variant.name}: {reply['error']}")
        return float(reply["elapsed"]), [float(x) for x in reply["lat"]]

    def profile(self, shape: tuple[str, int], n: int, top: int = 12) -> dict[str, Any]:
        """One batch under cProfile in the worker (see ``worker.profiled``)."""
        assert self.proc.stdin is not None
        cmd = {"shape": shape[0], "concurrency": shape[1], "n": n, "profile": top}
        self._send(cmd)
        reply = self._read(60 + n * 0.5)
        if "error" in reply:
            raise RuntimeError(f"{self.variant.kind} {self.variant.name}: {reply['error']}")
        result: dict[str, Any] = reply["profile"]
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Cell:
    """One variant in one shape: a record per round."""

    kind: str
    shape: str
    variant: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    profile: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        if not self.rounds:
            return {"kind": self.kind, "shape": self.shape, "variant": self.variant,
                    "rounds": 0, "error": self.error or "no rounds"}  # fmt: skip

        def med(key: str) -> float:
            return median([r[key] for r in self.rounds])

        roles = list(self.rounds[0]["cpu_us"])
        cpu = {role: median([r["cpu_us"][role] for r in self.rounds]) for role in roles}
        return {
            "kind": self.kind,
            "shape": self.shape,
            "variant": self.variant,
            "rounds": len(self.rounds),
            "rps": med("rps"),
            "p50_ms": med("p50_ms"),
            "p90_ms": med("p90_ms"),
            "p99_ms": med("p99_ms"),
            "cpu_us": cpu,
            "cpu_us_total": median([sum(r["cpu_us"].values()) for r in self.rounds]),
            "rss_mb": self.rss_mb,
            "error": self.error,
            "profile": self.profile,
            "per_round": self.rounds,
        }


def run(
    variants: list[Path_], kind: str, rounds: int, requests: int, log: Any = print
) -> list[Cell]:
    """Start the ``kind`` variants' clients, warm them up, run interleaved rounds."""
    mine = [v for v in variants if v.kind == kind]
    shapes = HTTP_SHAPES if kind == "http" else GRPC_SHAPES
    workers: list[Worker] = []
    started: list[Worker] = []
    cells = {(s, v.name): Cell(kind, shape_name(kind, s), v.name) for s in shapes for v in mine}

    def failed(s: tuple[str, int], name: str, exc: Exception) -> None:
        cells[(s, name)].error = str(exc)[-2000:]
        log(f"  FAILED {kind} {name} {shape_name(kind, s)}: {str(exc)[-300:]}")

    try:
        started = [Worker(v) for v in mine]  # in parallel: each imports and connects
        for w in started:
            try:
                w.wait_ready()
                workers.append(w)
            except RuntimeError as exc:
                for s in shapes:
                    failed(s, w.variant.name, exc)
        warm = max(20, requests // 5)
        for s in shapes:
            for w in workers:
                try:
                    w.run(s, warm)
                except RuntimeError as exc:
                    failed(s, w.variant.name, exc)
        for rnd in range(rounds):
            for s in shapes:
                k = rnd % len(workers)
                for w in workers[k:] + workers[:k]:
                    cell = cells[(s, w.variant.name)]
                    if cell.error is not None or w.proc.poll() is not None:
                        continue
                    pids = {"client": w.proc.pid, **w.variant.servers}
                    before = CpuSnapshot.take(pids)
                    try:
                        elapsed, lat = w.run(s, requests)
                    except RuntimeError as exc:
                        failed(s, w.variant.name, exc)
                        continue
                    after = CpuSnapshot.take(pids)
                    cell.rounds.append(
                        {
                            "rps": requests / elapsed,
                            "p50_ms": pct(lat, 0.5) * 1e3,
                            "p90_ms": pct(lat, 0.9) * 1e3,
                            "p99_ms": pct(lat, 0.99) * 1e3,
                            "cpu_us": {
                                role: d / requests * 1e6 for role, d in before.delta(after).items()
                            },
                        }
                    )
                    cell.latencies.extend(lat)
            log(f"  {kind} round {rnd + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})")
        for w in workers:
            if w.variant.name not in PROFILED or w.proc.poll() is not None:
                continue
            for s in shapes:
                cell = cells[(s, w.variant.name)]
                if cell.error is None:
                    try:
                        cell.profile = w.profile(s, max(requests // 2, 20))
                    except RuntimeError as exc:
                        log(f"  profile of {kind} {w.variant.name} failed: {exc}")
        for w in workers:
            if w.proc.poll() is not None:
                continue
            pids = {"client": w.proc.pid, **w.variant.servers}
            rss = {role: round(rss_mb(pid), 1) for role, pid in pids.items()}
            for s in shapes:
                cells[(s, w.variant.name)].rss_mb = rss
        return list(cells.values())
    finally:
        for w in started:
            w.close()
