"""One ``--quick`` run of the performance suite (``bench/suite.py``), so that it cannot rot:
every variant of every section produces figures, and the page, the JSON and the plots are
written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HTTP = ("httpx", "pymesh", "pymesh mTLS", "1 Envoy", "2 Envoys mTLS")
GRPC = ("grpcio", "grpcio xds:///", "pymesh", "1 Envoy", "2 Envoys mTLS")
SHAPES = {
    "HTTP": (
        "sync sequential",
        "async 16 in flight",
        "async 64 in flight",
        "async 16 conns at 1000 rps",
    ),
    "gRPC": ("sync sequential", "aio 16 in flight", "aio 16 conns at 1000 rps"),
}
PLOTS = [f"{k}-{p}.png" for k in ("http", "grpc") for p in ("throughput", "latency-cdf", "cpu")]


def _tables(page: str) -> dict[str, dict[str, list[str]]]:
    """``### <title>, <shape>`` heading => {variant: cells of its row}."""
    tables: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in page.splitlines():
        if line.startswith("### "):
            current = tables.setdefault(line[4:], {})
        elif line.startswith("## "):
            current = None
        elif current is not None and line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] != "variant":
                current[cells[0]] = cells[1:]
    return tables


@pytest.mark.envoy
@pytest.mark.timeout(180)
def test_quick_run_writes_the_page_with_every_variant(envoy_bin: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYMESH_ENVOY_BIN=str(envoy_bin), PYTHONPATH=str(REPO))
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "suite.py"), "--quick", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    page = (tmp_path / "performance.md").read_text()
    tables = _tables(page)
    for title, variants in (("HTTP", HTTP), ("gRPC", GRPC)):
        for shape in SHAPES[title]:
            rows = tables[f"{title}, {shape}"]
            assert list(rows) == list(variants), (title, shape, list(rows))
            for variant, cells in rows.items():
                assert not cells[0].startswith("failed"), (title, shape, variant, cells[0])
                assert float(cells[0]) > 0, (title, shape, variant)  # req/s
    assert "## Targets (issue 9)" in page
    assert "Quick run" in page

    results = json.loads((tmp_path / "perf" / "results.json").read_text())
    assert len(results["dataplane"]) == 4 * len(HTTP) + 3 * len(GRPC)
    for cell in results["dataplane"]:
        assert cell["rps"] > 0 and set(cell["cpu_us"]) >= {"client"}, cell
        assert cell["p50_ms"] <= cell["p90_ms"] <= cell["p99_ms"], cell
    statuses = {t["target"]: t["status"] for t in results["targets"]}
    assert len(statuses) >= 19
    assert all(s in ("met", "missed", "not measured") for s in statuses.values())
    scale = results["scale"]
    assert scale["cp_1000_all"]["change_to_ack_p99_seconds"] > 0, scale
    assert scale["apply"]["eds"]["push_to_callback_ms_median"] > 0, scale
    assert scale["memory"]["rss_mb"]["bare"] > 0, scale

    for name in PLOTS:
        data = (tmp_path / "perf" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"](perf/{name})" in page
    for name in ("one", "client", "server"):
        assert "static_resources" in (tmp_path / "perf" / f"envoy-{name}.yaml").read_text()
