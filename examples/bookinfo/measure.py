"""Figures for the Bookinfo example: start time, config apply latency (file written -> every
workload ACKed), and product page latency per reviews version, with mTLS on and off.

    python -m examples.bookinfo.measure [--loads 200] [--applies 10]

Each page load is a sequential anonymous GET /productpage from this process (plaintext to
productpage, as a browser); the hops behind it are productpage -> details, productpage ->
reviews, and for v2 reviews -> ratings over HTTP, for v3 over gRPC.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from examples.bookinfo.client import User
from examples.bookinfo.mesh import Bookinfo


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(mtls: bool, loads: int, applies: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bookinfo-measure-") as tmp:
        t0 = time.monotonic()
        bookinfo = Bookinfo(Path(tmp), mtls=mtls, log_level="WARNING")
        with bookinfo:
            started = time.monotonic() - t0
            print(f"mtls={mtls}: start (control plane + 6 workloads + first page) {started:.2f} s")
            times = []
            for i in range(applies):
                t = time.monotonic()
                bookinfo.apply("reviews-v2" if i % 2 else "reviews-v3")
                times.append(time.monotonic() - t)
            print(
                f"  apply -> pushed and ACKed by all: median {statistics.median(times):.3f} s,"
                f" max {max(times):.3f} s ({applies} applies)"
            )
            with User(bookinfo.productpage_url) as user:
                for scenario, label in (
                    ("all-v1", "v1 (no ratings)"),
                    ("reviews-v2", "v2 (ratings over HTTP)"),
                    ("reviews-v3", "v3 (ratings over gRPC)"),
                ):
                    bookinfo.apply(scenario)
                    user.pages(10)  # warm connections
                    elapsed = [p.elapsed * 1000 for p in user.pages(loads)]
                    print(
                        f"  page {label:24} p50 {statistics.median(elapsed):6.1f} ms"
                        f"  p90 {_pct(elapsed, 0.9):6.1f} ms  ({loads} loads,"
                        f" {loads / (sum(elapsed) / 1000):.0f} pages/s)"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loads", type=int, default=200)
    parser.add_argument("--applies", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the control plane's config notes: not figures
    for mtls in (True, False):
        measure(mtls, args.loads, args.applies)


if __name__ == "__main__":
    main()
