"""The side-by-side performance suite (issue 9): one run, every comparison, one page.

    PYMESH_ENVOY_BIN=/path/to/envoy PYTHONPATH=. python bench/suite.py --out docs [--quick]

Writes ``<out>/performance.md``, ``<out>/perf/results.json``, PNG plots and the Envoy configs
in ``<out>/perf/``. ``nox -s bench`` runs it with ``--out docs``. The pieces are in
``bench/suite/`` (see its ``__init__``); what is measured and how is on the generated page.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)  # ``bench.suite`` (the package), not this script
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.suite import dataplane, report, scale, topology  # noqa: E402
from bench.suite.procs import machine  # noqa: E402

GRPC_FACTOR = 2
"""gRPC batches are this many times larger (gRPC calls are quicker than HTTP requests)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def envoy_version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = out.stdout.strip().split("version:")[-1].strip()
    parts = text.split("/")
    return f"Envoy {parts[1]}" if len(parts) > 1 else text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="the docs directory")
    ap.add_argument("--quick", action="store_true", help="tiny counts: checks the suite works")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    ap.add_argument("--requests", type=int, default=None, help="requests per batch (1000)")
    ap.add_argument(
        "--sections",
        default="http,grpc,scale",
        help="comma-separated subset of http, grpc, scale",
    )
    ap.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: rewrite the page and plots from a results.json",
    )
    args = ap.parse_args(argv)
    if args.render is not None:
        return render(args.render, args.out)
    rounds = args.rounds or (1 if args.quick else 5)
    requests = args.requests or (40 if args.quick else 1000)
    sections = set(args.sections.split(","))
    envoy_bin = Path(os.environ.get("PYMESH_ENVOY_BIN", "envoy"))
    if ("http" in sections or "grpc" in sections) and not envoy_bin.exists():
        print("set PYMESH_ENVOY_BIN to the Envoy binary", file=sys.stderr)
        return 2

    started = time.time()
    res: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/suite.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "args": {
            "quick": args.quick,
            "rounds": rounds,
            "requests": requests,
            "grpc_requests": requests * GRPC_FACTOR,
        },
        "envoy_version": envoy_version(envoy_bin),
    }
    cells: list[dataplane.Cell] = []
    envoy_configs: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="pymesh-suite-") as d:
        if "http" in sections or "grpc" in sections:
            log("starting upstreams, control plane, Envoys")
            topo = topology.start(Path(d), envoy_bin)
            envoy_configs = dict(topo.envoy_configs)
            try:
                for kind in ("http", "grpc"):
                    if kind in sections:
                        n = requests * GRPC_FACTOR if kind == "grpc" else requests
                        log(f"{kind}: {rounds} rounds of {n} requests per variant")
                        cells += dataplane.run(topo.variants, kind, rounds, n, log)
            finally:
                topo.close()
    res["dataplane"] = [c.summary() for c in cells]
    cdfs = {
        (c.kind, c.shape, c.variant): [
            sorted(c.latencies)[min(len(c.latencies) - 1, int(i / 100 * len(c.latencies)))]
            for i in range(101)
        ]
        for c in cells
        if c.latencies
    }
    if "scale" in sections:
        res["scale"] = run_scale(args.quick)
    res["duration_s"] = round(time.time() - started, 1)
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["envoy_configs"] = envoy_configs
    path = report.write(res, cdfs, args.out, envoy_configs, log)
    log(f"wrote {path} ({res['duration_s']:.0f} s)")
    for line in report.headline(res):
        log(f"  {line}")
    for t in res["targets"]:  # type: ignore[attr-defined]
        log(f"  {t['status']:>12}  {t['target']}: {t['measured']}")
    return 0


def render(results: Path, out: Path) -> int:
    """The page and plots again from a run's JSON (after a change to the report code)."""
    import json

    res = json.loads(results.read_text())
    cdfs = {
        tuple(k.split(" / ")): [q / 1e3 for q in v]
        for k, v in res.pop("cdf_quantiles_ms", {}).items()
    }
    res.pop("targets", None)
    envoy_configs = res.get("envoy_configs", {})
    path = report.write(res, cdfs, out, envoy_configs, log)  # type: ignore[arg-type]
    log(f"wrote {path} from {results}")
    return 0


def run_scale(quick: bool) -> dict[str, object]:
    out: dict[str, object] = {}

    def attempt(key: str, fn: object, *a: object) -> None:
        log(f"scale: {key}")
        try:
            out[key] = fn(*a)  # type: ignore[operator]
        except Exception as exc:  # one failure must not lose the rest
            out[key] = {"error": str(exc)[-3000:]}
            log(f"  FAILED {key}: {str(exc)[-300:]}")

    if quick:
        attempt("cp_1000_all", scale.controlplane, 20, 20, 1, "all")
        attempt("apply", scale.apply, 1000, 100, 2)
        attempt("memory", scale.memory, 20, 1)
    else:
        attempt("cp_200_all", scale.controlplane, 200, 1000, 5, "all")
        attempt("cp_1000_all", scale.controlplane, 1000, 1000, 5, "all")
        attempt("cp_1000_one", scale.controlplane, 1000, 1000, 5, "one")
        attempt("apply", scale.apply, 10_000, 1000, 7)
        attempt("memory", scale.memory, 1000, 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
